"""``lora-monitor``: the LoRA paper's figures and a rank suggestion from adapters saved on disk.

    lora-monitor compare REF_DIR DIR [-o phi.png]   # φ figure of two adapters + suggested rank
    lora-monitor inspect DIR                        # spectral table of one adapter

The directories are what peft's ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``); no base model is loaded, so the figures that need W₀
(amplification, intruder dimensions, ‖ΔW‖/‖W₀‖) come from the training callback instead.
Errors in the input (a missing directory, one that holds no LoRA adapter, adapters of two
different base models) end with exit status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, TextIO

from matplotlib.figure import Figure

from lora_monitor.adapters import (
    LoRAFactors,
    LoRAMonitorError,
    ModuleKey,
    check_reference_compatible,
    load_adapter,
    select_factors,
)
from lora_monitor.functional import BASES, random_subspace_similarity
from lora_monitor.plots import comparison_figure
from lora_monitor.recommend import RankRecommendation, markdown_table, recommend_rank
from lora_monitor.snapshots import ModuleAnalysis, Snapshot, analyze

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


def _selected(path: Path, projections: Optional[Sequence[str]], layers: Optional[Sequence[int]]) -> dict[ModuleKey, LoRAFactors]:
    return select_factors(load_adapter(path).factors, projections, layers)


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
    basis: str = "A",
    projections: Optional[Sequence[str]] = ("q", "v"),
    layers: Optional[Sequence[int]] = None,
    output: Optional[str | Path] = None,
    baseline: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> Comparison:
    """φ(reference, adapter, i, j) of two saved adapters, the figure, and the suggested rank.

    Args:
        reference_dir, directory: adapter directories written by ``save_pretrained`` (two
            ranks, e.g. 8 and 64, or two seeds) of the same base model.
        basis: the singular vectors compared (see :data:`lora_monitor.functional.BASES`).
        projections, layers: which modules (``None``: all); the figure draws every selected
            layer, a row each.
        output: the figure file, PNG or SVG by its extension; None: no figure.
        baseline: add two rows of random-subspace φ (mean and one draw, ``seed``) to the figure.
        progress: draw a progress bar on stderr.

    Raises:
        LoRAMonitorError: a directory is missing or holds no LoRA adapter, the adapters do not
            share the selected modules or were trained on different base models, the output
            extension is not .png/.svg.
    """
    figure_format = _figure_format(output)
    bar = _Progress(4 if output is not None else 3, progress)
    reference = _selected(Path(reference_dir), projections, layers)
    current = _selected(Path(directory), projections, layers)
    check_reference_compatible(current, reference, basis)
    bar.step("adapters loaded")
    analyses = analyze(Snapshot(step=0, factors=current), reference, basis)
    if all(a.phi is None for a in analyses.values()):
        problems = "; ".join(sorted({p for a in analyses.values() for p in a.problems}))
        raise LoRAMonitorError(f"no module of {directory} could be compared with {reference_dir}: {problems}")
    bar.step("φ grids computed")
    recommendation = recommend_rank(analyses, basis)
    bar.step("rank suggested")
    key = next(iter(current))
    reference_rank, rank = reference[key].rank, current[key].rank
    figure = figure_path = None
    if output is not None:
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
        raise LoRAMonitorError(
            f"cannot write a figure to {output}: the extension must be one of "
            f"{', '.join(FIGURE_FORMATS)} (PNG or SVG)"
        )
    return suffix[1:]


def spectral_table(analyses: dict[ModuleKey, ModuleAnalysis]) -> str:
    """One row per module: rank, ‖ΔW‖_F, σ₁, σ₁/σ₂ and the three spectral ranks, as Markdown."""
    rows = []
    for (layer, projection), analysis in sorted(analyses.items()):
        s = analysis.singular_values
        values = analysis.scalars
        gap = float(s[0] / s[1]) if s.numel() > 1 and float(s[1]) > 0 else float("inf")
        rows.append(
            [
                f"layer_{layer:02d}.{projection}",
                str(s.numel()),
                f"{values['delta_w_norm']:.4g}",
                f"{values['sigma_max']:.4g}",
                f"{gap:.3f}",
                f"{values['energy_rank']:g}",
                f"{values['effective_rank']:.2f}",
                f"{values['stable_rank']:.2f}",
            ]
        )
    headers = ["module", "r", "‖ΔW‖_F", "σ₁", "σ₁/σ₂", "energy rank (90 %)", "effective rank", "stable rank"]
    return markdown_table(headers, rows)


def inspect_adapter(
    directory: str | Path,
    *,
    projections: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
) -> tuple[str, RankRecommendation]:
    """The spectral table of one saved adapter and the rank its spectra alone suggest."""
    factors = _selected(Path(directory), projections, layers)
    analyses = analyze(Snapshot(step=0, factors=factors))
    return spectral_table(analyses), recommend_rank(analyses, "A")


# ------------------------------------------------------------------------------------ parser


def _add_selection(parser: argparse.ArgumentParser, projections_default: Optional[list[str]]) -> None:
    parser.add_argument(
        "--projections",
        nargs="+",
        default=projections_default,
        metavar="P",
        help="projections to analyse, as peft target_modules names or canonical q/k/v/o "
        f"(default: {' '.join(projections_default) if projections_default else 'all'})",
    )
    parser.add_argument(
        "--layers", nargs="+", type=int, default=None, metavar="L", help="layer indices to analyse (default: all)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-monitor",
        description="Subspace analysis of saved LoRA adapters (Hu et al. 2021, Section 7): the "
        "paper's φ heatmaps of two adapters, a suggested rank, and spectra.",
        epilog="Examples:\n"
        "  lora-monitor compare adapters/r8 adapters/r64 -o rank8_vs_rank64.png\n"
        "  lora-monitor compare adapters/r64_seed0 adapters/r64_seed1 --basis delta_w_left -o seeds.svg\n"
        "  lora-monitor inspect adapters/r64\n"
        "An adapter directory is what model.save_pretrained(DIR) writes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    comparing = commands.add_parser(
        "compare",
        help="φ heatmaps of two adapters (two ranks or two seeds) and a suggested rank",
        description="Draw φ(REF, DIR, i, j) per layer for ΔW_q and ΔW_v as in the LoRA paper "
        "(with a masked zoom on i, j ≤ the smaller rank when the ranks differ, and rows of "
        "random-subspace φ below for comparison), and print the suggested rank with its "
        "evidence as a Markdown table.",
    )
    comparing.add_argument("reference", metavar="REF_DIR", help="reference adapter directory (e.g. rank 8, or seed 0)")
    comparing.add_argument("directory", metavar="DIR", help="adapter directory to compare with it (e.g. rank 64, or seed 1)")
    comparing.add_argument(
        "--basis",
        choices=BASES,
        default="A",
        help="singular vectors compared: A (right singular vectors of lora_A, the paper's "
        "figure), B (left of lora_B), delta_w_left / delta_w_right (of ΔW) (default: A)",
    )
    _add_selection(comparing, ["q", "v"])
    comparing.add_argument(
        "-o", "--output", default="phi.png", metavar="FILE", help="figure file, .png or .svg (default: phi.png)"
    )
    comparing.add_argument("--no-figure", action="store_true", help="print the suggestion only")
    comparing.add_argument("--no-baseline", action="store_true", help="leave out the random-subspace rows")
    comparing.add_argument("--seed", type=int, default=0, help="seed of the random-subspace draw (default: 0)")
    comparing.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")

    inspecting = commands.add_parser(
        "inspect",
        help="spectral table of one adapter",
        description="Print, per module, ‖ΔW‖_F, σ₁, σ₁/σ₂, the 90 %%-energy rank, the effective "
        "rank (Roy & Vetterli) and the stable rank of ΔW = s·B·A, from the factors (ΔW is never "
        "formed), then the rank these spectra alone suggest.",
    )
    inspecting.add_argument("directory", metavar="DIR", help="adapter directory")
    _add_selection(inspecting, None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            result = compare_adapters(
                args.reference,
                args.directory,
                basis=args.basis,
                projections=args.projections,
                layers=args.layers,
                output=None if args.no_figure else args.output,
                baseline=not args.no_baseline,
                seed=args.seed,
                progress=not args.quiet,
            )
            print(_comparison_header(args, result))
            print()
            print(result.recommendation.to_markdown())
            if result.figure_path is not None:
                print(f"\nfigure: {result.figure_path}")
        else:
            table, recommendation = inspect_adapter(args.directory, projections=args.projections, layers=args.layers)
            print(f"# {args.directory}\n\n{table}\n\n{recommendation.summary()}")
    except LoRAMonitorError as error:
        message = " ".join(str(error).split())
        print(f"lora-monitor: error: {message}", file=sys.stderr)
        return 2
    return 0


def _comparison_header(args: argparse.Namespace, result: Comparison) -> str:
    phi = [a.phi for a in result.analyses.values() if a.phi is not None]
    dimension = next(a.dimension for a in result.analyses.values() if a.phi is not None)
    chance = float(random_subspace_similarity(dimension, 1, 1)[0, 0])
    mean_top = sum(float(p[0, 0]) for p in phi) / len(phi)
    return (
        f"# φ({args.reference} [r={result.reference_rank}], {args.directory} [r={result.rank}]), "
        f"basis {args.basis}, {len(phi)} modules\n\n"
        f"mean φ(1, 1) = {mean_top:.3f}; random subspaces of ℝ^{dimension}: {chance:.4f} "
        f"({mean_top / chance:.0f}× chance)"
    )


if __name__ == "__main__":
    sys.exit(main())
