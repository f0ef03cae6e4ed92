"""The per-kind answer of lora_monitor.analysis.rank: attention and MLP read apart, a rank each
where they differ more than 2×, with too_small per kind and the parameters the split saves
counted from the modules' shapes."""

from __future__ import annotations

import dataclasses
import math

import torch

from lora_monitor.adapters.kinds import groups_of, trained_modules
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.probe import ProbeReading, read_probe
from lora_monitor.analysis.rank import recommend_rank
from tests.helpers.factors import random_factors

R = 8


def _curve(needed: float):
    """A probe whose log loss keeps 1 − exp(−k/needed) of its reduction at k."""
    return lambda k: 1e-3 * math.exp(-3 * (1 - math.exp(-k / needed))) if k < R else 1e-3 * math.exp(-3)


def _reading(attention: float, mlp: float) -> ProbeReading:
    joint = read_probe(_curve(max(attention, mlp)), R)
    groups = {"attention": read_probe(_curve(attention), R), "mlp": read_probe(_curve(mlp), R)}
    return ProbeReading(joint.r, joint.losses, joint.rank, joint.low, joint.high, groups=groups)


def _shaped(factors, spectrum):
    """``factors`` whose ΔW = B·A has singular values ``spectrum`` (orthonormal B, A's rows)."""
    shaped = {}
    for key, f in factors.items():
        B = torch.linalg.qr(f.lora_B)[0]
        A = torch.linalg.qr(f.lora_A.T)[0].T * torch.tensor(spectrum)[:, None]
        shaped[key] = dataclasses.replace(f, lora_A=A, lora_B=B)
    return shaped


def _factors():
    """Attention modules whose ΔW has one strong direction, MLP modules a flat spectrum of 8."""
    factors = random_factors(
        2, ("q", "v"), rank=R, seed=0, module_name="model.layers.{layer}.self_attn.{projection}_proj"
    )
    factors = _shaped(factors, [10.0] + [0.01] * (R - 1))
    mlp = random_factors(
        2,
        ("gate_proj", "down_proj"),
        rank=R,
        seed=1,
        in_features=24,
        module_name="model.layers.{layer}.mlp.{projection}",
    )
    return factors | _shaped(mlp, [1.0] * R)


def test_attention_and_mlp_ranks_apart_give_a_rank_each_and_the_parameters_saved():
    factors = _factors()
    analyses = analyze(Snapshot(step=1, factors=factors), None, "A")
    reading = _reading(attention=0.3, mlp=2.5)
    rec = recommend_rank(analyses, probe=reading, groups=groups_of(factors), trained=trained_modules(factors))
    assert set(rec.kinds) == {"attention", "mlp"}
    attention, mlp = rec.kinds["attention"], rec.kinds["mlp"]
    assert attention.probe is reading.groups["attention"] and mlp.probe is reading.groups["mlp"]
    # Each group's rank: the larger of its probe and its own modules' largest gap rank.
    for answer, keys in ((attention, ("q", "v")), (mlp, ("gate_proj", "down_proj"))):
        gaps = [e.delta_w_gap_rank for e in rec.modules if e.key[1] in keys]
        assert answer.rank == max(answer.probe.rank, max(gaps))
        assert set(answer.projections) == set(keys) and answer.r == R
    assert rec.per_kind == {"attention": attention.rank, "mlp": mlp.rank}
    assert mlp.rank > 2 * attention.rank
    ranks = rec.module_ranks()
    assert {name: k for name, k in ranks.items()} == {
        f.module_name: (attention.rank if "self_attn" in f.module_name else mlp.rank) for f in factors.values()
    }
    # Parameters, counted independently: A is r × in, B out × r, per module.
    now = sum(R * (f.in_features + f.out_features) for f in factors.values())
    uniform = sum(min(rec.rank, R) * (f.in_features + f.out_features) for f in factors.values())
    mixed = sum(ranks[f.module_name] * (f.in_features + f.out_features) for f in factors.values())
    assert rec.parameters() == (now, uniform, mixed) and mixed < uniform <= now


def test_close_ranks_share_one_and_too_small_is_said_per_kind():
    factors = _factors()
    analyses = analyze(Snapshot(step=1, factors=factors), None, "A")
    close = recommend_rank(
        analyses, probe=_reading(1.0, 1.2), groups=groups_of(factors), trained=trained_modules(factors)
    )
    # 1 − exp(−k/1) keeps 95 % at k = 3, 1 − exp(−k/1.2) at k = 4: 4/3 apart, one rank serves.
    assert (close.kinds["attention"].rank, close.kinds["mlp"].rank) == (3, 4)
    assert close.per_kind is None
    assert set(close.module_ranks().values()) == {close.rank}
    # The MLP needs all of its r = 8 directions: too small for the MLP, and said so.
    small = recommend_rank(
        analyses, probe=_reading(0.3, 40.0), groups=groups_of(factors), trained=trained_modules(factors)
    )
    assert small.kinds["mlp"].too_small and not small.kinds["attention"].too_small
    assert small.kinds["mlp"].probe.rank == R
    assert small.too_small or any("too small for the mlp modules" in c for c in small.cautions)


def test_one_group_only_has_no_per_kind_answer():
    factors = random_factors(2, ("q", "v"), rank=R, seed=0)
    analyses = analyze(Snapshot(step=1, factors=factors), None, "A")
    rec = recommend_rank(analyses, probe=read_probe(_curve(1.0), R))
    assert rec.kinds == {} and rec.per_kind is None and rec.not_covered == ()
