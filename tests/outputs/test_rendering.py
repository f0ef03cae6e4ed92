"""lora_monitor.outputs.rendering: the images of one snapshot drawn fast, against the matplotlib
figures: a φ heatmap card per drawn layer and the overview of every layer, sized for
TensorBoard's default card, frames and overviews reused (real analyses of random factors; no
training)."""

from __future__ import annotations

import numpy as np
import pytest

from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.outputs import overview, plots, rendering
from lora_monitor.outputs.tags import heatmap_tag
from tests.helpers.factors import random_factors


def test_phi_image_is_the_matplotlib_figure():
    rng = np.random.default_rng(0)
    grids = {(layer, p): rng.random((4, 16), dtype=np.float32) for layer in (0, 5) for p in ("q", "v")}
    rendering._FRAMES.clear()
    for column in ("A_{r=16}", r"A_{\mathrm{step}=10}"):  # the title changes, the frame is reused
        fast = rendering.phi_image(grids, row_symbol="A_{r=4}", column_symbol=column)
        slow = plots.figure_to_rgb(plots.phi_figure(grids, row_symbol="A_{r=4}", column_symbol=column))
        assert fast.shape == slow.shape and fast.dtype == np.uint8
        difference = np.abs(fast.astype(int) - slow.astype(int))
        assert difference.max() <= 8 and difference.mean() < 1
    assert len(rendering._FRAMES) == 1
    # Other data in the same frame: the heatmap pixels follow it.
    changed = rendering.phi_image({k: 1 - g for k, g in grids.items()}, row_symbol="A_{r=4}", column_symbol="A")
    assert np.abs(changed.astype(int) - fast.astype(int)).max() > 100


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


def test_the_overview_is_drawn_again_only_when_what_it_shows_changed(monkeypatch):
    current = random_factors(6, ("q", "v"), rank=8, seed=0, n=64)
    later = {key: f for key, f in current.items()}  # the same modules, another snapshot
    first = recommend_rank(analyze(Snapshot(step=5, factors=current)))
    again = recommend_rank(analyze(Snapshot(step=10, factors=later)))
    other = recommend_rank(analyze(Snapshot(step=15, factors=random_factors(6, ("q", "v"), rank=4, seed=3, n=64))))
    drawn = []
    real = overview.OverviewCanvas.image

    def counting(canvas, content):
        drawn.append(content)
        return real(canvas, content)

    monkeypatch.setattr(overview.OverviewCanvas, "image", counting)
    rendering._OVERVIEWS.clear()
    image = rendering.overview_image(first)
    assert np.array_equal(rendering.overview_image(again), image) and len(drawn) == 1
    changed = rendering.overview_image(other)  # r = 4: other bars, another dashed line
    assert len(drawn) == 2 and not np.array_equal(changed, image)
    _same_picture(image, plots.figure_to_rgb(overview.overview_figure(first)))


def _same_picture(fast: np.ndarray, whole: np.ndarray) -> None:
    """The same picture but where a bar or line meets an axis line (drawn in the other order)."""
    assert fast.shape == whole.shape
    difference = np.abs(fast.astype(int) - whole.astype(int)).max(axis=-1)
    assert (difference > 0).mean() < 0.01 and difference.mean() < 0.1


def _content(step: int, probe: bool) -> overview.OverviewContent:
    """An overview's content at ``step`` of a run whose gap ranks, suggestion and probe move."""
    shares = tuple((k, round(20 * min(1.0, k / (2 + step))) / 20) for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16))
    return overview.OverviewContent(
        modules=tuple(((layer, p), 16, 1 + (3 * layer + step) % 9) for layer in range(6) for p in ("q", "v")),
        projections=(("q", 2 + step), ("v", None if step == 2 else 4)),
        rank=None if step == 3 else 3 + step,
        low=2,
        high=5 + step,
        strength="weak evidence",
        probe=shares[: 4 + step] if probe else (),
        probe_rank=3 + step,
    )


def test_a_changed_overview_is_drawn_into_its_frame_as_the_whole_figure_draws_it():
    """Only what changed (bars, suggestion, the probe's curve, the titles with numbers) is drawn
    again, into the frame of the first content: the whole figure's picture every time, with no
    rank (no red line), a projection without a gap, without the probe."""
    rendering._OVERVIEWS.clear()
    rendering._OVERVIEW_CANVASES.clear()
    for probe in (True, False):
        images = []
        for step in range(5):
            content = _content(step, probe)
            images.append(rendering.content_overview_image(content))
            _same_picture(images[-1], plots.figure_to_rgb(overview.draw_overview(content)))
        assert len({image.tobytes() for image in images}) == 5
    assert len(rendering._OVERVIEW_CANVASES) == 2  # one frame with the probe's panel, one without
    canvas = overview.OverviewCanvas(_content(0, True))
    with pytest.raises(ValueError, match="another structure"):
        canvas.image(_content(0, False))


def test_phi_figures_put_their_columns_in_block_order_whatever_order_the_grids_come_in():
    grids = {(0, "v"): np.eye(2), (0, "down_proj"): np.eye(2), (0, "q"): np.eye(2), (0, "gate_proj"): np.eye(2)}
    assert plots.in_block_order(p for _, p in grids) == ["q", "v", "gate_proj", "down_proj"]
    for card in (False, True):
        figure = plots.phi_figure(grids, row_symbol="A", column_symbol="A", card=card)
        titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
        assert titles == [plots.projection_label(p) for p in ("q", "v", "gate_proj", "down_proj")], titles


def test_panels_are_labelled_by_kind_whatever_the_architecture_names_them():
    llama = ("q", "k", "v", "o", "gate_proj", "up_proj", "down_proj")
    bert = ("q", "k", "v", "attention.output.dense", "intermediate.dense", "output.dense")
    gpt2 = ("q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    kinds = [r"\Delta W_" + kind for kind in ("q", "k", "v", "o")]
    kinds += [r"\Delta W_{\mathrm{" + kind + "}}" for kind in ("gate", "up", "down")]
    assert [plots.projection_label(p) for p in llama] == [f"${label}$" for label in kinds]
    assert [plots.projection_label(p) for p in bert] == [f"${label}$" for label in kinds[:4] + kinds[5:]]
    assert [plots.projection_label(p) for p in gpt2] == [f"${label}$" for label in kinds[:4] + kinds[5:]]
    # Experts of one layer share a kind but never a label; an unknown module keeps its name.
    experts = [f"block_sparse_moe.experts.{e}.w1" for e in range(3)]
    assert len({plots.projection_label(p) for p in experts}) == 3
    assert plots.projection_label("score") == r"$\Delta W_{\mathrm{score}}$"
