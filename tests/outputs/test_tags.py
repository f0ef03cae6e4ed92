"""lora_monitor.outputs.tags: tag names, the summary groups' budget, the suggested rank as scalars
and the custom-scalars layout, on real analyses of random LoRA factors (no training: the
functions are pure)."""

from __future__ import annotations

import math
import re
from statistics import median

import pytest
from torch.utils.tensorboard.summary import custom_scalars

from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.probe import read_probe
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.outputs.tags import (
    COMPARISON_METRICS,
    MAX_SUMMARY_CARDS,
    OPTIONAL_SCALAR_NAMES,
    OVERVIEW_TAG,
    RANK_GROUP,
    RECOMMENDATION_TAG,
    SCALAR_NAMES,
    SUMMARY_GROUP,
    SUMMARY_METRICS,
    custom_scalars_layout,
    is_monitor_tag,
    recommendation_scalars,
    scalar_tag,
    snapshot_scalars,
    summary_metrics,
    summary_tag,
)
from tests.helpers.factors import random_factors


def group(tag: str) -> str:
    return tag.split("/", 1)[0]


def probed(analyses, compared: bool = False):
    """The recommendation with a probe whose log loss falls by 1 − exp(−k/1.5): rank 5, 4–6."""
    r = max(a.singular_values.numel() for a in analyses.values())
    probe = read_probe(lambda k: 1e-3 * math.exp(-3 * (1 - math.exp(-k / 1.5))), r)
    return recommend_rank(analyses, probe=probe, reference_is_run=compared)


@pytest.fixture(scope="module")
def deep_analyses():
    """A 32-layer model, q and v, compared with another run of another rank."""
    current = random_factors(32, ("q", "v"), rank=8, seed=0)
    reference = random_factors(32, ("q", "v"), rank=4, seed=1)
    initial = random_factors(32, ("q", "v"), rank=8, seed=2)
    return analyze(Snapshot(step=10, factors=current), reference, "A", initial=initial)


def test_per_layer_series_in_their_own_groups_summary_bounded(deep_analyses):
    scalars = snapshot_scalars(deep_analyses, compares_runs=True)
    per_layer = {tag for tag in scalars if group(tag).startswith("lora_monitor.")}
    # Every module's every scalar, under the module's own name; the tag names the matrix.
    assert per_layer == {scalar_tag(name, key) for key, a in deep_analyses.items() for name in a.scalars}
    assert scalar_tag("delta_w_energy_rank", (3, "q")) == "lora_monitor.delta_w_energy_rank/layer_03.q"
    assert scalar_tag("phi_top", (31, "v")) == "lora_monitor.phi_top/layer_31.v"
    assert all(re.search(r"/layer_\d\d\.[qv]$", tag) for tag in per_layer)
    # The rest are medians over the 32 layers, in the summary group.
    summary = set(scalars) - per_layer
    assert {group(tag) for tag in summary} == {SUMMARY_GROUP}
    assert summary_metrics(2, compares_runs=True) == COMPARISON_METRICS + SUMMARY_METRICS
    for name in summary_metrics(2, compares_runs=True):
        for p in ("q", "v"):
            expected = median(a.scalars[name] for (_, q), a in deep_analyses.items() if q == p)
            assert scalars[summary_tag(name, p)] == pytest.approx(expected)
    suggested = recommendation_scalars(probed(deep_analyses, compared=True))
    assert {group(tag) for tag in suggested} == {RANK_GROUP, SUMMARY_GROUP}  # max gap ranks: a summary
    # What TensorBoard opens: the two capitalized groups, the overview figure among them.
    opened = summary | set(suggested) | {OVERVIEW_TAG}
    assert len(opened) <= MAX_SUMMARY_CARDS
    assert all(is_monitor_tag(tag) for tag in scalars.keys() | suggested.keys() | {RECOMMENDATION_TAG})
    assert not is_monitor_tag("epoch") and not is_monitor_tag("lora_monitorx/a")


def test_two_snapshots_of_one_run_show_no_shared_directions_beside_the_suggestion(deep_analyses):
    """In A's basis against the run's own early snapshot, φ reads how little A moved from its
    random init: per layer it stays (the paper's analysis), in the summary it is not evidence."""
    scalars = snapshot_scalars(deep_analyses)
    summary = {tag for tag in scalars if group(tag) == SUMMARY_GROUP}
    assert summary == {summary_tag(name, p) for name in SUMMARY_METRICS for p in ("q", "v")}
    assert not any(name in tag for tag in summary for name in COMPARISON_METRICS)
    assert scalar_tag("shared_directions", (0, "q")) in scalars


@pytest.mark.parametrize("projections", [1, 2, 4, 7, 11, 18])
def test_summary_budget_holds_for_any_number_of_projections(projections):
    names = tuple(f"p{i}" for i in range(projections))
    analyses = analyze(Snapshot(step=1, factors=random_factors(2, names, rank=2, seed=3)), None, "A")
    scalars = snapshot_scalars(analyses, compares_runs=True)
    suggested = recommendation_scalars(probed(analyses))
    opened = [t for t in scalars if group(t) == SUMMARY_GROUP] + list(suggested) + [OVERVIEW_TAG]
    assert len(opened) <= MAX_SUMMARY_CARDS
    # Fewer projections leave room for more medians; one projection gets every one of them.
    assert len(summary_metrics(1, True)) == 6 and len(summary_metrics(2, True)) == 6
    assert len(summary_metrics(7)) == 1


def test_suggested_rank_scalars(deep_analyses):
    recommendation = probed(deep_analyses)
    scalars = recommendation_scalars(recommendation)
    assert recommendation.probe.rank == 5
    assert scalars["LoRA_rank/suggested.model"] == recommendation.rank == max(5, recommendation.spectral or 0)
    assert scalars["LoRA_rank/suggested.probe_rank"] == 5
    # TensorBoard sorts a group's cards by name: the suggestion is the first scalar of its group.
    assert min(tag for tag in scalars if tag.startswith("LoRA_rank/")) == "LoRA_rank/suggested.model"
    assert scalars["LoRA_rank/suggested.range_low"] == recommendation.low == 4
    assert scalars["LoRA_rank/suggested.range_high"] == recommendation.high
    assert scalars["LoRA_summary/max_delta_w_gap_rank.q"] == (recommendation.projections["q"] or 0)
    assert scalars["LoRA_summary/max_delta_w_gap_rank.v"] == (recommendation.projections["v"] or 0)
    assert scalars["LoRA_rank/weak_evidence"] == float(recommendation.weak)
    # Without a probe: the gaps alone, weak; no probe or range tags.
    spectral = recommendation_scalars(recommend_rank(deep_analyses))
    assert spectral["LoRA_rank/weak_evidence"] == 1.0
    assert not {
        "LoRA_rank/suggested.probe_rank",
        "LoRA_rank/suggested.range_low",
        "LoRA_rank/suggested.range_high",
    } & set(spectral)


def test_no_supported_rank_logs_zero():
    noise = random_factors(2, ("q",), rank=1, seed=4)  # a single direction: no gap to read
    recommendation = recommend_rank(analyze(Snapshot(step=1, factors=noise)))
    assert recommendation.rank is None
    assert recommendation_scalars(recommendation)["LoRA_rank/suggested.model"] == 0.0


def test_custom_scalars_layout_covers_every_series(deep_analyses):
    scalars = snapshot_scalars(deep_analyses, compares_runs=True)
    scalars |= recommendation_scalars(probed(deep_analyses, compared=True))
    layout = custom_scalars_layout(sorted(deep_analyses), compares_runs=True)
    custom_scalars(layout)  # TensorBoard's own serializer accepts it
    charts = [(title, regexes) for category in layout.values() for title, (_, regexes) in category.items()]
    for tag in scalars:
        matching = [title for title, regexes in charts if any(re.search(r, tag) for r in regexes)]
        assert len(matching) == 1, (tag, matching)
    # One chart per projection and per-layer metric, its lines the 32 layers.
    for name in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES:
        metric = name
        for p in ("q", "v"):
            kind, (regex,) = layout[f"lora_monitor.{metric}: per layer"][f"{metric} of {p}, layers as lines"]
            assert kind == "Multiline"
            lines = {tag for tag in scalars if re.search(regex, tag)}
            expected = {scalar_tag(name, (layer, p)) for layer in range(32) if name in deep_analyses[layer, p].scalars}
            assert lines == expected
