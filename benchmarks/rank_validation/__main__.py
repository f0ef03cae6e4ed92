"""``python benchmarks/rank_validation [--quick] [--cache DIR] [train|evaluate|report|all]``: see the
package's docstring (``benchmarks/rank_validation/__init__.py``)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Optional

# Run as a directory, this file's folder is on sys.path, not the benchmarks: the package's
# own import puts them there.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import rank_validation  # noqa: E402
from rank_validation.cases import settings_for  # noqa: E402
from rank_validation.evaluation import evaluate  # noqa: E402
from rank_validation.report import report  # noqa: E402
from rank_validation.scoring import TRUTHS  # noqa: E402
from rank_validation.training import planned_jobs, run_jobs, worker  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=rank_validation.__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "phase",
        nargs="?",
        default="all",
        choices=("all", "train", "evaluate", "report", "worker", "heldout-train", "heldout-evaluate", "heldout-report"),
    )
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: K4_flat at r = 2, 4, 64 (2 seeds) and the example at r = 64 (2 seeds), 60 steps",
    )
    parser.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/lora_monitor/rank_validation"),
        help="where runs, teachers, logs and results.json go (in DIR/full, or DIR/quick)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (each on one thread)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=("planted", "example"),
        choices=("planted", "example"),
        help="train only these tasks",
    )
    parser.add_argument("--cases", nargs="+", default=None, help="held-out phases: only these held-out cases")
    parser.add_argument("--figure", default=None, help="draw the figure into this PNG (docs/rank_validation.png)")
    parser.add_argument("--truth", default="trunc", choices=tuple(TRUTHS), help="the k* the tables are scored against")
    parser.add_argument("--reevaluate", action="store_true", help="recompute the cached readings")
    parser.add_argument(
        "--aggregate",
        default="max",
        choices=("max", "second", "median"),
        help="model-level reading of the candidates' per-module readings",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase == "worker":
        worker(args.rest)
        return 0
    cache = pathlib.Path(args.cache) / ("quick" if args.quick else "full")
    settings = settings_for(args.quick)
    if args.phase.startswith("heldout"):
        return heldout_main(args, pathlib.Path(args.cache), settings)
    t0 = time.perf_counter()
    ok = True
    if args.phase in ("all", "train"):
        run_jobs(cache, args.quick, planned_jobs(settings, args.only), args.jobs)
        print(f"training phase: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.phase in ("all", "evaluate"):
        t1 = time.perf_counter()
        evaluate(cache, settings, reevaluate=args.reevaluate)
        print(f"evaluation phase: {time.perf_counter() - t1:.0f} s", flush=True)
    if args.phase in ("all", "report"):
        results = json.loads((cache / "results.json").read_text())
        ok = report(results, settings, figure=args.figure, how=args.aggregate, truth=args.truth)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


def heldout_main(args: argparse.Namespace, cache: pathlib.Path, settings) -> int:
    """The held-out cases (``rank_validation.heldout``): trained one run at a time on one thread,
    in ``CACHE/heldout``."""
    if args.phase == "heldout-train":
        from rank_validation.heldout_training import train_heldout

        train_heldout(cache, settings, args.cases)
        return 0
    from rank_validation.heldout_eval import evaluate_heldout, report_heldout

    if args.phase == "heldout-evaluate":
        evaluate_heldout(cache, settings, args.cases, reevaluate=args.reevaluate)
    return 0 if report_heldout(cache, settings) else 1


if __name__ == "__main__":
    raise SystemExit(main())
