"""lora_monitor.adapters.kinds: every architecture's names for a block's seven matrices map to
their kind and group, read from real peft models (module paths as peft makes them), and the
``rank_pattern`` of a per-kind answer gives every module its rank as peft itself reads it."""

from __future__ import annotations

import pytest
from peft.utils.other import get_pattern_key

from lora_monitor.adapters import find_lora_factors
from lora_monitor.adapters.kinds import (
    ATTENTION,
    MLP,
    groups_of,
    module_group,
    module_kind,
    trained_modules,
    uncovered_projections,
)
from lora_monitor.adapters.truncation import rank_pattern
from tests.helpers.models import tiny_bert_lora, tiny_gpt2_lora, tiny_llama_lora

LLAMA_KINDS = {"q": "q", "k": "k", "v": "v", "o": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def test_llama_all_linear_every_module_has_its_kind_and_group():
    model = tiny_llama_lora(rank=4, target_modules="all-linear")
    factors = find_lora_factors(model)
    kinds = {key[1]: module_kind(f.projection, f.module_name) for key, f in factors.items()}
    assert kinds == LLAMA_KINDS
    groups = groups_of(factors)
    assert set(groups) == set(factors)  # no module left without a group
    assert {p for (_, p), g in groups.items() if g == ATTENTION} == {"q", "k", "v", "o"}
    assert {p for (_, p), g in groups.items() if g == MLP} == {"gate_proj", "up_proj", "down_proj"}
    modules = trained_modules(factors)
    assert len(modules) == 2 * 7 and all(m.rank == 4 for m in modules)
    down = next(m for m in modules if m.name.endswith("layers.0.mlp.down_proj"))
    assert (down.in_features, down.out_features) == (64, 32)  # intermediate 2·32 → hidden 32
    assert down.parameters() == 4 * (64 + 32) and down.parameters(1) == 64 + 32


def test_bert_three_dense_layers_are_told_apart_by_their_path():
    model = tiny_bert_lora(rank=2, target_modules=("query", "value", "dense"))
    factors = find_lora_factors(model)
    kinds = {f.projection: module_kind(f.projection, f.module_name) for f in factors.values()}
    # BERT's attention.output.dense is o; intermediate.dense the MLP's up; output.dense its down
    # (and the pooler's dense no kind: it is no block matrix).
    assert kinds["attention.dense"] == "o" and kinds["intermediate.dense"] == "up"
    assert kinds["output.dense"] == "down"
    assert module_group("attention.dense", "bert.encoder.layer.0.attention.output.dense") == ATTENTION
    assert module_group("output.dense", "bert.encoder.layer.0.output.dense") == MLP


def test_gpt2_fused_and_conv1d_names():
    model = tiny_gpt2_lora(rank=2, target_modules=("c_attn", "c_proj", "c_fc"))
    factors = find_lora_factors(model)
    kinds = {f.projection: module_kind(f.projection, f.module_name) for f in factors.values()}
    assert kinds == {"q": "q", "k": "k", "v": "v", "attn.c_proj": "o", "mlp.c_proj": "down", "c_fc": "up"}
    # c_attn's three projections are one module: counted once, with its whole B.
    modules = trained_modules(factors)
    assert len(modules) == 2 * 4
    c_attn = next(m for m in modules if m.name.endswith("h.0.attn.c_attn"))
    assert set(c_attn.keys) == {(0, "q"), (0, "k"), (0, "v")}
    assert (c_attn.in_features, c_attn.out_features) == (32, 96) and c_attn.group == ATTENTION


@pytest.mark.parametrize(
    "name, kind",
    [
        ("model.layers.0.block_sparse_moe.experts.3.w1", "gate"),
        ("model.layers.0.block_sparse_moe.experts.3.w3", "up"),
        ("model.layers.0.block_sparse_moe.experts.3.w2", "down"),
        ("encoder.block.0.layer.1.DenseReluDense.wi", "up"),
        ("encoder.block.0.layer.1.DenseReluDense.wo", "down"),
        ("encoder.block.0.layer.0.SelfAttention.o", "o"),
        ("transformer.h.0.self_attention.dense", "o"),
        ("gpt_neox.layers.0.attention.dense", "o"),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h", "up"),
        ("model.decoder.layers.0.fc2", "down"),
        ("distilbert.transformer.layer.0.ffn.lin1", "up"),
        ("classifier.dense", "dense"),
        ("score", "score"),
    ],
)
def test_kinds_of_other_architectures(name, kind):
    assert module_kind(name.rsplit(".", 1)[-1], name) == kind
    assert module_group(name.rsplit(".", 1)[-1], name) == {
        "gate": MLP,
        "up": MLP,
        "down": MLP,
        "o": ATTENTION,
    }.get(kind)


def test_uncovered_projections_are_the_trained_ones_left_out():
    factors = find_lora_factors(tiny_llama_lora(rank=2, target_modules="all-linear"))
    monitored = {key: f for key, f in factors.items() if key[1] in ("q", "v")}
    assert uncovered_projections(factors, monitored) == ["k", "o", "gate_proj", "up_proj", "down_proj"]
    assert uncovered_projections(factors, factors) == []


def _as_peft_reads(r: int, pattern: dict[str, int], names: list[str]) -> dict[str, int]:
    """The rank peft gives each module from ``r`` and ``rank_pattern`` (its own matcher)."""
    return {name: pattern.get(get_pattern_key(list(pattern), name), r) for name in names}


@pytest.mark.parametrize(
    "names, mlp",
    [
        (
            [
                f"model.layers.{i}.{part}"
                for i in range(12)
                for part in (
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            ],
            ("mlp.",),
        ),
        (
            [
                f"bert.encoder.layer.{i}.{part}"
                for i in range(12)
                for part in (
                    "attention.self.query",
                    "attention.self.value",
                    "attention.output.dense",
                    "intermediate.dense",
                    "output.dense",
                )
            ],
            ("intermediate.", ".output.dense"),
        ),
    ],
)
def test_rank_pattern_gives_every_module_its_rank_as_peft_reads_it(names, mlp):
    is_mlp = lambda name: any(part in name and "attention" not in name for part in mlp)  # noqa: E731
    ranks = {f"base_model.model.{name}": 8 if is_mlp(name) else 2 for name in names}
    r, pattern = rank_pattern(ranks)
    assert _as_peft_reads(r, pattern, names) == {name.removeprefix("base_model.model."): k for name, k in ranks.items()}
    assert len(pattern) <= 3  # short: one key per kind, not one per module
