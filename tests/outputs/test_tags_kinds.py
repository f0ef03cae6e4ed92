"""The first screen of an all-linear adapter (issue 22): 80 layers × the seven kinds of a Llama
block, with the per-kind ranks, stay within TensorBoard's 24 summary cards; the per-kind ranks
are cards of ``LoRA_rank`` after the suggestion, only where attention and MLP are both watched."""

from __future__ import annotations

import math
import re

import pytest

from lora_monitor.adapters.kinds import groups_of
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.probe import ProbeReading, read_probe
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.outputs.tags import (
    MAX_SUMMARY_CARDS,
    OVERVIEW_TAG,
    RANK_GROUP,
    SUMMARY_GROUP,
    custom_scalars_layout,
    kind_tag,
    recommendation_scalars,
    snapshot_scalars,
)
from tests.helpers.factors import random_factors

LLAMA = ("q", "k", "v", "o", "gate_proj", "up_proj", "down_proj")


def _probe(r: int, groups: bool) -> ProbeReading:
    reading = read_probe(lambda k: math.exp(-3 * (1 - math.exp(-k / 1.5))), r)
    if not groups:
        return reading
    parts = {g: read_probe(lambda k: math.exp(-2 * (1 - math.exp(-k / 1.0))), r) for g in ("attention", "mlp")}
    return ProbeReading(reading.r, reading.losses, reading.rank, reading.low, reading.high, groups=parts)


@pytest.mark.parametrize("projections", [LLAMA, ("q", "v"), ("gate_proj", "up_proj", "down_proj")])
def test_eighty_layers_of_every_kind_fit_the_first_screen(projections):
    factors = random_factors(80, projections, rank=4, seed=0, n=8)
    analyses = analyze(Snapshot(step=1, factors=factors), None, "A")
    both = {"q", "gate_proj"} <= set(projections)
    recommendation = recommend_rank(analyses, probe=_probe(4, both), groups=groups_of(factors))
    scalars = snapshot_scalars(analyses) | recommendation_scalars(recommendation)
    opened = {tag for tag in scalars if tag.split("/")[0] in (RANK_GROUP, SUMMARY_GROUP)} | {OVERVIEW_TAG}
    assert len(opened) <= MAX_SUMMARY_CARDS, sorted(opened)
    for p in projections:  # every kind's spectral reading is on the first screen
        assert f"{SUMMARY_GROUP}/max_delta_w_gap_rank.{p}" in opened
    kinds = {kind_tag("attention"), kind_tag("mlp")}
    assert (kinds <= opened) == both and (kinds & opened == set()) == (not both)
    if both:
        assert scalars[kind_tag("mlp")] == recommendation.kinds["mlp"].rank
        assert len(opened) == 6 + 2 + 7 + 7  # rank cards, per-kind, max gap and one median per kind
        layout = custom_scalars_layout(list(factors))
        chart = layout[f"{RANK_GROUP}: suggested rank"]["suggested rank, its range, the probe's and the gap ranks"]
        assert any(re.search(pattern, kind_tag("mlp")) for pattern in chart[1])
