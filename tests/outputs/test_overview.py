"""lora_monitor.outputs.plots: the overview figure of every layer against r and the suggested rank
(real analyses of random factors; no training)."""

from __future__ import annotations

from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.outputs import plots, rendering
from lora_monitor.outputs.tags import OVERVIEW_TAG
from tests.helpers.factors import random_factors


def test_overview_draws_every_layer_against_r_and_the_suggestion():
    # 80 layers of rank 16; the reference shares the q modules and nothing of the v modules.
    current = random_factors(80, ("q", "v"), rank=16, seed=0, n=64)
    other = random_factors(80, ("q", "v"), rank=16, seed=1, n=64)
    reference = {key: current[key] if key[1] == "q" else other[key] for key in current}
    recommendation = recommend_rank(analyze(Snapshot(step=5, factors=current), reference, "A"), "A")
    assert recommendation.projections["v"] is None
    assert recommendation.compared and recommendation.rank
    figure = plots.overview_figure(recommendation)
    assert figure.get_size_inches()[0] * figure.dpi == plots.CARD_WIDTH
    axes = figure.axes
    assert len(axes) == 2  # a panel per projection
    for ax, projection in zip(axes, ("q", "v")):
        modules = [m for m in recommendation.modules if m.key[1] == projection]
        bars = ax.patches
        assert [round(b.get_x() + b.get_width() / 2) for b in bars] == list(range(80))
        assert [b.get_height() for b in bars] == [m.suggested for m in modules]
        # The suggestion is the largest bar, drawn as a line (none for v); r as a dashed one.
        suggestions = [line for line in ax.lines if line.get_linestyle() == "-" and len(line.get_ydata()) == 2]
        if projection == "q":
            assert suggestions[0].get_ydata()[0] == recommendation.projections["q"] == max(m.suggested for m in modules)
            assert f"suggested {recommendation.projections['q']}, r = 16" in ax.get_title(loc="right")
        else:
            assert suggestions == [] and "suggested none, r = 16" in ax.get_title(loc="right")
        assert ax.get_title(loc="left") == plots.projection_label(projection)
        (r_line,) = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert set(r_line.get_ydata()) == {16}
    texts = " ".join(t.get_text() for t in figure.texts)
    assert f"suggested LoRA rank {recommendation.rank}" in texts
    image = rendering.snapshot_images({}, layers=[], row_symbol="A", column_symbol="A", recommendation=recommendation)
    assert list(image) == [OVERVIEW_TAG] and image[OVERVIEW_TAG].shape[1] == plots.CARD_WIDTH
