"""Issue 4, "Scale": with several ranks, is spreading the per-layer analysis faster?

Under DDP every rank holds the whole adapter. Without spreading, every rank analyses every module
(only rank zero logs). Spread, each rank analyses every ``world_size``-th module and the small
results are gathered on all ranks — what :class:`lora_monitor.LoRASubspaceMonitor` does in a
multi-process run, with the same functions: :func:`lora_monitor.engine.distributed.rank_share`,
:func:`lora_monitor.analysis.analyze` (reference bases cached per rank, as the monitor keeps
them) and :func:`lora_monitor.engine.distributed.all_gather_objects`.

Runs ``--world-size`` CPU processes over gloo (one thread each), times both ways side by side,
alternating, from the moment the ranks start the analysis to the moment all of them are done
(a barrier ends the unspread one, the gather ends the spread one), and prints the ratio for a
Llama-7B-shaped adapter (32 layers × (q, v), d = k = 4096, r = 64 against a rank-8 reference)
and for the MiniLM example's shapes (6 layers, d = 384, r = 8 against 64). Exit status 1 when
spreading is slower at 7B shapes. Example::

    python benchmarks/spread.py
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analysis import adapter  # noqa: E402
from common import Targets  # noqa: E402

from lora_monitor.engine.distributed import all_gather_objects, rank_share  # noqa: E402
from lora_monitor.analysis import ReferenceBases, Snapshot, analyze  # noqa: E402

#: name → (layers, d = k, rank, reference rank)
SHAPES = {
    "Llama-7B-shaped, 32 × (q, v), d = 4096, r = 64 vs 8": (32, 4096, 64, 8),
    "MiniLM-shaped, 6 × (q, v), d = 384, r = 8 vs 64": (6, 384, 8, 64),
}


def _timed(run) -> float:
    dist.barrier()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _worker(rank: int, world_size: int, port: int, repeats: int, basis: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cpu = torch.device("cpu")
        for name, (layers, dim, lora_rank, reference_rank) in SHAPES.items():
            # The same adapter on every rank, as DDP keeps it.
            snapshot = Snapshot.capture(adapter(layers, dim, lora_rank, 0, cpu), step=1)
            reference = adapter(layers, dim, reference_rank, 1, cpu)
            keys = rank_share(snapshot.factors, rank, world_size)
            share = Snapshot(step=1, factors={key: snapshot.factors[key] for key in keys})
            all_bases = ReferenceBases.compute(reference, snapshot.factors, basis)
            share_bases = ReferenceBases.compute(reference, share.factors, basis)

            def everything() -> None:
                analyze(snapshot, reference, basis, reference_bases=all_bases)
                dist.barrier()

            def spread() -> None:
                analyses = all_gather_objects(analyze(share, reference, basis, reference_bases=share_bases))
                assert sum(map(len, analyses)) == len(snapshot.factors)

            times: dict[str, list[float]] = {"every rank analyses every module": [], "spread over the ranks": []}
            for repeat in range(repeats + 1):  # the first round warms up
                for label, run in zip(times, (everything, spread)):
                    seconds = _timed(run)
                    if repeat:
                        times[label].append(seconds)
            if rank == 0:
                results[name] = {label: statistics.median(values) for label, values in times.items()}
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="CPU processes (ranks)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--basis", default="delta_w_left", choices=["A", "B", "delta_w_left", "delta_w_right"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(
            _worker, args=(args.world_size, port, args.repeats, args.basis, results), nprocs=args.world_size
        )
        results = dict(results)
    print(f"{args.world_size} ranks (gloo, CPU, 1 thread each), basis {args.basis!r}, medians of {args.repeats}:")
    targets = Targets()
    for name, medians in results.items():
        unspread, spread = medians.values()
        print(f"  {name}: every rank all modules {1000 * unspread:.1f} ms, spread {1000 * spread:.1f} ms "
              f"({spread / unspread:.2f}×)")
    unspread, spread = results[next(iter(SHAPES))].values()
    targets.check("7B shapes: spread analysis time / unspread", spread / unspread, 1.0, "×")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
