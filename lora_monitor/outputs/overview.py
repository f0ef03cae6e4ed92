"""The overview of every layer, ``LoRA_rank/overview``: per projection each layer's spectral gap
rank against r and the suggestion, and the functional probe's curve.

:func:`overview_content` reduces a recommendation to what the figure shows (integers, flags and
the probe's shares rounded to a few pixels), so that :mod:`lora_monitor.outputs.rendering` draws it
again only when that changed; :func:`draw_overview` draws exactly that, and :class:`OverviewCanvas`
draws it again in milliseconds: its frame (axes, ticks, labels: what costs) is drawn once per
:func:`overview_structure`, the bars, lines and texts that follow the run into it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Optional

import matplotlib.ticker
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.text import Text
from matplotlib.textpath import text_to_path

from lora_monitor.adapters import ModuleKey
from lora_monitor.analysis.rank import RankRecommendation
from lora_monitor.analysis.rank_rule import RULE
from lora_monitor.outputs.plots import CARD_FONT, CARD_WIDTH, DPI, projection_label

SUGGESTION_COLOR, BAR_COLOR, R_COLOR = "#c44e52", "#4c72b0", "#555555"


@dataclass(frozen=True)
class OverviewContent:
    """Everything the overview shows; equal contents draw the same picture."""

    #: ``(key, r, gap rank)`` of every module, by key.
    modules: tuple[tuple[ModuleKey, int, int], ...]
    #: ``(projection, its largest gap rank)``.
    projections: tuple[tuple[str, Optional[int]], ...]
    rank: Optional[int]
    low: Optional[int]
    high: Optional[int]
    strength: str
    #: ``(k, share of the log-loss reduction kept)`` for k ≥ 1, to 0.05 (3 pixels of the panel:
    #: finer would draw the figure again at nearly every snapshot); empty: no probe.
    probe: tuple[tuple[int, float], ...]
    probe_rank: Optional[int]


def overview_content(recommendation: RankRecommendation) -> OverviewContent:
    rec = recommendation
    probe: tuple[tuple[int, float], ...] = ()
    if rec.probe is not None and rec.probe.rank is not None:
        probe = tuple((k, round(20 * rec.probe.kept(k)) / 20) for k in rec.probe.losses if k > 0)
    strength = "r may be too small" if rec.too_small else ("weak evidence" if rec.weak else "evidence consistent")
    return OverviewContent(
        modules=tuple((m.key, m.rank, m.delta_w_gap_rank) for m in rec.modules),
        projections=tuple(rec.projections.items()),
        rank=rec.rank,
        low=rec.low,
        high=rec.high,
        strength=strength,
        probe=probe,
        probe_rank=rec.probe.rank if rec.probe is not None else None,
    )


def overview_figure(recommendation: RankRecommendation) -> Figure:
    """``draw_overview(overview_content(recommendation))``."""
    return draw_overview(overview_content(recommendation))


def overview_structure(content: OverviewContent) -> Hashable:
    """What the overview's frame depends on: the modules and their r (the panels, the axes, the
    dashed r line), the projections, whether the probe has a panel, and its lowest share kept
    (its panel's y range). What else it shows (gap ranks, the suggestion, the probe's curve, the
    titles that name them) is drawn into the frame (:class:`OverviewCanvas`)."""
    lowest = min((kept for _, kept in content.probe), default=0.0)
    return (
        tuple((key, r) for key, r, _ in content.modules),
        tuple(projection for projection, _ in content.projections),
        bool(content.probe),
        min(0.0, lowest),
    )


def _rank_ticks(top: int) -> list[int]:
    """Powers of two from 1, at most five, and ``top`` itself: a log₂ axis of ranks."""
    powers = [2**k for k in range(int(np.log2(max(top, 1))) + 1)]
    ticks = powers[:: -(-len(powers) // 5)]
    return sorted(set(ticks) | {top})


def _rank_axis(axis: matplotlib.axis.Axis, top: int) -> None:
    axis.set_ticks(_rank_ticks(top))
    axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_minor_locator(matplotlib.ticker.NullLocator())


@dataclass
class _Changing:
    """The artists of an overview that follow the run, in the order they are drawn, and how each
    takes a content's values (:meth:`OverviewCanvas.image`)."""

    #: ``(axes or None for the figure, artist)``, in drawing order.
    artists: list[tuple[Optional[Axes], Artist]] = field(default_factory=list)
    #: Each sets its artists from a content.
    setters: list[Any] = field(default_factory=list)

    def add(self, ax: Optional[Axes], *artists: Artist) -> None:
        self.artists.extend((ax, artist) for artist in artists)


def _text_width(text: str, size: float, weight: str = "normal") -> float:
    """How wide ``text`` is set at ``size`` (points; a ``$…$`` text as mathtext)."""
    properties = FontProperties(size=size, weight=weight)
    return float(text_to_path.get_text_width_height_descent(text, properties, ismath=text.startswith("$"))[0])


def _fitting_size(text: str, size: float, available: float, weight: str = "normal") -> float:
    """``size``, or the smaller size at which ``text`` is ``available`` points wide: a heading or
    title that says more (an "r may be too small", a long rank list) shrinks instead of running
    off the card or into its neighbour."""
    width = _text_width(text, size, weight)
    return size if width <= available else size * available / width


def _gap_title(content: OverviewContent, projection: str, gap: Optional[int]) -> str:
    r_text = "/".join(str(r) for r in sorted({r for key, r, _ in content.modules if key[1] == projection}))
    return f"gap {gap or 'none'}, r = {r_text}"


def _gap_panel(
    ax: Axes, content: OverviewContent, projection: str, gap: Optional[int], top_rank: int, changing: _Changing
) -> None:
    modules = [(key[0], r, g) for key, r, g in content.modules if key[1] == projection]
    layers = np.array([layer for layer, _, _ in modules])
    # A few pixels a layer beyond 24 layers: gaps between the bars would alias.
    bars = ax.bar(layers, [g for _, _, g in modules], width=0.8 if layers.size <= 24 else 1.0, color=BAR_COLOR, lw=0)
    (r_line,) = ax.plot(layers, [r for _, r, _ in modules], ls="--", lw=1, color=R_COLOR, drawstyle="steps-mid")
    suggestion = ax.axhline(content.rank or 1, color=SUGGESTION_COLOR, lw=1.5, visible=bool(content.rank))
    ax.set_yscale("log", base=2)
    ax.set_ylim(0.7, top_rank * 1.5)
    _rank_axis(ax.yaxis, top_rank)
    if layers.size:
        ax.set_xlim(layers.min() - 0.6, layers.max() + 0.6)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4, integer=True))
    # The mathtext label alone, constant over a run (matplotlib caches its parse, which costs
    # tens of ms a title); the numbers that change go in plain text beside it.
    label = projection_label(projection)
    ax.set_title(label, fontsize=CARD_FONT - 1, loc="left", pad=3)
    # What the right title may take: the panel's width but the label's and a space.
    panel_width = ax.get_position().width * CARD_WIDTH / DPI * 72
    room = panel_width - _text_width(label, CARD_FONT - 1) - 4

    def title_size(text: str) -> float:
        return _fitting_size(text, CARD_FONT - 2, room)

    text = _gap_title(content, projection, gap)
    title = ax.set_title(text, fontsize=title_size(text), loc="right", pad=3)
    ax.set_xlabel("layer", fontsize=CARD_FONT - 2, labelpad=0)
    # The r line is the frame's, drawn again over the bars, as the whole figure draws it.
    changing.add(ax, *bars.patches, r_line, suggestion, title)

    def follow(content: OverviewContent) -> None:
        heights = [g for key, _, g in content.modules if key[1] == projection]
        for bar, height in zip(bars.patches, heights):
            bar.set_height(height)
        suggestion.set_ydata([content.rank or 1] * 2)
        suggestion.set_visible(bool(content.rank))
        text = _gap_title(content, projection, dict(content.projections)[projection])
        title.set_text(text)
        title.set_fontsize(title_size(text))

    changing.setters.append(follow)


def _probe_panel(ax: Axes, content: OverviewContent, top_rank: int, changing: _Changing) -> None:
    ks = [k for k, _ in content.probe]
    (curve,) = ax.plot(ks, [kept for _, kept in content.probe], "o-", ms=2.5, lw=1, color=BAR_COLOR)
    keep = ax.axhline(RULE.keep, color=R_COLOR, lw=0.8, ls=":")
    suggestion = ax.axvline(content.rank or 1, color=SUGGESTION_COLOR, lw=1.5, visible=bool(content.rank))
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, top_rank * 1.25)
    _rank_axis(ax.xaxis, top_rank)
    ax.set_ylim(min(0.0, *(kept for _, kept in content.probe)) - 0.05, 1.08)
    ax.set_yticks([0, 0.5, 1])
    ax.yaxis.tick_right()
    ax.set_title("probe", fontsize=CARD_FONT - 1, loc="left", pad=3)
    title = ax.set_title(f"rank {content.probe_rank}", fontsize=CARD_FONT - 2, loc="right", pad=3)
    ax.set_xlabel("k: every ΔW cut to", fontsize=CARD_FONT - 2, labelpad=0)
    changing.add(ax, curve, keep, suggestion, title)

    def follow(content: OverviewContent) -> None:
        curve.set_data([k for k, _ in content.probe], [kept for _, kept in content.probe])
        suggestion.set_xdata([content.rank or 1] * 2)
        suggestion.set_visible(bool(content.rank))
        title.set_text(f"rank {content.probe_rank}")

    changing.setters.append(follow)


def _heading(content: OverviewContent) -> str:
    if content.rank is None:
        head = "no rank supported yet"
    else:
        span = f", likely {content.low}–{content.high}" if content.low and content.high != content.low else ""
        head = f"suggested rank {content.rank}{span}"
    strength = "consistent" if content.strength == "evidence consistent" else content.strength
    return f"{head}: {strength}"


def _draw(content: OverviewContent) -> tuple[Figure, _Changing]:
    """The overview figure of ``content``, and its artists that follow the run."""
    projections = list(content.projections)
    panels = len(projections) + bool(content.probe)
    columns = 3 if panels == 3 else min(2, max(panels, 1))
    rows = -(-max(panels, 1) // columns)
    # Inches: a row of panels with titles and tick labels, the heading (title, legend), the
    # axis labels, the space between rows.
    width, panel, heading, foot, gap = CARD_WIDTH / DPI, 1.05, 0.62, 0.36, 0.45
    height = panel * rows + heading + foot
    figure = Figure(figsize=(width, height), dpi=DPI)
    top_rank = max((r for _, r, _ in content.modules), default=1)
    axes_height = (panel * rows - 0.2 - gap * (rows - 1)) / rows
    grid = figure.add_gridspec(
        rows,
        columns,
        left=0.36 / width,
        right=1 - (0.36 if content.probe else 0.1) / width,
        wspace=0.12,
        bottom=foot / height,
        top=1 - (heading + 0.2) / height,
        hspace=gap / axes_height,
    )
    changing = _Changing()
    for index, (projection, gap_rank) in enumerate(projections):
        row, column = divmod(index, columns)
        ax = figure.add_subplot(grid[row, column])
        _gap_panel(ax, content, projection, gap_rank, top_rank, changing)
        if column:  # every gap panel has the same rank axis: labelled once, on the left
            ax.tick_params(labelleft=False)
        ax.tick_params(labelsize=CARD_FONT - 2, length=2, pad=1)
    if content.probe:
        ax = figure.add_subplot(grid[divmod(len(projections), columns)])
        _probe_panel(ax, content, top_rank, changing)
        ax.tick_params(labelsize=CARD_FONT - 2, length=2, pad=1)

    def heading_size(words: str) -> float:
        return _fitting_size(words, CARD_FONT + 1, 0.96 * width * 72, weight="bold")

    first = _heading(content)
    text = figure.text(
        0.5, 1 - 0.08 / height, first, ha="center", va="top", fontsize=heading_size(first), weight="bold"
    )
    changing.add(None, text)

    def follow(content: OverviewContent) -> None:
        words = _heading(content)
        text.set_text(words)
        text.set_fontsize(heading_size(words))

    changing.setters.append(follow)
    legend = "bars: ΔW's spectral gap rank per layer; red: suggestion; dashed: r"
    if content.probe:
        legend += "\nprobe: share of the loss reduction kept with every ΔW cut to k"
    figure.text(0.5, 1 - 0.32 / height, legend, ha="center", va="top", fontsize=CARD_FONT - 2, color="#333333")
    return figure, changing


def draw_overview(content: OverviewContent) -> Figure:
    """Every layer at once, sized for a TensorBoard card and readable for 80 layers.

    TensorBoard's default image card fits an image into a box about 217 px high and shrinks
    taller ones, pixelated; so panels sit side by side (two, or three with the probe), and a
    row of them makes a figure about 200 px high, shown unshrunk.

    Bars: each layer's ΔW spectral gap rank (:func:`~lora_monitor.functional.gap_rank`);
    dashed: r; red: the suggested rank, the same for every projection (one r serves the
    model). The probe's panel: the share of the whole update's log-loss reduction kept with
    every ΔW cut to k directions; dotted: the 95 % the suggestion keeps. Rank axes are
    logarithmic (1 to r), so 2 against 64 stays visible.
    """
    return _draw(content)[0]


class OverviewCanvas:
    """The overviews of one :func:`overview_structure`, drawn fast: the figure of the first
    content is drawn once without its changing artists (bars, the r and suggestion lines, the
    probe's curve, the titles that hold numbers, the heading) and kept as pixels; each
    :meth:`image` puts them back, sets those artists from its content and draws them alone
    into it, in the order the whole figure draws them. Tick labels, mathtext titles and
    layout, which take most of the 50–150 ms of a whole drawing, are not drawn again. The
    picture is the whole figure's (:func:`draw_overview`) but where a bar meets an axis line,
    which the whole figure draws over the bars (a few pixels, tested)."""

    def __init__(self, content: OverviewContent) -> None:
        self.structure = overview_structure(content)
        self.figure, self._changing = _draw(content)
        for _, artist in self._changing.artists:
            artist.set_animated(True)  # left out of the frame
        self._canvas = FigureCanvasAgg(self.figure)
        self._canvas.draw()
        self._frame = self._canvas.copy_from_bbox(self.figure.bbox)

    def image(self, content: OverviewContent) -> np.ndarray:
        """``figure_to_rgb(draw_overview(content))`` for a content of this canvas's structure."""
        if overview_structure(content) != self.structure:
            raise ValueError("OverviewCanvas.image: a content of another structure")
        for follow in self._changing.setters:
            follow(content)
        renderer = self._canvas.get_renderer()
        self._canvas.restore_region(self._frame)
        for ax, artist in self._changing.artists:
            if isinstance(artist, Text) or ax is None:
                artist.draw(renderer)
            else:
                ax.draw_artist(artist)
        return np.asarray(self._canvas.buffer_rgba())[..., :3].copy()
