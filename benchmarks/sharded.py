"""Issue 16, "Scale": one snapshot of a Llama-70B-shaped adapter, on one process and spread over two.

Llama-70B's shapes: 80 layers, d = 8192, GQA with 8 key-value heads (k and v project to 1024),
MLP 28672; LoRA r = 64 on q and v, or on every linear module ("all-linear": q, k, v, o, gate,
up, down). One snapshot is what the monitor does at a scheduled step, with the engine's own
functions, under FSDP2:

- the LoRA factors, sharded row-wise across the ranks as ``fully_shard`` leaves them
  (DTensors), are gathered whole one module at a time, on every rank, and each rank copies
  only the modules it analyzes, its share (:func:`lora_monitor.engine.distributed.capture_kept`
  with :func:`~lora_monitor.engine.distributed.rank_share`, as the monitor does);
- the analysis of the share against the run's first snapshot — as each rank keeps it: its
  share only, the bases cached — the small results all-gathered: spectra, φ grids, and ΔW's
  singular vectors where W₀ is used.

W₀ itself does not fit this machine at 70B (q alone is 20 GiB in float32 over 80 layers), so the
W₀ products — each rank's block of ``Uᵀ W₀ V`` and ‖W₀‖² (``block_projection``), summed by one
all-reduce — are timed on one layer's real bfloat16 weights, this rank's rows only, and
multiplied by the number of layers (said so in the output).

Printed per world size (1, and 2 over gloo on CPU, one thread each): wall seconds of the
snapshot; per rank, the resident memory of the reference it keeps (the first snapshot and its
bases, held from step to step) and the snapshot's peak extra resident memory above that and the
sharded factors (read from the kernel's high-water mark, reset before), their sum the monitor's
memory on that rank; and each rank's share of the modules. Example::

    python benchmarks/sharded.py                 # q/v and all-linear, 80 layers
    python benchmarks/sharded.py --targets qv --layers 20
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_monitor.adapters import LoRAFactors  # noqa: E402
from lora_monitor.analysis import ReferenceBases, analyze  # noqa: E402
from lora_monitor.engine.distributed import all_gather_objects, capture_kept, rank_share  # noqa: E402
from lora_monitor.functional.svd import factored_svd  # noqa: E402
from lora_monitor.functional.weights import block_projection  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 8192, 28672, 1024
#: projection → (out features d, in features k)
SHAPES = {
    "q": (HIDDEN, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN),
    "up_proj": (INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}
TARGETS = {"qv": ("q", "v"), "all-linear": tuple(SHAPES)}
RANK = 64
GiB = 2**30


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the resident high-water mark (VmHWM)


def _memory(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) * 1024


def _factors(layers: int, projections: tuple[str, ...], world_size: int, rank: int, seed: int):
    """The adapter's factors as each rank holds them: DTensors sharded on dim 0 over the ranks
    (plain tensors with one process). ``lora_B`` has ΔW's scale, A is unit-norm rows."""
    mesh = None
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(layers):
        for projection in projections:
            d, k = SHAPES[projection]
            A = torch.randn(RANK, k, generator=generator) / k**0.5
            B = torch.randn(d, RANK, generator=generator) * 1e-3
            if mesh is not None:
                from torch.distributed.tensor import Shard, distribute_tensor

                # distribute_tensor scatters from rank 0: every rank built the same tensors.
                A, B = distribute_tensor(A, mesh, [Shard(0)]), distribute_tensor(B, mesh, [Shard(0)])
            factors[(layer, projection)] = LoRAFactors(f"layers.{layer}.{projection}", layer, projection, A, B, 1.0)
    return factors


def _snapshot(live, reference, bases, rank: int, world_size: int, step: int) -> None:
    snapshot = capture_kept(live, rank_share(live, rank, world_size), step)
    analyses = analyze(snapshot, reference, "A", reference_bases=bases)
    if world_size > 1:
        analyses = {key: a for part in all_gather_objects(analyses) for key, a in part.items()}
    assert len(analyses) == len(live)


def _base_products(projections: tuple[str, ...], rank: int, world_size: int) -> float:
    """Seconds of one layer's W₀ products on this rank's rows (bfloat16 W₀, as 70B is kept)."""
    generator = torch.Generator().manual_seed(7)
    seconds = 0.0
    for projection in projections:
        d, k = SHAPES[projection]
        rows = slice(rank * -(-d // world_size), min(d, (rank + 1) * -(-d // world_size)))
        block = torch.randn(rows.stop - rows.start, k, generator=generator).to(torch.bfloat16)
        U, _, Vh = factored_svd(torch.randn(d, RANK, generator=generator), torch.randn(RANK, k, generator=generator))
        start = time.perf_counter()
        block_projection(U[rows], Vh, block)
        block.float().square().sum()
        seconds += time.perf_counter() - start
    return seconds


def _worker(rank: int, world_size: int, port: int, args, results) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for target in args.targets:
            projections = TARGETS[target]
            live = _factors(args.layers, projections, world_size, rank, seed=0)
            held = _memory("VmRSS")
            # The run's first snapshot, the reference: this rank's share, as the monitor keeps it.
            first = capture_kept(live, rank_share(live, rank, world_size), 0)
            bases = ReferenceBases.compute(first.factors, first.factors, "A")
            held = _memory("VmRSS") - held
            times, peaks = [], []
            for repeat in range(args.repeats):
                if world_size > 1:
                    dist.barrier()
                before = _memory("VmRSS")
                _peak_reset()
                start = time.perf_counter()
                _snapshot(live, first.factors, bases, rank, world_size, step=repeat + 1)
                if world_size > 1:
                    dist.barrier()
                times.append(time.perf_counter() - start)
                peaks.append(_memory("VmHWM") - before)
            base_seconds = _base_products(projections, rank, world_size) * args.layers
            results[(target, world_size, rank)] = {
                "seconds": statistics.median(times),
                "peak": max(peaks),
                "reference": held,
                "modules": len(rank_share(live, rank, world_size)),
                "total": len(live),
                "base_seconds": base_seconds,
            }
            del live, first, bases
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        for world_size in args.world_sizes:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.spawn(_worker, args=(world_size, port, args, results), nprocs=world_size)
        results = dict(results)
    print(
        f"Llama-70B shapes, {args.layers} layers, r = {RANK}, float32 factors, CPU, 1 thread a rank, "
        f"median of {args.repeats} snapshots (the reference's bases cached):"
    )
    for target in args.targets:
        for world_size in args.world_sizes:
            ranks = [results[(target, world_size, rank)] for rank in range(world_size)]
            seconds = max(r["seconds"] for r in ranks)
            base = max(r["base_seconds"] for r in ranks)
            print(
                f"  {target:10s} world size {world_size}: snapshot {seconds:.2f} s (gather, copy, spread "
                f"analysis); + W₀ products ≈ {base:.1f} s a rank (one layer's bfloat16 W₀ timed on this "
                f"rank's rows × {args.layers})"
            )
            for i, r in enumerate(ranks):
                kept, peak = r["reference"] / GiB, r["peak"] / GiB
                print(
                    f"    rank {i}: {r['modules']}/{r['total']} modules; reference kept {kept:.2f} GiB + "
                    f"snapshot peak extra {peak:.2f} GiB = {kept + peak:.2f} GiB"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
