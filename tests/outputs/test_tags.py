"""lora_monitor.outputs.tags: tag names, the summary groups' budget, the suggested rank as scalars
and the custom-scalars layout, on real analyses of random LoRA factors (no training: the
functions are pure)."""

from __future__ import annotations

import re
from statistics import median

import pytest
from torch.utils.tensorboard.summary import custom_scalars

from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.outputs.tags import (
    MAX_SUMMARY_CARDS,
    OPTIONAL_SCALAR_NAMES,
    OVERVIEW_TAG,
    RANK_GROUP,
    RECOMMENDATION_TAG,
    SCALAR_NAMES,
    SUMMARY_GROUP,
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


@pytest.fixture(scope="module")
def deep_analyses():
    """A 32-layer model, q and v, compared with another run of another rank."""
    current = random_factors(32, ("q", "v"), rank=8, seed=0)
    reference = random_factors(32, ("q", "v"), rank=4, seed=1)
    initial = random_factors(32, ("q", "v"), rank=8, seed=2)
    return analyze(Snapshot(step=10, factors=current), reference, "A", initial=initial)


def test_per_layer_series_in_their_own_groups_summary_bounded(deep_analyses):
    scalars = snapshot_scalars(deep_analyses)
    per_layer = {tag for tag in scalars if group(tag).startswith("lora_monitor.")}
    # Every module's every scalar, under the module's own name; the tag names the matrix.
    assert per_layer == {scalar_tag(name, key) for key, a in deep_analyses.items() for name in a.scalars}
    assert scalar_tag("delta_w_energy_rank", (3, "q")) == "lora_monitor.delta_w_energy_rank/layer_03.q"
    assert scalar_tag("phi_top", (31, "v")) == "lora_monitor.phi_top/layer_31.v"
    assert all(re.search(r"/layer_\d\d\.[qv]$", tag) for tag in per_layer)
    # The rest are medians over the 32 layers, in the summary group.
    summary = set(scalars) - per_layer
    assert {group(tag) for tag in summary} == {SUMMARY_GROUP}
    assert summary_metrics(2) == (
        "shared_directions",
        "delta_w_energy_rank",
        "phi_top",
        "delta_w_relative_norm",
        "a_init_similarity",
    )
    for name in summary_metrics(2):
        for p in ("q", "v"):
            expected = median(a.scalars[name] for (_, q), a in deep_analyses.items() if q == p)
            assert scalars[summary_tag(name, p)] == pytest.approx(expected)
    suggested = recommendation_scalars(recommend_rank(deep_analyses, "A"))
    assert {group(tag) for tag in suggested} == {RANK_GROUP}
    # What TensorBoard opens: the two capitalized groups, the overview figure among them.
    opened = summary | set(suggested) | {OVERVIEW_TAG}
    assert len(opened) <= MAX_SUMMARY_CARDS
    assert all(is_monitor_tag(tag) for tag in scalars.keys() | suggested.keys() | {RECOMMENDATION_TAG})
    assert not is_monitor_tag("epoch") and not is_monitor_tag("lora_monitorx/a")


@pytest.mark.parametrize("projections", [1, 2, 4, 7, 11, 21])
def test_summary_budget_holds_for_any_number_of_projections(projections):
    names = tuple(f"p{i}" for i in range(projections))
    analyses = analyze(Snapshot(step=1, factors=random_factors(2, names, rank=2, seed=3)), None, "A")
    scalars = snapshot_scalars(analyses)
    suggested = recommendation_scalars(recommend_rank(analyses, "A"))
    opened = [t for t in scalars if group(t) == SUMMARY_GROUP] + list(suggested) + [OVERVIEW_TAG]
    assert len(opened) <= MAX_SUMMARY_CARDS
    # Fewer projections leave room for more medians; one projection gets every one of them.
    assert len(summary_metrics(1)) == 5 and len(summary_metrics(2)) == 5 and len(summary_metrics(7)) == 2


def test_suggested_rank_scalars(deep_analyses):
    spectra = recommend_rank(deep_analyses, "A", reference_is_run=False)  # energy ranks of ΔW
    scalars = recommendation_scalars(spectra)
    assert spectra.rank and scalars["LoRA_rank/suggested.model"] == spectra.rank
    assert scalars["LoRA_rank/suggested.q"] == spectra.projections["q"]
    assert scalars["LoRA_rank/suggested.v"] == spectra.projections["v"]
    assert scalars["LoRA_rank/weak_evidence"] == 1.0  # spectrum only
    # Two random runs share nothing: no rank is supported, which logs as 0.
    compared = recommend_rank(deep_analyses, "A")
    assert compared.rank is None
    assert recommendation_scalars(compared)["LoRA_rank/suggested.model"] == 0.0


def test_custom_scalars_layout_covers_every_series(deep_analyses):
    scalars = snapshot_scalars(deep_analyses)
    scalars |= recommendation_scalars(recommend_rank(deep_analyses, "A"))
    layout = custom_scalars_layout(sorted(deep_analyses))
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
