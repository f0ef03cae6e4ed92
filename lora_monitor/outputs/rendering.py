"""A run's images, fast: what the monitor draws at every snapshot.

matplotlib draws a figure's frame (ticks, labels, colour bar) in hundreds of milliseconds, and
its mathtext titles in tens; neither changes between snapshots of a run. So the φ heatmaps are
drawn once per layout without their cells and titles, and later snapshots colour-map the grids
with numpy into the cached frame (:func:`phi_image`); title strips are cached by their text; the
overview is drawn again only when what it shows changed (:func:`overview_image`).
:func:`snapshot_images` is what the engine calls. The figures themselves are
:mod:`lora_monitor.outputs.plots`'.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from lora_monitor.adapters import ModuleKey
from lora_monitor.analysis.rank import RankRecommendation
from lora_monitor.outputs import overview, plots
from lora_monitor.outputs.plots import DPI, phi_colormap, phi_figure
from lora_monitor.outputs.tags import OVERVIEW_TAG, heatmap_tag


@dataclass
class _Panel:
    """Where one heatmap lands in the image, and which input value each of its cells shows."""

    rows: slice
    columns: slice
    #: ``(height, width)`` indices into the flattened inputs (-1: masked cell), already
    #: resampled to the panel's pixels as ``imshow(interpolation="nearest")`` does.
    source: np.ndarray


@dataclass
class _Frame:
    overlay: np.ndarray  # (H, W, 4) float32 straight-alpha RGBA of everything but heatmaps and titles
    panels: list[_Panel]
    title: Text
    #: A card's layer label (its text the placeholder), drawn apart from the title.
    prefix: Optional[Text] = None


_FRAMES: OrderedDict[Hashable, _Frame] = OrderedDict()
#: Held around the frame cache and matplotlib's text drawing: neither is thread-safe, and an
#: asynchronous monitor draws in its worker thread while another monitor may draw elsewhere.
_DRAWING = threading.Lock()
_FRAME_CACHE_SIZE = 8
_ROW_PLACEHOLDER, _COLUMN_PLACEHOLDER, _PREFIX_PLACEHOLDER = "ROWSYMBOL", "COLUMNSYMBOL", "TITLEPREFIX"


def _pixel_indices(start: float, stop: float, cells: int) -> tuple[slice, np.ndarray]:
    """Pixels ``[round(start), round(stop))`` and the cell each pixel centre falls in."""
    first, last = int(round(start)), int(round(stop))
    centres = np.arange(first, last) + 0.5
    cell = np.floor((centres - start) / (stop - start) * cells).astype(np.int64)
    return slice(first, last), np.clip(cell, 0, cells - 1)


def _build_frame(inputs: Sequence[tuple[Hashable, tuple[int, int]]], grids_keys: int, layout: dict) -> _Frame:
    # Draw the real figure once with grids whose values are the flat positions of the inputs'
    # cells: whatever phi_figure does to a grid (zoom, mask, transpose, extra rows) is then
    # read back from its images, and later calls only look values up.
    offsets = np.cumsum([0] + [p * q for _, (p, q) in inputs])
    ids = [
        np.arange(offsets[n], offsets[n + 1], dtype=np.float64).reshape(shape) for n, (_, shape) in enumerate(inputs)
    ]
    grids: dict[Any, np.ndarray] = {key: ids[n] for n, (key, _) in enumerate(inputs[:grids_keys])}
    extra = {key: ids[grids_keys + n] for n, (key, _) in enumerate(inputs[grids_keys:])}
    if extra:
        layout = {**layout, "extra_rows": extra}
    if layout.get("card"):
        layout = {**layout, "title_prefix": _PREFIX_PLACEHOLDER}
    figure = phi_figure(grids, row_symbol=_ROW_PLACEHOLDER, column_symbol=_COLUMN_PLACEHOLDER, **layout)
    figure.patch.set_visible(False)
    # The suptitle: the only figure-level text that holds the placeholders.
    title = next(text for text in figure.texts if _ROW_PLACEHOLDER in text.get_text())
    title.set_visible(False)
    prefix = next((text for text in figure.texts if _PREFIX_PLACEHOLDER in text.get_text()), None)
    if prefix is not None:
        prefix.set_visible(False)
    images = [(ax, image) for ax in figure.axes for image in ax.images]
    for ax, image in images:
        image.set_visible(False)
        ax.patch.set_visible(False)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    overlay = np.asarray(canvas.buffer_rgba(), dtype=np.float32) / 255.0
    height = overlay.shape[0]
    panels = []
    for ax, image in images:
        box = ax.get_window_extent()
        array = image.get_array()
        assert array is not None  # every panel shows a grid
        data, mask = np.ma.getdata(array), np.ma.getmaskarray(array)
        cells = np.where(mask, -1, np.rint(data)).astype(np.int64)
        rows, row_cells = _pixel_indices(height - box.y1, height - box.y0, cells.shape[0])
        columns, column_cells = _pixel_indices(box.x0, box.x1, cells.shape[1])
        panels.append(_Panel(rows, columns, cells[row_cells[:, None], column_cells[None, :]]))
    return _Frame(overlay=overlay, panels=panels, title=title, prefix=prefix)


#: Title strips already drawn, by (text, where): a run's layer labels never change, and a
#: snapshot's title is the same for all its layers.
_TITLES: OrderedDict[Hashable, tuple[np.ndarray, int]] = OrderedDict()
_TITLE_CACHE_SIZE = 256


def _title_overlay(title: Text, text: str, width: int, height: int) -> tuple[np.ndarray, int]:
    """The text of ``title`` alone, drawn at its place in a strip as wide as the figure;
    (RGBA, rows). Call with :data:`_DRAWING` held."""
    x, top = (float(coordinate) for coordinate in title.get_position())
    key = (text, x, top, title.get_fontsize(), title.get_horizontalalignment(), width, height)
    cached = _TITLES.get(key)
    if cached is not None:
        _TITLES.move_to_end(key)
        return cached
    strip = int(np.ceil((1 - top) * height + 4 * float(title.get_fontsize())))
    figure = Figure(figsize=(width / DPI, strip / DPI), dpi=DPI)
    figure.patch.set_visible(False)
    figure.text(
        x,
        1 - (1 - top) * height / strip,
        text,
        fontsize=title.get_fontsize(),
        ha=title.get_horizontalalignment(),
        va=title.get_verticalalignment(),
    )
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    result = np.asarray(canvas.buffer_rgba(), dtype=np.float32) / 255.0, strip
    _TITLES[key] = result
    if len(_TITLES) > _TITLE_CACHE_SIZE:
        _TITLES.popitem(last=False)
    return result


def _composite(base: np.ndarray, overlay: np.ndarray) -> None:
    """``base ← overlay over base`` in place, straight alpha (Agg's own buffer format)."""
    alpha = overlay[..., 3:]
    base *= 1 - alpha
    base += overlay[..., :3] * alpha


def phi_image(
    grids: Mapping[ModuleKey, np.ndarray],
    *,
    row_symbol: str,
    column_symbol: str,
    **layout: Any,
) -> np.ndarray:
    """``figure_to_rgb(phi_figure(grids, ...))``, the same picture, in milliseconds.

    Drawing tick labels and titles is what costs time in a matplotlib figure (a second or more
    for a 4-layer grid), and they do not change between snapshots of a run. So the figure is
    drawn once per layout (the keys and shapes of ``grids``, and ``layout``: ``zoom``,
    ``layers``, ``projections``, ``extra_rows``, ``card``; a card's ``title_prefix`` is not
    part of it) without its heatmaps and title; later calls
    colour-map the grids with numpy into the panels' pixels, as ``imshow`` with nearest
    interpolation does, and lay the cached frame and the title over them.

    Returns:
        ``(H, W, 3)`` uint8, the size :func:`figure_to_rgb` gives.
    """
    if not grids:
        raise ValueError("phi_image: no φ grids to draw")
    extra_rows = dict(layout.pop("extra_rows", None) or {})
    title_prefix = layout.pop("title_prefix", "")
    arrays = [np.asarray(grid, dtype=np.float32) for grid in grids.values()]
    arrays += [np.asarray(grid, dtype=np.float32) for grid in extra_rows.values()]
    keys = list(grids)
    if layout.get("card"):
        # A card names its layer in the title only: every layer of a run shares one frame.
        keys = [(0, projection) for _, projection in keys]
    inputs = [(key, a.shape) for key, a in zip([*keys, *extra_rows], arrays)]
    cache_key = (
        tuple(inputs),
        len(grids),
        tuple((name, tuple(v) if isinstance(v, (list, tuple)) else v) for name, v in sorted(layout.items())),
    )
    with _DRAWING:
        frame = _FRAMES.get(cache_key)
        if frame is None:
            frame = _build_frame(inputs, len(grids), layout)
            _FRAMES[cache_key] = frame
            if len(_FRAMES) > _FRAME_CACHE_SIZE:
                _FRAMES.popitem(last=False)
        _FRAMES.move_to_end(cache_key)

    # One colour lookup for every cell of every grid; index -1 (masked) gives the mask colour.
    cmap = phi_colormap()
    values = np.concatenate([a.ravel() for a in arrays] + [np.array([np.nan], np.float32)])
    colours = cmap(np.ma.masked_invalid(values), bytes=False)[:, :3].astype(np.float32)
    height, width = frame.overlay.shape[:2]
    image = np.ones((height, width, 3), dtype=np.float32)
    for panel in frame.panels:
        image[panel.rows, panel.columns] = colours[panel.source]
    _composite(image, frame.overlay)
    text = frame.title.get_text().replace(_ROW_PLACEHOLDER, row_symbol).replace(_COLUMN_PLACEHOLDER, column_symbol)
    with _DRAWING:
        strips = [_title_overlay(frame.title, text, width, height)]
        if frame.prefix is not None and title_prefix.rstrip(": "):
            label = frame.prefix.get_text().replace(_PREFIX_PLACEHOLDER, title_prefix.rstrip(": "))
            strips.append(_title_overlay(frame.prefix, label, width, height))
    for title, strip in strips:
        _composite(image[:strip], title)
    return np.rint(image * 255).astype(np.uint8)


def snapshot_images(
    grids: Mapping[ModuleKey, np.ndarray],
    *,
    layers: Sequence[int],
    row_symbol: str,
    column_symbol: str,
    recommendation: Optional[RankRecommendation] = None,
) -> dict[str, np.ndarray]:
    """Every image the monitor logs for one snapshot, by tag: the φ heatmaps of each drawn layer
    (``grids`` oriented reference × current, see :func:`comparison_symbols`), one image per
    layer sized for TensorBoard's card (:func:`heatmap_tag`), and with ``recommendation`` the
    overview of every layer (:data:`OVERVIEW_TAG`, :func:`~lora_monitor.outputs.overview.overview_figure`)."""
    images = {}
    for layer in layers:
        layer_grids = {key: grid for key, grid in grids.items() if key[0] == layer}
        if layer_grids:
            images[heatmap_tag(layer)] = phi_image(
                layer_grids,
                row_symbol=row_symbol,
                column_symbol=column_symbol,
                card=True,
                title_prefix=f"Layer {layer}: ",
            )
    if recommendation is not None and recommendation.modules:
        images[OVERVIEW_TAG] = overview_image(recommendation)
    return images


def comparison_images(
    grids: Mapping[ModuleKey, np.ndarray],
    *,
    basis: str,
    reference_rank: int,
    current_rank: int,
    reference_step: Optional[int],
    current_step: int,
    layers: Sequence[int],
    recommendation: Optional[RankRecommendation] = None,
) -> dict[str, np.ndarray]:
    """:func:`snapshot_images` of φ grids oriented reference × current (``grids`` may be
    empty: the overview alone), titled as the paper writes the comparison and transposed to
    put the smaller rank on i (:func:`~lora_monitor.outputs.plots.comparison_symbols`)."""
    row = column = ""
    if grids:
        row, column, transpose = plots.comparison_symbols(
            basis, reference_rank, current_rank, reference_step, current_step
        )
        if transpose:
            grids = {key: grid.T for key, grid in grids.items()}
    drawn = [layer for layer in layers if any(key[0] == layer for key in grids)]
    return snapshot_images(grids, layers=drawn, row_symbol=row, column_symbol=column, recommendation=recommendation)


#: Overview images already drawn, by their content (:func:`~lora_monitor.outputs.overview.overview_content`).
_OVERVIEWS: OrderedDict[Hashable, np.ndarray] = OrderedDict()
#: Overview frames, by :func:`~lora_monitor.outputs.overview.overview_structure`.
_OVERVIEW_CANVASES: OrderedDict[Hashable, overview.OverviewCanvas] = OrderedDict()


def overview_image(recommendation: RankRecommendation) -> np.ndarray:
    """``figure_to_rgb(overview_figure(recommendation))``, drawn only when its content changed:
    once a run's suggestion and per-layer ranks settle, every snapshot has the same overview.
    When it changed, only what changed is drawn, into the frame kept for its structure
    (:class:`~lora_monitor.outputs.overview.OverviewCanvas`): a few ms, where drawing the whole
    figure with matplotlib costs 50–150 ms (most of a snapshot's drawing)."""
    return content_overview_image(overview.overview_content(recommendation))


def content_overview_image(content: overview.OverviewContent) -> np.ndarray:
    """:func:`overview_image` of a recommendation's :func:`~lora_monitor.outputs.overview.overview_content`."""
    with _DRAWING:
        image = _OVERVIEWS.get(content)
        if image is None:
            structure = overview.overview_structure(content)
            canvas = _OVERVIEW_CANVASES.get(structure)
            if canvas is None:
                canvas = _OVERVIEW_CANVASES[structure] = overview.OverviewCanvas(content)
                if len(_OVERVIEW_CANVASES) > _FRAME_CACHE_SIZE:
                    _OVERVIEW_CANVASES.popitem(last=False)
            _OVERVIEW_CANVASES.move_to_end(structure)
            image = _OVERVIEWS[content] = canvas.image(content)
            if len(_OVERVIEWS) > _FRAME_CACHE_SIZE:
                _OVERVIEWS.popitem(last=False)
        _OVERVIEWS.move_to_end(content)
    return image
