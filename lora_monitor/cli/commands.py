"""What each ``lora-monitor`` command does, as functions (the parser calls them; Python may too).

Torch, the analysis and matplotlib are imported inside them, on first use.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

from lora_monitor.cli.reading import SavedFactors, analyze_saved
from lora_monitor.functional.bases import Basis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lora_monitor.adapters import ModuleKey
    from lora_monitor.analysis import ModuleAnalysis
    from lora_monitor.analysis.rank import RankRecommendation


#: Figure formats written by extension.
FIGURE_FORMATS = (".png", ".svg")


class _Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line a stage else)."""

    def __init__(self, total: int, enabled: bool, stream: Optional[TextIO] = None) -> None:
        # sys.stderr looked up now, not at import: it may have been redirected since.
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        self.done += 1
        filled = round(20 * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        line = f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} {label} ({elapsed:.1f} s)"
        if self.stream.isatty():
            end = "\n" if self.done == self.total else ""
            self.stream.write(f"\r\033[K{line}{end}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@dataclass
class Comparison:
    """The analysis of one adapter against a reference adapter, and what was made of it."""

    analyses: dict[ModuleKey, ModuleAnalysis]
    recommendation: RankRecommendation
    reference_rank: int
    rank: int
    figure: Optional[Figure]
    figure_path: Optional[Path]


def compare_adapters(
    reference_dir: str | Path,
    directory: str | Path,
    *,
    basis: Basis = "A",
    projections: Optional[Sequence[str]] = ("q", "v"),
    layers: Optional[Sequence[int]] = None,
    output: Optional[str | Path] = None,
    baseline: bool = True,
    seed: int = 0,
    progress: bool = False,
    base_config: Optional[str | Path] = None,
) -> Comparison:
    """φ(reference, adapter, i, j) of two saved adapters, the figure, and the suggested rank.

    Args:
        reference_dir, directory: adapter directories written by ``save_pretrained`` (two
            ranks, e.g. 8 and 64, or two seeds) of the same base model.
        basis: the singular vectors compared (see :data:`lora_monitor.functional.bases.BASES`).
        projections, layers: which modules (``None``: all); the figure draws every selected
            layer, a row each.
        output: the figure file, PNG or SVG by its extension; None: no figure.
        baseline: add two rows of random-subspace φ (mean and one draw, ``seed``) to the figure.
        progress: draw a progress bar on stderr.
        base_config: the base model's ``config.json`` (or its directory), to split fused q|k|v
            modules whose layout the adapters alone do not tell (see ``load_adapter``).

    Raises:
        LoRAMonitorError: a directory is missing or holds no LoRA adapter, the adapters do not
            share the selected modules or were trained on different base models, the output
            extension is not .png/.svg.
    """
    from lora_monitor.adapters import LoRAMonitorError, check_reference_compatible
    from lora_monitor.analysis.rank import recommend_rank

    figure_format = _figure_format(output)
    bar = _Progress(4 if output is not None else 3, progress)
    reference = SavedFactors.open(reference_dir, projections, layers, base_config)
    current = SavedFactors.open(directory, projections, layers, base_config)
    check_reference_compatible(current.factors, reference.factors, basis)  # before any bar
    bar.step("adapters opened")
    analyses = analyze_saved(current, reference, basis)
    if all(a.phi is None for a in analyses.values()):
        problems = "; ".join(sorted({p for a in analyses.values() for p in [*a.problems, *a.notes]}))
        raise LoRAMonitorError(f"no module of {directory} could be compared with {reference_dir}: {problems}")
    bar.step("φ grids computed")
    recommendation = recommend_rank(analyses, reference_is_run=True, basis=basis)
    bar.step("rank suggested")
    key = next(iter(current.factors))
    reference_rank, rank = reference.factors[key].rank, current.factors[key].rank
    figure = figure_path = None
    if output is not None:
        from lora_monitor.outputs.plots import comparison_figure

        grids = {k: a.phi.numpy() for k, a in analyses.items() if a.phi is not None}
        dimension = next(a.dimension for a in analyses.values() if a.phi is not None)
        figure = comparison_figure(
            grids,
            basis=basis,
            reference_rank=reference_rank,
            current_rank=rank,
            baseline_dimension=dimension if baseline else None,
            seed=seed,
        )
        figure_path = Path(output)
        figure_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(figure_path, format=figure_format)
        bar.step(f"figure written to {figure_path}")
    return Comparison(analyses, recommendation, reference_rank, rank, figure, figure_path)


def _figure_format(output: Optional[str | Path]) -> Optional[str]:
    if output is None:
        return None
    suffix = Path(output).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        from lora_monitor.adapters import LoRAMonitorError

        raise LoRAMonitorError(
            f"cannot write a figure to {output}: the extension must be one of {', '.join(FIGURE_FORMATS)} (PNG or SVG)"
        )
    return suffix[1:]


def inspect_adapter(
    directory: str | Path,
    *,
    projections: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    base_config: Optional[str | Path] = None,
) -> tuple[str, RankRecommendation]:
    """The spectral table of one saved adapter and the rank its spectra alone suggest (the
    rule of :func:`~lora_monitor.analysis.rank.recommend_rank` without a probe: a saved
    adapter holds no batch to probe) (``base_config`` as for :func:`compare_adapters`)."""
    from lora_monitor.adapters.kinds import groups_of, trained_modules
    from lora_monitor.analysis.rank import ModuleEvidence, recommend_rank
    from lora_monitor.outputs.rank_text import spectrum_table

    saved = SavedFactors.open(directory, projections, layers, base_config)
    analyses = analyze_saved(saved)
    rows = [ModuleEvidence.from_analysis(analysis) for _, analysis in sorted(analyses.items())]
    recommendation = recommend_rank(analyses, groups=groups_of(saved.factors), trained=trained_modules(saved.factors))
    return spectrum_table(rows), recommendation


#: The groups a ``--rank`` of several entries names (``attention=2,mlp=8``).
RANK_GROUPS = ("attention", "mlp")


def parse_ranks(text: str) -> int | str | dict[str, int]:
    """``--rank``'s value: a rank K, ``"suggested"``, or a rank per group,
    ``attention=K,mlp=K`` (an entry without a group, ``2,mlp=8``, is every other module's).

    Raises:
        ValueError: anything else, or a rank below 1.
    """
    if text == "suggested":
        return text
    ranks: dict[str, int] = {}
    for entry in text.split(","):
        group, _, value = entry.rpartition("=")
        group = group.strip() or "*"
        if group != "*" and group not in RANK_GROUPS:
            raise ValueError(f"unknown group {group!r} in {text!r}: the groups are {', '.join(RANK_GROUPS)}")
        try:
            rank = int(value)
        except ValueError:
            raise ValueError(f"expected a rank (an integer ≥ 1), not {value!r}") from None
        if rank < 1:
            raise ValueError(f"a LoRA rank is at least 1, not {rank}")
        ranks[group] = rank
    return ranks["*"] if list(ranks) == ["*"] else ranks


def truncate_saved(
    directory: str | Path,
    output: str | Path,
    rank: int | str,
    *,
    base_config: Optional[str | Path] = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write to ``output`` the adapter of ``directory`` cut to rank ``rank`` — a number, or
    ``"suggested"``: the rank :func:`inspect_adapter` suggests for the model, for every module
    (one module's own spectral reading is too noisy to cut it alone: in validation, modules
    that all needed 4 directions read 0 to 4). A module of a lower rank keeps its own.
    Returns the rank of each module written
    (:func:`lora_monitor.adapters.truncation.truncate_adapter`).

    Raises:
        LoRAMonitorError: ``output`` exists (a file; a directory, unless ``overwrite``); the
            rank is not below the adapter's largest rank (nothing would be cut); ``"suggested"``
            and no rank is suggested (no spectral gap anywhere).
    """
    from lora_monitor.adapters import LoRAMonitorError
    from lora_monitor.adapters.truncation import truncate_adapter

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LoRAMonitorError(f"the output {output} is a file: give a new directory to write the adapter to")
    if output.exists() and not overwrite:
        raise LoRAMonitorError(
            f"the output directory {output} exists: give a new directory, or replace the adapter in it (overwrite=True)"
        )
    from lora_monitor.adapters.kinds import trained_modules

    saved = SavedFactors.open(directory, base_config=base_config)
    largest = max(f.lora_A.shape[0] for f in saved.factors.values())
    if rank == "suggested":
        _, recommendation = inspect_adapter(directory, base_config=base_config)
        if recommendation.rank is None:
            raise LoRAMonitorError(
                f"no rank is suggested for {directory} (no ΔW shows a spectral gap), so there is "
                f"nothing to cut it to; give --rank K"
            )
        if recommendation.per_kind is not None:
            return truncate_adapter(directory, output, recommendation.module_ranks())
        if recommendation.rank >= largest:
            raise LoRAMonitorError(
                f"the rank suggested for {directory} is its own, r = {largest}: nothing to cut (the "
                f"update may need all of its rank, or more)"
            )
        rank = recommendation.rank
    if isinstance(rank, dict):
        by_module = {}
        for module in trained_modules(saved.factors):
            wanted = rank.get(module.group or "*", rank.get("*"))
            if wanted is None:
                named = " or ".join(sorted({module.group or "*"} - {"*"})) or "a rank without a group"
                raise LoRAMonitorError(
                    f"{module.name} has no rank in {rank}: give it {named} (e.g. --rank 4,attention=2,mlp=8)"
                )
            by_module[module.name] = min(wanted, module.rank)
        if all(by_module[m.name] >= m.rank for m in trained_modules(saved.factors)):
            raise LoRAMonitorError(f"{directory}: the ranks {rank} would leave every module as it is")
        return truncate_adapter(directory, output, by_module)
    if isinstance(rank, str) and rank != "suggested":
        raise LoRAMonitorError(f"unknown rank {rank!r}: give a rank K, 'suggested' or attention=K,mlp=K")
    if int(rank) >= largest:
        raise LoRAMonitorError(
            f"{directory} has rank r = {largest}: cutting it to {rank} would leave every module as "
            f"it is; give a rank below {largest} (inspect suggests one)"
        )
    return truncate_adapter(directory, output, int(rank))
