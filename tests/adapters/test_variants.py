"""lora_monitor.adapters.variants: what is read of peft's LoRA variants (DoRA), what is skipped with a
warning (Conv and Embedding LoRA), and what is refused with what to do (AdaLoRA saved, MiCA, VeRA)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_monitor.adapters import LoRAMonitorError, find_lora_factors, load_adapter
from tests.helpers.architectures import SEPARATE, base_model, peft_model
from tests.helpers.models import TINY_LORA_KEYS, tiny_llama_lora


def test_dora_factors_are_read():
    model = tiny_llama_lora(use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = find_lora_factors(model)
    assert set(factors) == TINY_LORA_KEYS["llama"]


class _ConvAndLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        block = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 4, 3), "q_proj": torch.nn.Linear(6, 6)})
        self.blocks = torch.nn.ModuleList([block])


def test_conv_lora_is_skipped(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["conv", "q_proj"])
    model = get_peft_model(_ConvAndLinear(), config)
    with pytest.warns(UserWarning, match=r"skipped .*blocks\.0\.conv"):
        factors = find_lora_factors(model)
    assert set(factors) == {(0, "q")}
    model.save_pretrained(str(tmp_path))
    assert set(load_adapter(tmp_path).factors) == {(0, "q")}


def test_embedding_lora_is_skipped():
    model = tiny_llama_lora(target_modules=("q_proj", "embed_tokens"))
    with pytest.warns(UserWarning, match=r"skipped .*embed_tokens \(Embedding LoRA\)"):
        factors = find_lora_factors(model)
    assert set(factors) == {(0, "q"), (1, "q")}


def test_a_saved_adalora_adapter_is_refused_with_what_to_do(tmp_path):
    from peft import AdaLoraConfig

    from lora_monitor.adapters import load_adapter

    arch = SEPARATE["llama"]
    model = peft_model(arch, base_model(arch), config_class=AdaLoraConfig, init_r=4, target_r=2, total_step=4)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(LoRAMonitorError, match=r"AdaLoRA adapter.*PeftModel.from_pretrained.*find_lora_factors"):
        load_adapter(tmp_path)


def test_lora_variants_it_does_not_read_are_named():
    from peft import VeraConfig, get_peft_model

    from lora_monitor.adapters import find_lora_factors

    arch = SEPARATE["llama"]
    mica = peft_model(arch, base_model(arch), init_lora_weights="mica")
    with (
        pytest.warns(UserWarning, match=r"q_proj \(peft LoRA variant MiCALinear"),
        pytest.raises(LoRAMonitorError, match="MiCALinear"),
    ):
        find_lora_factors(mica)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vera = get_peft_model(base_model(arch), VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(LoRAMonitorError, match=r"type \['VERA'\], not LoRA"):
        find_lora_factors(vera)
