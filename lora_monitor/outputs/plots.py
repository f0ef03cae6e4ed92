"""The figures: φ heatmaps laid out like the LoRA paper's Section 7 / Appendix H figures and a
TensorBoard card per layer (the overview of every layer is :mod:`lora_monitor.outputs.overview`;
:mod:`lora_monitor.outputs.rendering` draws them fast, snapshot after snapshot).

Pure matplotlib (the object-oriented API, no pyplot state), so figures can be drawn from a
training process without a display and without touching other figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import matplotlib
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec

from lora_monitor.adapters import ModuleKey
from lora_monitor.adapters.kinds import KIND_GROUPS, block_order, module_kind
from lora_monitor.functional.bases import basis_info
from lora_monitor.functional.similarity import random_subspace_similarity, sample_random_subspace_similarity

#: Matplotlib colour map of the heatmaps (dark = 0, light = 1, as in the paper) and the grey of
#: masked cells.
COLORMAP = "magma"
MASK_COLOR = "#c8ccd4"
DPI = 100


def phi_colormap() -> Colormap:
    return matplotlib.colormaps[COLORMAP].with_extremes(bad=MASK_COLOR)


def in_block_order(projections: Iterable[str]) -> list[str]:
    """The distinct ``projections`` as a block holds them (q, k, v, o, gate, up, down), the
    others after them as first seen: the columns of every φ figure."""
    return sorted(dict.fromkeys(projections), key=block_order)


def projection_label(projection: str) -> str:
    """A module's label in the figures, by its kind where its name tells one (q, k, v, o, gate,
    up, down): ``"q"`` → ``$\\Delta W_{q}$``, Llama's ``"gate_proj"`` and BERT's
    ``"intermediate.dense"`` → ``$\\Delta W_{\\mathrm{gate}}$`` and ``…{up}``, so that an
    all-linear adapter's panels read alike whatever the architecture calls them. A name with a
    number in it (a mixture of experts' ``experts.0.w1``) or of no known kind keeps its own name:
    two modules of one layer never share a label."""
    kind = module_kind(projection)
    if kind in KIND_GROUPS and not any(part.isdigit() for part in projection.split(".")):
        projection = kind
    if len(projection) == 1:
        return rf"$\Delta W_{projection}$"
    return r"$\Delta W_{\mathrm{" + projection.replace("_", r"\_") + "}}$"


def _ticks(n: int, most: int) -> np.ndarray:
    """1-based tick positions, at most ``most`` of them, always including 1 and n."""
    return np.unique(np.linspace(1, n, min(n, most)).round().astype(int))


def _draw_panel(
    ax, phi: np.ndarray, cmap: Colormap, masked_upper: bool, x_ticks: bool, y_ticks: bool, labelsize: float = 7
):
    p, q = phi.shape
    if masked_upper:
        i, j = np.indices(phi.shape)
        phi = np.ma.masked_where(j > i, phi)
    image = ax.imshow(
        phi,
        vmin=0.0,
        vmax=1.0,
        cmap=cmap,
        aspect="auto",
        interpolation="nearest",
        extent=(0.5, q + 0.5, p + 0.5, 0.5),
    )
    # Panels of a column share j, panels of a row share i: ticks on the outer panels only, as
    # with shared axes (tick objects are most of the time it takes to draw the figure).
    # Larger labels (a card's) get fewer ticks, and a zoom panel, a third of the width, fewer still.
    most_x = 11 if labelsize < 9 else (3 if masked_upper else 5)
    ax.set_xticks(_ticks(q, most_x) if x_ticks else [])
    ax.set_yticks(_ticks(p, 8 if labelsize < 9 else 4) if y_ticks else [])
    ax.tick_params(labelsize=labelsize, length=2)
    return image


def phi_figure(
    grids: Mapping[ModuleKey, np.ndarray],
    *,
    row_symbol: str,
    column_symbol: str,
    zoom: Optional[bool] = None,
    layers: Optional[Sequence[int]] = None,
    projections: Optional[Sequence[str]] = None,
    extra_rows: Optional[Mapping[str, np.ndarray]] = None,
    card: bool = False,
    title_prefix: str = "",
) -> Figure:
    """One grid figure of φ heatmaps: a row per layer, a column per projection.

    Args:
        grids: ``(layer, projection) → φ`` of shape ``(p, q)``, rows indexing ``i`` (the
            ``row_symbol`` side) and columns ``j``.
        row_symbol, column_symbol: mathtext for the two sides, e.g. ``"A_{r=8}"`` and
            ``"A_{r=64}"``; the title reads ``φ(row_symbol, column_symbol, i, j)``.
        zoom: add, per projection, a zoom on ``i, j ≤ p`` with the cells ``j > i`` masked grey
            (the right half of the paper's rank-8-vs-64 figure). Default: when ``p < q``.
        layers, projections: order of rows and columns; default: sorted / block order (:func:`in_block_order`).
        extra_rows: ``label → (p, q) grid`` drawn as further rows below the layers, the same grid
            in every column (e.g. the φ of random subspaces: what "nothing shared" looks like).

        card: the layout of a TensorBoard card instead (:func:`_card_figure`): one layer,
            :data:`CARD_WIDTH` pixels wide, larger labels; ``title_prefix`` (the layer) stands
            at the left of its title.

    Returns:
        A matplotlib ``Figure`` (no pyplot state), 0..1 colour scale with one colour bar.
    """
    if not grids:
        raise ValueError("phi_figure: no φ grids to draw")
    if card:
        return _card_figure(grids, row_symbol, column_symbol, zoom, projections, title_prefix)
    layers = list(layers) if layers is not None else sorted({layer for layer, _ in grids})
    if projections is None:
        projections = in_block_order(projection for _, projection in grids)
    p, q = next(iter(grids.values())).shape
    if zoom is None:
        zoom = p < q
    extra_rows = dict(extra_rows or {})
    rows = [(f"Layer {layer}", layer) for layer in layers] + [(label, None) for label in extra_rows]
    columns = [(projection, False) for projection in projections]
    if zoom:
        columns += [(projection, True) for projection in projections]
    width_ratios = [1.6 if zoomed else 3.0 for _, zoomed in columns]
    width, height = sum(width_ratios) + 1.6, 1.5 * len(rows) + 0.9
    figure, grid = _panel_grid(width, height, len(rows), width_ratios, 0.12, (0.9, 0.6, 0.5, 0.6), 0.25, 0.35)
    axes = np.array(
        [[figure.add_subplot(grid[row, column]) for column in range(len(columns))] for row in range(len(rows))]
    )
    cmap = phi_colormap()
    image = None
    for row, (label, layer) in enumerate(rows):
        for column, (projection, zoomed) in enumerate(columns):
            ax = axes[row, column]
            phi = grids.get((layer, projection)) if layer is not None else extra_rows[label]
            if phi is None:
                ax.set_axis_off()
                continue
            phi = np.asarray(phi, dtype=np.float32)
            if zoomed:
                side = min(phi.shape)
                phi = phi[:side, :side]
            last_row, first_column = row == len(rows) - 1, column in (0, len(projections))
            image = _draw_panel(ax, phi, cmap, masked_upper=zoomed, x_ticks=last_row, y_ticks=first_column)
            if row == 0:
                ax.set_title(projection_label(projection), fontsize=10)
            if row == len(rows) - 1:
                ax.set_xlabel("j", fontsize=9)
            if column == 0:
                ax.set_ylabel(f"{label}\ni", fontsize=9)
    # Placed in inches from the top, like the axes: a fraction would sink into the column
    # titles of a tall figure.
    figure.suptitle(rf"$\phi({row_symbol}, {column_symbol}, i, j)$", fontsize=12, y=1 - 0.08 / height)
    if image is not None:
        figure.colorbar(image, cax=figure.add_subplot(grid[:, -1]), label=r"$\phi$")
    return figure


#: Width in pixels of the images logged to TensorBoard: the widest its default card shows
#: without shrinking them (about 455 px at 1600 px, measured with docs/screenshot.py).
CARD_WIDTH = 450
#: Font size of the card figures' labels (points = pixels at :data:`DPI`).
CARD_FONT = 11


def _panel_grid(
    width: float,
    height: float,
    rows: int,
    width_ratios: list[float],
    bar: float,
    margins: tuple[float, float, float, float],
    wspace: float,
    hspace: float,
) -> tuple[Figure, GridSpec]:
    """A ``width`` × ``height`` inch figure and its grid: ``rows`` rows of panels as wide as
    ``width_ratios``, then the colour bar's column (``bar``); ``margins`` (left, right, bottom,
    top) in inches. A fixed layout, not matplotlib's constrained one: measuring every tick label
    costs seconds."""
    left, right, bottom, top = margins
    figure = Figure(figsize=(width, height), dpi=DPI)
    grid = figure.add_gridspec(
        rows,
        len(width_ratios) + 1,
        width_ratios=width_ratios + [bar],
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wspace,
        hspace=hspace,
    )
    return figure, grid


def _card_figure(
    grids: Mapping[ModuleKey, np.ndarray],
    row_symbol: str,
    column_symbol: str,
    zoom: Optional[bool],
    projections: Optional[Sequence[str]],
    title_prefix: str,
) -> Figure:
    """The φ heatmaps of one layer sized for a TensorBoard card (:data:`CARD_WIDTH` wide).

    With a zoom (the reference's rank smaller), a row per projection: the whole p × q grid and
    its masked p × p zoom. Without one, the square grids two to a row. The layer appears only in
    ``title_prefix``, so that every layer can share one cached frame
    (:func:`lora_monitor.outputs.rendering.phi_image`).
    """
    if projections is None:
        projections = in_block_order(projection for _, projection in grids)
    by_projection = {projection: phi for (_, projection), phi in grids.items()}
    p, q = next(iter(grids.values())).shape
    if zoom is None:
        zoom = p < q
    if zoom:
        cells = [[(projection, False), (projection, True)] for projection in projections]
        width_ratios, panel_height = [3.0, 1.0], 1.15
    else:
        pairs = [list(projections[i : i + 2]) for i in range(0, len(projections), 2)]
        cells = [[(projection, False) for projection in pair] for pair in pairs]
        width_ratios, panel_height = [1.0] * min(2, len(projections)), 1.6
    width = CARD_WIDTH / DPI
    height = panel_height * len(cells) + 0.95
    margins = (0.62, 0.45, 0.45, 0.5)
    figure, grid = _panel_grid(width, height, len(cells), width_ratios, 0.08, margins, 0.2 if zoom else 0.35, 0.45)
    cmap = phi_colormap()
    image = None
    for row, cells_of_row in enumerate(cells):
        for column, (projection, zoomed) in enumerate(cells_of_row):
            ax = figure.add_subplot(grid[row, column])
            phi = np.asarray(by_projection[projection], dtype=np.float32)
            if zoomed:
                side = min(phi.shape)
                phi = phi[:side, :side]
            image = _draw_panel(
                ax, phi, cmap, zoomed, x_ticks=True, y_ticks=column == 0 or zoomed, labelsize=CARD_FONT - 2
            )
            label = projection_label(projection) + (r"$,\ i, j \leq$" + f"{min(p, q)}" if zoomed else "")
            ax.set_title(label, fontsize=CARD_FONT, pad=3)
            if column == 0:
                ax.set_ylabel("i", fontsize=CARD_FONT, rotation=0, ha="right", va="center")  # a lying "i" reads as "-"
            if row == len(cells) - 1:
                ax.set_xlabel("j", fontsize=CARD_FONT, labelpad=1)
    title_y = 1 - 0.06 / height
    figure.suptitle(rf"$\phi({row_symbol}, {column_symbol}, i, j)$", fontsize=CARD_FONT + 1, y=title_y)
    # The layer stands apart, at the left: its text never changes in a run, while the symbols'
    # steps change at every snapshot and every mathtext title costs a parse.
    if title_prefix:
        figure.text(0.01, title_y, title_prefix.rstrip(": "), fontsize=CARD_FONT + 1, ha="left", va="top")
    assert image is not None  # every card draws a panel
    figure.colorbar(image, cax=figure.add_subplot(grid[:, -1])).ax.tick_params(labelsize=CARD_FONT - 2)
    return figure


def random_baseline_rows(n: int, p: int, q: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The two rows of "no shared direction" for ``(p, q)`` grids of bases of ℝⁿ, as
    :func:`phi_figure`'s ``extra_rows``: the expected φ of random subspaces, max(i, j)/n, and
    one drawn pair of random subspaces (the paper's Figure 4, right panel)."""
    generator = torch.Generator().manual_seed(seed)
    sample = sample_random_subspace_similarity(n, p, q, generator=generator)[0]
    return {
        f"Random, mean\n(n={n})": random_subspace_similarity(n, p, q).numpy(),
        f"Random, one draw\n(n={n})": sample.numpy(),
    }


def comparison_symbols(
    basis: str,
    reference_rank: int,
    current_rank: int,
    reference_step: Optional[int] = None,
    current_step: Optional[int] = None,
) -> tuple[str, str, bool]:
    """The two sides of the title ``φ(row, column, i, j)`` as the paper writes them, and whether
    the grids must be transposed to put the smaller rank on i (φ is symmetric under swapping
    sides; the paper's rank-8-vs-64 figure and its masked zoom have rank 8 on i).

    Two runs (no steps) read like the paper's φ(A_{r=8}, A_{r=64}) or, at equal ranks,
    φ(A_{r=64}, A'_{r=64}); two snapshots of one run are named by their steps.
    """
    symbol = basis_info(basis).symbol
    if reference_step is not None:
        row = rf"{symbol}_{{\mathrm{{step}}={reference_step}}}"
        column = rf"{symbol}_{{\mathrm{{step}}={current_step}}}"
    else:
        prime = "'" if current_rank == reference_rank else ""
        row = rf"{symbol}_{{r={reference_rank}}}"
        column = rf"{symbol}{prime}_{{r={current_rank}}}"
    if reference_rank > current_rank:
        return column, row, True
    return row, column, False


def comparison_figure(
    grids: Mapping[ModuleKey, np.ndarray],
    *,
    basis: str,
    reference_rank: int,
    current_rank: int,
    layers: Optional[Sequence[int]] = None,
    baseline_dimension: Optional[int] = None,
    seed: int = 0,
) -> Figure:
    """The paper's figure of φ between two runs' adapters (:func:`comparison_symbols`).

    Args:
        grids: ``(layer, projection) → φ(reference, current)`` of shape
            ``(reference_rank, current_rank)``.
        basis: the basis φ was computed in (its symbol goes in the title).
        layers: rows, in order; default all layers of ``grids``.
        baseline_dimension: n of the basis vectors; given, two rows of random-subspace φ of the
            same shapes are added below the layers (:func:`random_baseline_rows`, drawn with
            ``seed``).
    """
    row, column, transpose = comparison_symbols(basis, reference_rank, current_rank)
    if transpose:
        grids = {key: grid.T for key, grid in grids.items()}
    p, q = next(iter(grids.values())).shape
    extra_rows = None
    if baseline_dimension is not None:
        extra_rows = random_baseline_rows(baseline_dimension, p, q, seed)
    return phi_figure(grids, row_symbol=row, column_symbol=column, layers=layers, extra_rows=extra_rows)


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 array of exactly figsize × dpi pixels."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
