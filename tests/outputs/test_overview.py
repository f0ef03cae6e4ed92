"""lora_monitor.outputs.overview: the overview of every layer against r and the suggestion, and
the probe's curve (real analyses of random factors and a probe reading; no training)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.probe import read_probe
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.analysis.rank_rule import RULE
from lora_monitor.outputs import overview, plots, rendering
from lora_monitor.outputs.tags import OVERVIEW_TAG
from tests.helpers.factors import random_factors


def _probe(r: int):
    return read_probe(lambda k: 1e-3 * math.exp(-3 * (1 - math.exp(-k / 1.5))), r)


def test_overview_draws_every_layer_against_r_and_the_suggestion():
    factors = random_factors(80, ("q", "v"), rank=16, seed=0, n=64)
    recommendation = recommend_rank(analyze(Snapshot(step=5, factors=factors)), probe=_probe(16))
    assert recommendation.rank and recommendation.low < recommendation.high
    figure = overview.overview_figure(recommendation)
    assert figure.get_size_inches()[0] * figure.dpi == plots.CARD_WIDTH
    assert figure.get_size_inches()[1] * figure.dpi <= 217  # one row: TensorBoard shows it unshrunk
    *gap_axes, probe_ax = figure.axes
    assert len(gap_axes) == 2  # a panel per projection, then the probe's
    for ax, projection in zip(gap_axes, ("q", "v")):
        modules = [m for m in recommendation.modules if m.key[1] == projection]
        bars = ax.patches
        assert [round(b.get_x() + b.get_width() / 2) for b in bars] == list(range(80))
        assert [b.get_height() for b in bars] == [m.delta_w_gap_rank for m in modules]
        # The model's suggestion as a solid line, r as a dashed one.
        (suggestion,) = [line for line in ax.lines if line.get_linestyle() == "-" and len(line.get_ydata()) == 2]
        assert suggestion.get_ydata()[0] == recommendation.rank
        gap = recommendation.projections[projection]
        assert f"gap {gap or 'none'}, r = 16" in ax.get_title(loc="right")
        assert ax.get_title(loc="left") == plots.projection_label(projection)
        (r_line,) = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert set(r_line.get_ydata()) == {16}
    # The probe: the share kept at every k read, the 95 % line, the suggestion.
    (curve,) = [line for line in probe_ax.lines if len(line.get_xdata()) > 2]
    probe = recommendation.probe
    assert list(curve.get_xdata()) == [k for k in probe.losses if k > 0]
    assert np.allclose(curve.get_ydata(), [probe.kept(k) for k in probe.losses if k > 0], atol=0.025)
    assert any(list(line.get_ydata()) == [RULE.keep, RULE.keep] for line in probe_ax.lines)
    assert any(list(line.get_xdata()) == [recommendation.rank] * 2 for line in probe_ax.lines)
    assert probe_ax.get_title(loc="right") == f"rank {probe.rank}"
    texts = " ".join(t.get_text() for t in figure.texts)
    assert f"suggested rank {recommendation.rank}, likely {recommendation.low}–{recommendation.high}: " in texts
    image = rendering.snapshot_images({}, layers=[], row_symbol="A", column_symbol="A", recommendation=recommendation)
    assert list(image) == [OVERVIEW_TAG] and image[OVERVIEW_TAG].shape[1] == plots.CARD_WIDTH


def test_without_a_probe_the_overview_has_the_projections_only():
    factors = random_factors(4, ("q", "k", "v"), rank=8, seed=1, n=32)
    figure = overview.overview_figure(recommend_rank(analyze(Snapshot(step=5, factors=factors))))
    assert len(figure.axes) == 3 and "probe" not in " ".join(ax.get_title(loc="left") for ax in figure.axes)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_heading_and_the_titles_fit_their_card_whatever_they_say():
    """A run told "r may be too small" has the longest heading, three panels a row the narrowest
    titles: the heading stays inside the card and no panel's two titles run into each other,
    drawn whole or into a kept frame (``OverviewCanvas``)."""
    factors = random_factors(4, ("q", "v"), rank=16, seed=0, n=64)
    every_direction = read_probe(lambda k: 1e-3 * math.exp(-3 * min(1, k / 13)), 16)  # 12 of 16 keep 92 %
    long = recommend_rank(analyze(Snapshot(step=5, factors=factors)), probe=every_direction)
    assert long.too_small and long.low < long.high
    short = recommend_rank(analyze(Snapshot(step=5, factors=factors)), probe=_probe(16))
    assert overview.overview_structure(overview.overview_content(long)) == overview.overview_structure(
        overview.overview_content(short)
    )
    canvas = overview.OverviewCanvas(overview.overview_content(short))
    canvas.image(overview.overview_content(long))  # the frame of the short one, the texts of the long one
    for figure in (overview.overview_figure(long), canvas.figure):
        renderer = FigureCanvasAgg(figure).get_renderer()
        card = figure.bbox
        (heading,) = [t for t in figure.texts if t.get_text().startswith("suggested rank")]
        assert "r may be too small" in heading.get_text()
        box = heading.get_window_extent(renderer)
        assert card.x0 <= box.x0 and box.x1 <= card.x1, (box, card)
        for ax in figure.axes:
            left, right = ax._left_title, ax._right_title  # set_title(loc="left" | "right")
            assert not _overlaps(left.get_window_extent(renderer), right.get_window_extent(renderer)), (
                left.get_text(),
                right.get_text(),
            )
