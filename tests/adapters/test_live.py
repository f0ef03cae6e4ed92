"""lora_monitor.adapters.live: the LoRA factors of live peft models, against peft's own
``get_delta_weight``; the adapter monitored, and models it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_monitor.adapters import LoRAMonitorError, find_lora_factors
from tests.helpers.dense import assert_match_peft, factor_delta, peft_deltas, relative_error
from tests.helpers.models import TINY_LORA, TINY_LORA_KEYS, randomize_lora_B, tiny_gpt2, tiny_llama, tiny_llama_lora


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_factors_match_peft_delta_weight(arch):
    model = TINY_LORA[arch]()
    factors = find_lora_factors(model)
    assert set(factors) == TINY_LORA_KEYS[arch]
    assert all(f.key == key for key, f in factors.items())
    assert_match_peft(factors, model)
    for f in factors.values():
        assert f.scaling == 2.0  # alpha 16 / r 8
        assert f.rank == 8
        assert f.base_weight is not None
        assert f.base_weight.shape == (f.out_features, f.in_features)


def test_llama_factors_are_the_live_parameters(llama_lora):
    factors = find_lora_factors(llama_lora)
    modules = dict(llama_lora.named_modules())
    f = factors[(1, "q")]
    assert f.module_name == "base_model.model.model.layers.1.self_attn.q_proj"
    layer = modules[f.module_name]
    assert f.lora_A is layer.lora_A["default"].weight
    assert f.lora_B is layer.lora_B["default"].weight
    assert f.base_weight is layer.base_layer.weight
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(1.0)
    assert relative_error(factor_delta(f), peft_deltas(llama_lora)[f.module_name]) < 1e-5


def test_llama_grouped_query_v_has_fewer_rows(llama_lora):
    factors = find_lora_factors(llama_lora)
    # hidden 32, 4 heads of 8, 2 key/value heads: v_proj maps 32 -> 16.
    assert (factors[(0, "q")].out_features, factors[(0, "q")].in_features) == (32, 32)
    assert (factors[(0, "v")].out_features, factors[(0, "v")].in_features) == (16, 32)
    assert factors[(0, "v")].base_weight.shape == (16, 32)
    assert_match_peft(factors, llama_lora)


def test_gpt2_c_attn_split_in_live_row_blocks(gpt2_lora):
    factors = find_lora_factors(gpt2_lora)
    layer = dict(gpt2_lora.named_modules())["base_model.model.transformer.h.0.attn.c_attn"]
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    W = layer.base_layer.weight  # Conv1D: (in, 3·out)
    assert W.shape == (32, 96)
    for i, proj in enumerate("qkv"):
        f = factors[(0, proj)]
        assert f.module_name.endswith("h.0.attn.c_attn")
        assert f.lora_A is A
        assert f.lora_B.shape == (32, 8)
        assert torch.equal(f.lora_B, B[32 * i : 32 * (i + 1)])
        assert f.lora_B.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
        assert torch.equal(f.base_weight, W.T[32 * i : 32 * (i + 1)])
        assert f.base_weight.untyped_storage().data_ptr() == W.untyped_storage().data_ptr()
    # A-based analysis cannot tell q from v, but ΔW differs.
    assert not torch.allclose(factor_delta(factors[(0, "q")]), factor_delta(factors[(0, "v")]))
    with torch.no_grad():
        B[64:].mul_(3.0)  # changes v only, seen through the live view
    assert_match_peft(factors, gpt2_lora)


def test_rslora_scaling():
    model = tiny_llama_lora(rank=16, alpha=8, use_rslora=True)
    factors = find_lora_factors(model)
    for f in factors.values():
        assert f.rank == 16
        assert f.scaling == pytest.approx(8 / math.sqrt(16))
        assert f.scaling != pytest.approx(8 / 16)
    assert_match_peft(factors, model)


def test_multiple_adapters_one_active(llama_lora):
    llama_lora.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]))
    randomize_lora_B(llama_lora, seed=5)
    # add_adapter does not activate: the default adapter is still the one analyzed.
    default = find_lora_factors(llama_lora)
    assert set(default) == TINY_LORA_KEYS["llama"]
    assert {f.rank for f in default.values()} == {8}

    llama_lora.set_adapter("second")
    second = find_lora_factors(llama_lora)
    assert set(second) == {(0, "q"), (1, "q")}
    assert {f.rank for f in second.values()} == {4}
    assert {f.scaling for f in second.values()} == {0.5}
    assert_match_peft(second, llama_lora, adapter="second")

    explicit = find_lora_factors(llama_lora, adapter_name="default")
    assert {f.rank for f in explicit.values()} == {8}
    assert_match_peft(explicit, llama_lora, adapter="default")


def test_several_active_adapters_need_a_name(llama_lora):
    llama_lora.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]))
    llama_lora.base_model.set_adapter(["default", "second"])
    with pytest.raises(
        LoRAMonitorError,
        match=r"several LoRA adapters are active.*'default', 'second'.*adapter_name",
    ):
        find_lora_factors(llama_lora)
    assert {f.rank for f in find_lora_factors(llama_lora, adapter_name="second").values()} == {4}


def test_unknown_adapter_name(llama_lora):
    with pytest.raises(LoRAMonitorError, match=r"adapter 'nope' not found.*\['default'\]"):
        find_lora_factors(llama_lora, adapter_name="nope")


def test_lightning_module_holding_a_peft_model(llama_lora):
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

    factors = find_lora_factors(Module(llama_lora))
    direct = find_lora_factors(llama_lora)
    assert set(factors) == set(direct)
    for key, f in factors.items():
        assert f.module_name == "model." + direct[key].module_name
        assert f.lora_A is direct[key].lora_A


def test_bare_model_with_injected_lora():
    torch.manual_seed(0)  # the base model and then the LoRA factors
    model = tiny_llama(seed=None)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"])
    model = inject_adapter_in_model(config, model)
    randomize_lora_B(model)
    factors = find_lora_factors(model)
    assert set(factors) == {(0, "k"), (0, "o"), (1, "k"), (1, "o")}
    assert factors[(0, "k")].module_name == "model.layers.0.self_attn.k_proj"
    assert_match_peft(factors, model)


def test_no_lora_layers():
    model = tiny_gpt2(n_layer=1, n_positions=16)
    with pytest.raises(LoRAMonitorError, match=r"no peft LoRA layers found in GPT2LMHeadModel.*get_peft_model"):
        find_lora_factors(model)


def test_merged_adapter_is_refused(llama_lora):
    llama_lora.merge_adapter()
    with pytest.raises(
        LoRAMonitorError,
        match=r"adapter 'default' is merged into the base weights of .*q_proj.*unmerge_adapter",
    ):
        find_lora_factors(llama_lora)
    llama_lora.unmerge_adapter()
    assert_match_peft(find_lora_factors(llama_lora), llama_lora)


def test_merged_and_unloaded_adapter_is_refused(llama_lora):
    llama_lora.merge_and_unload()
    with pytest.raises(LoRAMonitorError, match=r"no LoRA layers left.*merged and unloaded"):
        find_lora_factors(llama_lora)
