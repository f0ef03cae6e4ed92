"""``lora-monitor``: the LoRA paper's figures, a rank suggestion, and a smaller adapter, from
adapters saved on disk.

    lora-monitor compare REF_DIR DIR [-o phi.png]      # φ figure of two adapters + suggested rank
    lora-monitor inspect DIR                           # spectral table of one adapter + its rank
    lora-monitor truncate DIR --rank K|suggested -o OUT  # the adapter cut to its best rank K

The directories are what peft's ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``); no base model is loaded, so the figures that need W₀
(amplification, intruder dimensions, ‖ΔW‖/‖W₀‖) come from the training callback instead.
Errors in the input (a missing directory, one that holds no LoRA adapter, adapters of two
different base models, an output that exists, a path the file system refuses) end with exit
status 2 and a one-line message on stderr; nothing is overwritten unless ``--overwrite`` says so.

Start-up is kept to argparse: torch, safetensors and the analysis are imported by the commands
that use them (``--help`` and a usage error never load torch), matplotlib only when a figure is
drawn. An adapter is read and analyzed a part of a shape group at a time
(:class:`~lora_monitor.cli.reading.SavedFactors`), so that memory holds one part, not the adapter.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Optional

from lora_monitor.cli.commands import Comparison, compare_adapters, inspect_adapter, parse_ranks, truncate_saved
from lora_monitor.functional.bases import BASES


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
        "paper's φ heatmaps of two adapters, a suggested rank, spectra, and the adapter cut to "
        "a smaller rank.",
        epilog="Examples:\n"
        "  lora-monitor compare adapters/r8 adapters/r64 -o rank8_vs_rank64.png\n"
        "  lora-monitor compare adapters/r64_seed0 adapters/r64_seed1 --basis delta_w_left -o seeds.svg\n"
        "  lora-monitor inspect adapters/r64\n"
        "  lora-monitor truncate adapters/r64 --rank suggested -o adapters/r64_cut\n"
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
        description="Print, per module, the spectral gap rank, ‖ΔW‖_F, σ₁, σ₁/σ₂, the 90 %-energy "
        "rank, the effective rank (Roy & Vetterli) and the stable rank of ΔW = s·B·A, from the "
        "factors (ΔW is never formed), then the rank the spectral gaps alone suggest (a saved "
        "adapter holds no batch for the functional probe) and what to do with it.",
    )
    inspecting.add_argument("directory", metavar="DIR", help="adapter directory")
    _add_selection(inspecting, None)

    truncating = commands.add_parser(
        "truncate",
        help="write the adapter cut to a smaller rank (its best rank-K approximation)",
        description="Write to OUT a peft adapter whose every ΔW is the best rank-K approximation "
        "of DIR's (its top K singular directions), loadable by PeftModel.from_pretrained; "
        "modules of another rank go through peft's rank_pattern. K is a number; a rank per group, "
        "attention=K,mlp=K (an entry without a group: every other module); or 'suggested': the "
        "rank `inspect` suggests for the model, for every module, or per group where attention's "
        "and the MLP's readings differ more than 2×.",
    )
    truncating.add_argument("directory", metavar="DIR", help="adapter directory")
    truncating.add_argument(
        "--rank",
        required=True,
        metavar="K",
        type=_rank_argument,
        help="a rank K ≥ 1, attention=K,mlp=K, or 'suggested'",
    )
    truncating.add_argument("-o", "--output", required=True, metavar="OUT", help="directory to write the adapter to")
    truncating.add_argument(
        "--overwrite", action="store_true", help="replace the adapter in OUT if that directory exists (else refused)"
    )
    truncating.add_argument(
        "--base-config", default=None, metavar="PATH", help="as for inspect: to split fused q|k|v modules"
    )
    truncating.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads of torch (default: 1)")
    return parser


def _rank_argument(text: str) -> int | str | dict[str, int]:
    try:
        return parse_ranks(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (give a rank K, attention=K,mlp=K or 'suggested')") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for a bad input)."""
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        build_parser().error(f"--threads must be at least 1, not {args.threads}")
    import torch  # after parsing: --help and usage errors load no torch

    from lora_monitor.adapters import LoRAMonitorError
    from lora_monitor.outputs.rank_text import CAUTIONS_BELOW, advice, report_markdown, summary_line

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
            print(report_markdown(result.recommendation, adapter_dir=args.directory))
            if result.figure_path is not None:
                print(f"\nfigure: {result.figure_path}")
        elif args.command == "inspect":
            table, recommendation = inspect_adapter(
                args.directory, projections=args.projections, layers=args.layers, base_config=args.base_config
            )
            print(f"# {args.directory}\n\n{table}\n\n{summary_line(recommendation, CAUTIONS_BELOW)}\n")
            print(f"What to do: {advice(recommendation, adapter_dir=args.directory)}")
            if recommendation.cautions:
                print("\nCautions:\n" + "\n".join(f"- {caution}" for caution in recommendation.cautions))
        else:
            ranks = truncate_saved(
                args.directory, args.output, args.rank, base_config=args.base_config, overwrite=args.overwrite
            )
            counts = ", ".join(f"{n} at rank {r}" for r, n in sorted(Counter(ranks.values()).items()))
            print(f"wrote {args.output}: {len(ranks)} modules ({counts}); load it with PeftModel.from_pretrained")
    except LoRAMonitorError as error:
        print(f"lora-monitor: error: {in_flags(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that cannot be read or written: the file system's words
        where = f"{error.filename}: " if error.filename else ""
        print(f"lora-monitor: error: {where}{error.strerror or error}", file=sys.stderr)
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
    "(overwrite=True)": "(--overwrite)",
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
