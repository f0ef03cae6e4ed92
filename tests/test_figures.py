"""The images of one snapshot: a φ heatmap card per drawn layer and the overview of every layer,
sized for TensorBoard's default card (real analyses of random factors; no training)."""

from __future__ import annotations

import numpy as np

from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.outputs import plots, rendering
from lora_monitor.outputs.tags import OVERVIEW_TAG, heatmap_tag
from tests.helpers.factors import random_factors


def test_a_card_per_layer_one_frame_for_all_and_the_matplotlib_picture():
    rng = np.random.default_rng(0)
    layers = (0, 10, 21, 31)
    grids = {(layer, p): rng.random((8, 64), dtype=np.float32) for layer in layers for p in ("q", "v")}
    symbols = dict(row_symbol="A_{r=8}", column_symbol="A_{r=64}")
    rendering._FRAMES.clear()
    images = rendering.snapshot_images(grids, layers=layers, **symbols)
    assert list(images) == [heatmap_tag(layer) for layer in layers]
    assert {image.shape for image in images.values()} == {(325, plots.CARD_WIDTH, 3)}
    # The layer is named in the title only, so the four layers share one cached frame.
    assert len(rendering._FRAMES) == 1
    for layer in (0, 31):
        layer_grids = {key: grid for key, grid in grids.items() if key[0] == layer}
        slow = plots.figure_to_rgb(plots.phi_figure(layer_grids, **symbols, card=True, title_prefix=f"Layer {layer}: "))
        difference = np.abs(images[heatmap_tag(layer)].astype(int) - slow.astype(int))
        assert difference.max() <= 8 and difference.mean() < 1
    # Layers of other data differ where their heatmaps are.
    assert np.abs(images[heatmap_tag(0)].astype(int) - images[heatmap_tag(31)].astype(int)).max() > 100


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


def test_the_overview_is_drawn_again_only_when_what_it_shows_changed(monkeypatch):
    current = random_factors(6, ("q", "v"), rank=8, seed=0, n=64)
    later = {key: f for key, f in current.items()}  # the same modules, another snapshot
    first = recommend_rank(analyze(Snapshot(step=5, factors=current), None, "A"), "A", reference_is_run=False)
    again = recommend_rank(analyze(Snapshot(step=10, factors=later), None, "A"), "A", reference_is_run=False)
    other = recommend_rank(
        analyze(Snapshot(step=15, factors=random_factors(6, ("q", "v"), rank=4, seed=3, n=64)), None, "A"),
        "A",
        reference_is_run=False,
    )
    drawn = []
    real = plots.overview_figure

    def counting(recommendation):
        drawn.append(recommendation)
        return real(recommendation)

    monkeypatch.setattr(plots, "overview_figure", counting)
    rendering._OVERVIEWS.clear()
    image = rendering.overview_image(first)
    assert np.array_equal(rendering.overview_image(again), image) and len(drawn) == 1
    changed = rendering.overview_image(other)  # r = 4: other bars, another dashed line
    assert len(drawn) == 2 and not np.array_equal(changed, image)
    assert np.array_equal(image, plots.figure_to_rgb(real(first)))
