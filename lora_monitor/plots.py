"""Heatmap figures of φ grids, laid out like the LoRA paper's Section 7 / Appendix H figures.

Pure matplotlib (the object-oriented API, no pyplot state), so figures can be drawn from a
training process without a display and without touching other figures.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
import matplotlib

from lora_monitor.adapters import ModuleKey

#: Matplotlib colour map of the heatmaps (dark = 0, light = 1, as in the paper) and the grey of
#: masked cells.
COLORMAP = "magma"
MASK_COLOR = "#c8ccd4"
DPI = 100


def phi_colormap() -> Colormap:
    return matplotlib.colormaps[COLORMAP].with_extremes(bad=MASK_COLOR)


def projection_label(projection: str) -> str:
    """``"q"`` → ``$\\Delta W_{q}$``, ``"gate_proj"`` → ``$\\Delta W_{\\mathrm{gate\\_proj}}$``."""
    if len(projection) == 1:
        return rf"$\Delta W_{projection}$"
    return r"$\Delta W_{\mathrm{" + projection.replace("_", r"\_") + "}}$"


def _ticks(n: int, most: int) -> np.ndarray:
    """1-based tick positions, at most ``most`` of them, always including 1 and n."""
    return np.unique(np.linspace(1, n, min(n, most)).round().astype(int))


def _draw_panel(ax, phi: np.ndarray, cmap: Colormap, masked_upper: bool):
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
    ax.set_xticks(_ticks(q, 11))
    ax.set_yticks(_ticks(p, 8))
    ax.tick_params(labelsize=7, length=2)
    return image


def phi_figure(
    grids: Mapping[ModuleKey, np.ndarray],
    *,
    row_symbol: str,
    column_symbol: str,
    zoom: Optional[bool] = None,
    layers: Optional[Sequence[int]] = None,
    projections: Optional[Sequence[str]] = None,
) -> Figure:
    """One grid figure of φ heatmaps: a row per layer, a column per projection.

    Args:
        grids: ``(layer, projection) → φ`` of shape ``(p, q)``, rows indexing ``i`` (the
            ``row_symbol`` side) and columns ``j``.
        row_symbol, column_symbol: mathtext for the two sides, e.g. ``"A_{r=8}"`` and
            ``"A_{r=64}"``; the title reads ``φ(row_symbol, column_symbol, i, j)``.
        zoom: add, per projection, a zoom on ``i, j ≤ p`` with the cells ``j > i`` masked grey
            (the right half of the paper's rank-8-vs-64 figure). Default: when ``p < q``.
        layers, projections: order of rows and columns; default: sorted / first-seen order.

    Returns:
        A matplotlib ``Figure`` (no pyplot state), 0..1 colour scale with one colour bar.
    """
    if not grids:
        raise ValueError("phi_figure: no φ grids to draw")
    layers = list(layers) if layers is not None else sorted({layer for layer, _ in grids})
    if projections is None:
        projections = list(dict.fromkeys(projection for _, projection in grids))
    p, q = next(iter(grids.values())).shape
    if zoom is None:
        zoom = p < q
    columns = [(projection, False) for projection in projections]
    if zoom:
        columns += [(projection, True) for projection in projections]
    width_ratios = [1.6 if zoomed else 3.0 for _, zoomed in columns]
    # A fixed layout (no constrained layout): measuring every tick label costs seconds.
    width, height = sum(width_ratios) + 1.6, 1.5 * len(layers) + 0.9
    figure = Figure(figsize=(width, height), dpi=DPI)
    grid = figure.add_gridspec(
        len(layers),
        len(columns) + 1,
        width_ratios=width_ratios + [0.12],
        left=0.9 / width,
        right=1 - 0.6 / width,
        bottom=0.5 / height,
        top=1 - 0.6 / height,
        wspace=0.25,
        hspace=0.35,
    )
    axes = np.array(
        [[figure.add_subplot(grid[row, column]) for column in range(len(columns))] for row in range(len(layers))]
    )
    cmap = phi_colormap()
    image = None
    for row, layer in enumerate(layers):
        for column, (projection, zoomed) in enumerate(columns):
            ax = axes[row, column]
            phi = grids.get((layer, projection))
            if phi is None:
                ax.set_axis_off()
                continue
            phi = np.asarray(phi, dtype=np.float32)
            if zoomed:
                side = min(phi.shape)
                phi = phi[:side, :side]
            image = _draw_panel(ax, phi, cmap, masked_upper=zoomed)
            if row == 0:
                ax.set_title(projection_label(projection), fontsize=10)
            if row == len(layers) - 1:
                ax.set_xlabel("j", fontsize=9)
            if column == 0:
                ax.set_ylabel(f"Layer {layer}\ni", fontsize=9)
    figure.suptitle(rf"$\phi({row_symbol}, {column_symbol}, i, j)$", fontsize=12)
    if image is not None:
        figure.colorbar(image, cax=figure.add_subplot(grid[:, -1]), label=r"$\phi$")
    return figure


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render a figure to an ``(H, W, 3)`` uint8 array of exactly figsize × dpi pixels."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
