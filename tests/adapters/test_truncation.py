"""``truncate_adapter``: a saved adapter cut to rank K loads with ``PeftModel.from_pretrained``
and applies exactly the best rank-K approximation of each original ΔW (dense SVD, float64)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_monitor.adapters import LoRAMonitorError
from lora_monitor.adapters.truncation import truncate_adapter
from tests.helpers.models import tiny_llama_lora


def _updates(model) -> dict[str, torch.Tensor]:
    """Every LoRA module's ΔW as peft applies it (``get_delta_weight``), by module path."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module.get_delta_weight("default").double()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _best(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def _load(model, directory):
    from peft import PeftModel

    # The same base model, without its LoRA layers: what a user loads the adapter into.
    return PeftModel.from_pretrained(copy.deepcopy(model).unload(), str(directory))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_uniform_rank_gives_the_best_approximation(tmp_path, use_rslora):
    model = tiny_llama_lora(rank=8, alpha=16, use_rslora=use_rslora)
    model.save_pretrained(str(tmp_path / "r8"))
    written = truncate_adapter(tmp_path / "r8", tmp_path / "r3", 3)
    assert set(written.values()) == {3}
    config = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {} and config["lora_alpha"] == 16
    truncated = _updates(_load(model, tmp_path / "r3"))
    original = _updates(model)
    assert set(truncated) == set(original)
    for name, delta in original.items():
        torch.testing.assert_close(truncated[name], _best(delta, 3), rtol=1e-5, atol=1e-7)


def test_ranks_per_module_go_through_rank_pattern(tmp_path):
    model = tiny_llama_lora(rank=8, alpha=8)
    model.save_pretrained(str(tmp_path / "r8"))
    ranks = {name: 2 if ".layers.0." in name else 5 for name in _updates(model)}
    saved_names = {f"base_model.model.{name.removeprefix('base_model.model.')}": rank for name, rank in ranks.items()}
    written = truncate_adapter(tmp_path / "r8", tmp_path / "cut", saved_names)
    config = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and all(rank != config["r"] for rank in config["rank_pattern"].values())
    loaded = _load(model, tmp_path / "cut")
    for name, module in loaded.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            assert module.lora_A["default"].weight.shape[0] == ranks[name] == written[name]
    truncated, original = _updates(loaded), _updates(model)
    for name, delta in original.items():
        torch.testing.assert_close(truncated[name], _best(delta, ranks[name]), rtol=1e-5, atol=1e-7)


def test_a_rank_above_a_module_s_own_keeps_it_whole(tmp_path):
    model = tiny_llama_lora(rank=4)
    model.save_pretrained(str(tmp_path / "r4"))
    assert set(truncate_adapter(tmp_path / "r4", tmp_path / "same", 64).values()) == {4}
    for name, delta in _updates(model).items():
        torch.testing.assert_close(_updates(_load(model, tmp_path / "same"))[name], delta, rtol=1e-5, atol=1e-7)


def test_dora_is_refused_with_the_reason(tmp_path):
    model = tiny_llama_lora(rank=4, use_dora=True)
    model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(LoRAMonitorError, match="DoRA adapter: its update rescales the rows"):
        truncate_adapter(tmp_path / "dora", tmp_path / "out", 2)


def test_live_truncation_applies_the_best_rank_k_update_and_restores_exactly():
    from lora_monitor.adapters import plain_lora_layers
    from lora_monitor.adapters.truncation import LiveTruncation

    model = tiny_llama_lora(rank=8, alpha=16, use_rslora=True)
    original = {name: delta.clone() for name, delta in _updates(model).items()}
    factors = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    layers = plain_lora_layers(model)
    assert set(layers) == set(original)
    with LiveTruncation(layers) as truncation:
        assert truncation.rank == 8
        for k in (0, 1, 3, 8):
            truncation.cut(k)
            for name, delta in _updates(model).items():
                torch.testing.assert_close(delta, _best(original[name], k), rtol=1e-5, atol=1e-6)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(parameter, factors[name]), name  # bit for bit
