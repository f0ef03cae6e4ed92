"""Fused q|k|v modules are split into the rows each architecture's own attention code uses.

The expected rows are found by running the architecture (its attention, on probe inputs:
``tests.helpers.architectures.probe_fused_rows``), never from lora_monitor's layout table.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lora_monitor.adapters import find_lora_factors, fused_split, load_adapter
from tests.helpers.architectures import FUSED, base_model, peft_model, probe_fused_rows
from tests.helpers.models import randomize_lora_B


@pytest.fixture(scope="module", params=sorted(FUSED))
def fused_model(request):
    arch = FUSED[request.param]
    base = base_model(arch)
    model = peft_model(arch, base)
    randomize_lora_B(model, seed=3)
    return arch, base, model, probe_fused_rows(arch, base)


def _full_module(model, arch):
    layer = dict(model.named_modules())["base_model.model." + arch.fused]
    weight = layer.get_base_layer().weight
    W0 = weight.T if type(layer.get_base_layer()).__name__ == "Conv1D" else weight
    return layer, W0.detach()


def test_live_split_takes_the_rows_the_attention_uses(fused_model):
    arch, _, model, rows = fused_model
    layer, W0 = _full_module(model, arch)
    B = layer.lora_B["default"].weight.detach()
    delta = layer.get_delta_weight("default").detach()
    delta = delta.T if delta.shape != W0.shape else delta
    factors = find_lora_factors(model)
    for projection, expected in rows.items():
        f = factors[(0, projection)]
        index = torch.tensor(expected)
        torch.testing.assert_close(f.lora_B.detach(), B[index], rtol=0, atol=0)
        torch.testing.assert_close(f.read_base_weight().detach(), W0[index], rtol=0, atol=0)
        torch.testing.assert_close(f.scaling * f.lora_B.detach() @ f.lora_A.detach(), delta[index])


def test_saved_adapter_with_the_base_config_splits_alike(fused_model, tmp_path):
    arch, base, model, rows = fused_model
    model.save_pretrained(str(tmp_path))
    base.config.to_json_file(str(tmp_path / "base_config.json"))
    live = find_lora_factors(model)
    saved = load_adapter(tmp_path, base_config=tmp_path / "base_config.json").factors
    assert set(saved) == set(live)
    for key, f in live.items():
        torch.testing.assert_close(saved[key].lora_B, f.lora_B.detach())


def test_saved_adapter_without_config_splits_only_what_its_shape_tells(fused_model, tmp_path):
    arch, _, model, _ = fused_model
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = set(load_adapter(tmp_path).factors)
    last = arch.fused.rsplit(".", 1)[-1]
    if arch.name in ("gpt2", "gpt_bigcode_mq"):  # Conv1D thirds; multi-query: E + 2·head_dim rows
        assert (0, "q") in keys and not caught
    else:
        assert keys == {(0, last), (1, last)}
        assert any("config is not known" in str(w.message) and "base_config" in str(w.message) for w in caught)


def test_a_config_that_does_not_fit_keeps_the_module_whole():
    split = fused_split(
        "h.0.self_attention.query_key_value",
        96,
        32,
        {"model_type": "falcon", "num_attention_heads": 4, "multi_query": True},
    )
    assert split.rows is None and "gives 48 rows but lora_B has 96" in split.reason
    unknown = fused_split("layers.0.attn.qkv_proj", 96, 32, {"model_type": "mpt"})
    assert unknown.rows is None and "'mpt'" in unknown.reason
    assert fused_split("layers.0.q_proj", 32, 32, None) == fused_split("x", 1, 1, None)


def test_per_head_rows_are_index_tensors_and_blocks_are_slices():
    mha = fused_split("h.0.c_attn", 96, 32, {"model_type": "gpt_bigcode", "n_head": 4, "multi_query": False})
    assert isinstance(mha.rows["q"], torch.Tensor) and mha.rows["q"][:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 24, 25]
    phi3 = fused_split(
        "layers.0.qkv_proj", 64, 32, {"model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2}
    )
    assert phi3.rows == {"q": slice(0, 32), "k": slice(32, 48), "v": slice(48, 64)}
