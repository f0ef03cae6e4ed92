"""lora_monitor.adapters.selection: choosing modules by projection and layer, and checking that a
reference can be compared with the model."""

from __future__ import annotations

import pytest

from lora_monitor.adapters import LoRAMonitorError, check_reference_compatible, find_lora_factors, select_factors
from tests.helpers.models import tiny_llama_lora


def test_select_factors(llama_lora, gpt2_lora):
    factors = find_lora_factors(llama_lora)
    assert select_factors(factors, None, None) == factors
    assert set(select_factors(factors, ["q"], None)) == {(0, "q"), (1, "q")}
    assert set(select_factors(factors, ["q_proj"], None)) == {(0, "q"), (1, "q")}
    assert set(select_factors(factors, ["self_attn.v_proj"], [1])) == {(1, "v")}
    assert set(select_factors(factors, ["model.layers.0.self_attn.v_proj"], None)) == {(0, "v")}
    assert set(select_factors(factors, None, [0])) == {(0, "q"), (0, "v")}
    assert select_factors(factors, ["q"], None)[(0, "q")] is factors[(0, "q")]
    gpt2 = find_lora_factors(gpt2_lora)
    assert set(select_factors(gpt2, ["c_attn"], [1])) == {(1, "q"), (1, "k"), (1, "v")}
    assert set(select_factors(gpt2, ["q", "v"], None)) == {(0, "q"), (0, "v"), (1, "q"), (1, "v")}


def test_select_factors_errors(llama_lora):
    factors = find_lora_factors(llama_lora)
    with pytest.raises(
        LoRAMonitorError,
        match=r"target_modules \['o_proj'\] match no LoRA module.*projections \['q', 'v'\].*"
        r"layers \[0, 1\]",
    ):
        select_factors(factors, ["q", "o_proj"], None)
    with pytest.raises(LoRAMonitorError, match=r"layers \[7\] have no LoRA module.*layers \[0, 1\]"):
        select_factors(factors, None, [0, 7])
    partial = {(0, "q"): factors[(0, "q")], (1, "v"): factors[(1, "v")]}
    with pytest.raises(LoRAMonitorError, match=r"select no module together"):
        select_factors(partial, ["q"], [1])


def test_reference_compatible_across_ranks_and_seeds(llama_lora):
    current = find_lora_factors(llama_lora)
    reference = find_lora_factors(tiny_llama_lora(rank=4, seed=1))
    for basis in ("A", "B", "delta_w_left", "delta_w_right"):
        check_reference_compatible(current, reference, basis)
    # the reference may hold more modules than the model monitors
    check_reference_compatible(select_factors(current, ["q"], [1]), reference, "A")


def test_reference_from_another_base_model(llama_lora):
    current = find_lora_factors(llama_lora)
    reference = find_lora_factors(tiny_llama_lora(hidden_size=64))
    with pytest.raises(
        LoRAMonitorError,
        match=r"reference module \(0, 'q'\) has ΔW of shape \(64, 64\) but the model's has "
        r"\(32, 32\): "
        r"the reference adapter was trained on another base model",
    ):
        check_reference_compatible(current, reference, "A")


def test_reference_missing_modules(llama_lora):
    current = find_lora_factors(llama_lora)
    reference = find_lora_factors(tiny_llama_lora(target_modules=("q_proj",)))
    with pytest.raises(LoRAMonitorError, match=r"no module for keys \[\(0, 'v'\), \(1, 'v'\)\].*target_modules"):
        check_reference_compatible(current, reference, "B")
    with pytest.raises(LoRAMonitorError, match=r"unknown basis 'C'"):
        check_reference_compatible(current, current, "C")
