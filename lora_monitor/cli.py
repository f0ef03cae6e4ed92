"""``lora-monitor``: the LoRA paper's figures and a rank suggestion from adapters saved on disk.

    lora-monitor compare REF_DIR DIR [-o phi.png]   # φ figure of two adapters + suggested rank
    lora-monitor inspect DIR                        # spectral table of one adapter

The directories are what peft's ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``); no base model is loaded, so the figures that need W₀
(amplification, intruder dimensions, ‖ΔW‖/‖W₀‖) come from the training callback instead.
Errors in the input (a missing directory, one that holds no LoRA adapter, adapters of two
different base models) end with exit status 2 and a one-line message on stderr.

Start-up is kept to argparse: torch, safetensors and the analysis are imported by the commands
that use them (``--help`` and a usage error never load torch), matplotlib only when a figure is
drawn. An adapter is read and analyzed a part of a shape group at a time
(:class:`SavedFactors`, :func:`analyze_saved`), so that memory holds one part, not the adapter.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

from lora_monitor.functional.bases import BASES, Basis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lora_monitor.adapters import LoRAFactors, ModuleKey
    from lora_monitor.analysis import ModuleAnalysis
    from lora_monitor.analysis.rank import RankRecommendation


#: Bytes of LoRA factors (the adapter's and its reference's) read and analyzed at once. Big
#: enough that a part of a 7B-shaped adapter's shape group is several modules (the analysis
#: batches them), small against the torch runtime's own resident memory.
CHUNK_BYTES = 16 * 2**20

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
class SavedFactors:
    """The selected modules of an adapter directory, whose factors are read part by part.

    ``factors`` holds every selected module with meta tensors (shapes and ranks, no data) from
    the safetensors header; :meth:`read` gives some of them with their values. An
    ``adapter_model.bin`` cannot be read in parts: its factors are all read at once.
    """

    path: Path
    factors: dict[ModuleKey, LoRAFactors]
    #: The base model's config.json (or its directory), to split fused q|k|v modules.
    base_config: Optional[Path] = None

    @classmethod
    def open(
        cls,
        directory: str | Path,
        projections: Optional[Sequence[str]] = None,
        layers: Optional[Sequence[int]] = None,
        base_config: Optional[str | Path] = None,
    ) -> SavedFactors:
        """Read the adapter's config and header only (and ``base_config``, see
        :func:`~lora_monitor.adapters.load_adapter`).

        Raises:
            LoRAMonitorError: as :func:`lora_monitor.adapters.load_adapter` and
                :func:`lora_monitor.adapters.select_factors`.
        """
        from lora_monitor.adapters import load_adapter, select_factors

        path = Path(directory)
        config = Path(base_config) if base_config is not None else None
        factors = load_adapter(path, config, modules=()).factors
        return cls(path, select_factors(factors, projections, layers), config)

    def read(self, keys: Iterable[ModuleKey]) -> dict[ModuleKey, LoRAFactors]:
        """The factors of ``keys`` with their values (only their modules' tensors are read)."""
        keys = list(keys)
        if not any(self.factors[k].lora_A.is_meta for k in keys):
            return {k: self.factors[k] for k in keys}
        from lora_monitor.adapters import load_adapter

        read = load_adapter(self.path, self.base_config, modules={self.factors[k].module_name for k in keys}).factors
        return {k: read[k] for k in keys}


def _parts(adapters: Sequence[dict[ModuleKey, LoRAFactors]], chunk_bytes: int) -> list[list[ModuleKey]]:
    """The keys of ``adapters[0]`` grouped as :func:`~lora_monitor.analysis.analyze` batches
    them (same shapes in every adapter), each group cut into parts of at most ``chunk_bytes``
    of factors (at least one module a part)."""
    from lora_monitor.analysis import group_by_shape

    groups = group_by_shape(adapters[0], adapters[1] if len(adapters) > 1 else None)
    parts: list[list[ModuleKey]] = []
    for keys in groups.values():
        part: list[ModuleKey] = []
        size = 0
        for key in keys:
            nbytes = sum(t.numel() * t.element_size() for f in adapters for t in (f[key].lora_A, f[key].lora_B))
            if part and size + nbytes > chunk_bytes:
                parts.append(part)
                part, size = [], 0
            part.append(key)
            size += nbytes
        parts.append(part)
    return parts


def analyze_saved(
    current: SavedFactors,
    reference: Optional[SavedFactors] = None,
    basis: Basis = "A",
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[ModuleKey, ModuleAnalysis]:
    """:func:`~lora_monitor.analysis.analyze` of a saved adapter (against a saved reference),
    reading and analyzing ``chunk_bytes`` of factors at a time: every module's analysis is its
    own, so the results are those of the whole adapter analyzed at once, while peak memory
    is one part's factors and temporaries. A module absent from ``reference`` is an error of
    :func:`~lora_monitor.adapters.check_reference_compatible`, checked before anything is read.
    """
    from lora_monitor.adapters import check_reference_compatible
    from lora_monitor.analysis import Snapshot, analyze

    if reference is not None:
        check_reference_compatible(current.factors, reference.factors, basis)
    adapters = [current.factors] if reference is None else [current.factors, reference.factors]
    analyses: dict[ModuleKey, ModuleAnalysis] = {}
    for keys in _parts(adapters, chunk_bytes):
        snapshot = Snapshot(step=0, factors=current.read(keys))
        analyses.update(analyze(snapshot, reference.read(keys) if reference is not None else None, basis))
    return analyses


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
    recommendation = recommend_rank(analyses, basis)
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
    """The spectral table of one saved adapter and the rank its spectra alone suggest
    (``base_config`` as for :func:`compare_adapters`)."""
    from lora_monitor.analysis.rank import ModuleEvidence, recommend_rank
    from lora_monitor.outputs.report import spectrum_table

    analyses = analyze_saved(SavedFactors.open(directory, projections, layers, base_config))
    rows = [ModuleEvidence.from_analysis(analysis, use_phi=False) for _, analysis in sorted(analyses.items())]
    return spectrum_table(rows), recommend_rank(analyses, "A")


# ------------------------------------------------------------------------------------ parser


def _add_selection(parser: argparse.ArgumentParser, projections_default: Optional[list[str]]) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads of torch for the analysis (default: 1; its batched small QRs and r×r "
        "SVDs gain little from more, and lose several times over when the cores are shared)",
    )
    parser.add_argument(
        "--projections",
        nargs="+",
        default=projections_default,
        metavar="P",
        help="projections to analyze, as peft target_modules names or canonical q/k/v/o "
        f"(default: {' '.join(projections_default) if projections_default else 'all'})",
    )
    parser.add_argument(
        "--layers", nargs="+", type=int, default=None, metavar="L", help="layer indices to analyze (default: all)"
    )
    parser.add_argument(
        "--base-config",
        default=None,
        metavar="PATH",
        help="the base model's config.json (or its directory), to split fused q|k|v modules "
        "(c_attn, qkv_proj, query_key_value) whose per-head layout the adapter alone does not "
        "tell (default: a config.json beside the adapter or in its base_model_name_or_path)",
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
    comparing.add_argument(
        "directory", metavar="DIR", help="adapter directory to compare with it (e.g. rank 64, or seed 1)"
    )
    comparing.add_argument(
        "--basis",
        choices=list(BASES),
        default="A",
        help="singular vectors compared: "
        + "; ".join(f"{info.name}: {info.description}" for info in BASES.values())
        + " (default: A)",
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
        description="Print, per module, ‖ΔW‖_F, σ₁, σ₁/σ₂, the 90 %-energy rank, the effective "
        "rank (Roy & Vetterli) and the stable rank of ΔW = s·B·A, from the factors (ΔW is never "
        "formed), then the rank these spectra alone suggest.",
    )
    inspecting.add_argument("directory", metavar="DIR", help="adapter directory")
    _add_selection(inspecting, None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a bad input)."""
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        build_parser().error(f"--threads must be at least 1, not {args.threads}")
    import torch  # after parsing: --help and usage errors load no torch

    from lora_monitor.adapters import LoRAMonitorError
    from lora_monitor.outputs.report import CAUTIONS_BELOW, report_markdown, summary_line

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # restored below: main() may run inside a longer process
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
                base_config=args.base_config,
            )
            print(_comparison_header(args, result))
            print()
            print(report_markdown(result.recommendation))
            if result.figure_path is not None:
                print(f"\nfigure: {result.figure_path}")
        else:
            table, recommendation = inspect_adapter(
                args.directory, projections=args.projections, layers=args.layers, base_config=args.base_config
            )
            cautions = "".join(f"\n- {caution}" for caution in recommendation.cautions)
            print(f"# {args.directory}\n\n{table}\n\n{summary_line(recommendation, CAUTIONS_BELOW)}{cautions}")
    except LoRAMonitorError as error:
        print(f"lora-monitor: error: {in_flags(str(error))}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


#: How the library's messages name its arguments (as a Python call would pass them), and how
#: this command line spells them.
ARGUMENT_FLAGS = {
    "target_modules=/layers=": "--projections/--layers",
    "target_modules [": "--projections [",
    "and layers [": "and --layers [",
    "(base_config=)": "(--base-config)",
}


def in_flags(message: str) -> str:
    """A library message on one line, its advice in this command line's flags, not in Python
    arguments (``target_modules=`` is ``--projections`` here)."""
    message = " ".join(message.split())
    if message.startswith("layers ["):
        message = "--" + message
    for argument, flag in ARGUMENT_FLAGS.items():
        message = message.replace(argument, flag)
    return message


def _comparison_header(args: argparse.Namespace, result: Comparison) -> str:
    from lora_monitor.functional.similarity import random_subspace_similarity

    phi = [a.phi for a in result.analyses.values() if a.phi is not None]
    dimension = next(a.dimension for a in result.analyses.values() if a.phi is not None)
    assert dimension is not None  # every analysis with φ knows its space
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
