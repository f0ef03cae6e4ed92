"""Target 1 and 3: a snapshot analysis of a Llama-7B-shaped adapter, its speed and its memory.

32 layers × (q, v), d = k = 4096, rank 64, compared with a rank-8 reference (an adapter
directory, whose bases the monitor decomposes once per run). Prints, measured side by side:

- analysis vs the dense path (ΔW materialized + dense SVD, timed on ``--dense-samples``
  matrices and scaled to all modules): target ≥ 1000×;
- ``analyze`` and ``factored_svd`` (U, S, Vh of every ΔW) vs the Householder-QR floor, one
  batched QR of the same factors (``torch.linalg.qr`` of the stacked B and Aᵀ): target ≤ 0.5×
  each (issue 12: well-conditioned factors take the Gram path, GEMMs instead of QR); the two
  Gram products BᵀB and AAᵀ are timed beside them, as the matrix-multiply speed;
- their accuracy on these factors: ``factored_svd`` of the first modules against float64 (UᵀU
  and VᵀV within 1e-4 of the identity, rebuilt ΔW within 1e-5) and the φ of ``analyze``
  against the dense path's (within 1e-5);
- peak memory the analysis adds, against one snapshot's bytes: target ≤ 3×. On CUDA from
  ``torch.cuda.max_memory_allocated``; on CPU from the peak resident set of a child process that
  only builds the snapshot and analyses it (torch's CPU allocations are invisible to
  tracemalloc; large ones are mmapped, so the resident set follows them).

Exit status 1 when a target is missed. Example::

    python benchmarks/analysis.py                      # CPU, 1 thread
    python benchmarks/analysis.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets, interleaved_medians, synchronize  # noqa: E402

from lora_monitor.functional import thin_qr  # noqa: E402
from lora_monitor.adapters import LoRAFactors, ModuleKey  # noqa: E402
from lora_monitor.functional import factored_svd, singular_basis, subspace_similarity  # noqa: E402
from lora_monitor.analysis import ReferenceBases, Snapshot, analyze  # noqa: E402


def adapter(layers: int, dim: int, rank: int, seed: int, device: torch.device) -> dict[ModuleKey, LoRAFactors]:
    """Random factors of a q/v LoRA adapter, built module by module (no large temporaries)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    factors = {}
    for layer in range(layers):
        for projection in ("q", "v"):
            A = torch.randn(rank, dim, generator=generator, device=device) / dim**0.5
            B = torch.randn(dim, rank, generator=generator, device=device) * 0.01
            factors[layer, projection] = LoRAFactors(
                module_name=f"model.layers.{layer}.self_attn.{projection}_proj",
                layer=layer,
                projection=projection,
                lora_A=A,
                lora_B=B,
                scaling=2.0,
            )
    return factors


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: the peak resident memory the analysis adds, as JSON on stdout."""
    device = torch.device("cpu")
    snapshot = Snapshot.capture(adapter(args.layers, args.dim, args.rank, 0, device), step=1)
    reference = adapter(args.layers, args.dim, args.reference_rank, 1, device)
    bases = ReferenceBases.compute(reference, snapshot.factors, args.basis)
    before = resident_bytes()
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one, so
    # that the peak read afterwards is the analysis's, not the set-up's.
    Path("/proc/self/clear_refs").write_text("5")
    analyze(snapshot, reference, args.basis, reference_bases=bases)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    print(json.dumps({"extra": max(peak - before, 0)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: repeatable on a shared machine)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reference-rank", type=int, default=8)
    parser.add_argument("--basis", default="delta_w_left", choices=["A", "B", "delta_w_left", "delta_w_right"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-samples", type=int, default=2, help="matrices the dense path is timed on")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    device = torch.device(args.device)
    modules = 2 * args.layers
    print(
        f"{args.layers} layers × (q, v), d = k = {args.dim}, r = {args.rank} against r = "
        f"{args.reference_rank}, basis {args.basis!r}, {device}, {torch.get_num_threads()} thread(s)"
    )
    snapshot = Snapshot.capture(adapter(args.layers, args.dim, args.rank, 0, device), step=1)
    reference = adapter(args.layers, args.dim, args.reference_rank, 1, device)
    synchronize(device)
    start = time.perf_counter()
    bases = ReferenceBases.compute(reference, snapshot.factors, args.basis)
    synchronize(device)
    print(f"reference bases, decomposed once per run: {time.perf_counter() - start:.3f} s")

    B = torch.stack([f.lora_B for f in snapshot.factors.values()])
    A = torch.stack([f.lora_A for f in snapshot.factors.values()])
    scaling = torch.tensor([float(f.scaling) for f in snapshot.factors.values()], device=device)
    on_gram = [int(thin_qr.gram_cholesky(X)[1].sum()) for X in (B, A.mT)]
    print(f"Gram path taken by {on_gram[0]}/{modules} B and {on_gram[1]}/{modules} Aᵀ (the rest: Householder QR)")
    floor_name, svd_name, analysis_name = "floor: batched QR of B and Aᵀ", "factored_svd", "analyze, cached reference bases"
    medians = interleaved_medians(
        {
            floor_name: lambda: (torch.linalg.qr(B), torch.linalg.qr(A.mT)),
            "Gram products BᵀB and AAᵀ": lambda: (B.mT @ B, A @ A.mT),
            svd_name: lambda: factored_svd(B, A, scaling),
            analysis_name: lambda: analyze(snapshot, reference, args.basis, reference_bases=bases),
            "analyze, reference decomposed again": lambda: analyze(snapshot, reference, args.basis),
        },
        args.repeats,
        device,
    )
    floor = medians[floor_name]
    for name, seconds in medians.items():
        print(f"  {name}: {seconds * 1e3:.1f} ms = {seconds / floor:.2f}× the floor (median of {args.repeats})")
    analysis = medians[analysis_name]

    # The dense path, per module: materialize ΔW, dense SVD, φ against the (cached) reference.
    keys = list(snapshot.factors)[: args.dense_samples]
    dense_reference = {
        key: singular_basis(reference[key].lora_B, reference[key].lora_A, reference[key].scaling, args.basis)
        for key in keys
    }
    dense_times, dense_phi = [], {}
    for key in keys:
        f = snapshot.factors[key]
        synchronize(device)
        start = time.perf_counter()
        delta = f.scaling * f.lora_B @ f.lora_A
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        vectors = U[:, : args.rank] if args.basis in ("B", "delta_w_left") else Vh[: args.rank].mT
        dense_phi[key] = subspace_similarity(dense_reference[key], vectors).cpu()
        synchronize(device)
        dense_times.append(time.perf_counter() - start)
    dense = sum(dense_times) / len(dense_times) * modules
    print(f"  dense path: {sum(dense_times) / len(dense_times):.2f} s a matrix → {dense:.1f} s for {modules} modules")

    # Accuracy of what was timed, on the same factors: factored_svd against float64, and φ
    # against the dense path's.
    U, S, Vh = factored_svd(B[: len(keys)], A[: len(keys)], scaling[: len(keys)])
    U, S, Vh = U.double(), S.double(), Vh.double()
    eye = torch.eye(args.rank, dtype=torch.float64, device=device)
    orthogonality = max(float((U.mT @ U - eye).abs().max()), float((Vh @ Vh.mT - eye).abs().max()))
    delta = scaling[: len(keys), None, None].double() * B[: len(keys)].double() @ A[: len(keys)].double()
    rebuilt = float((torch.linalg.matrix_norm((U * S[..., None, :]) @ Vh - delta) / torch.linalg.matrix_norm(delta)).max())
    analyzed = analyze(snapshot, reference, args.basis, reference_bases=bases)
    phi_error = max(float((analyzed[key].phi - dense_phi[key]).abs().max()) for key in keys)
    print(
        f"  accuracy on {len(keys)} module(s): factored_svd max |UᵀU − I|, |VᵀV − I| = {orthogonality:.1e}, "
        f"rebuilt ΔW {rebuilt:.1e} relative (float64 reference); φ vs the dense path {phi_error:.1e}"
    )

    snapshot_bytes = snapshot.nbytes
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        analyze(snapshot, reference, args.basis, reference_bases=bases)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        # glibc would keep freed blocks below its (growing) mmap threshold in the heap, and the
        # resident set would then count memory the analysis already gave back.
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", *sys.argv[1:]],
            capture_output=True, text=True, check=True, env=environment,
        )
        extra = json.loads(child.stdout.strip().splitlines()[-1])["extra"]
    print(f"  one snapshot: {snapshot_bytes / 2**20:.1f} MiB; peak extra during analysis: {extra / 2**20:.1f} MiB")
    reference_bytes = sum(t.numel() * t.element_size() for group in bases.groups.values() for t in group)
    print(f"  cached reference bases: {reference_bytes / 2**20:.1f} MiB")

    targets = Targets()
    print("targets:")
    targets.check("dense path / analysis ≥ 1000 (shown as analysis / dense × 1000)", analysis / dense * 1000, 1.0)
    print(f"         speed-up over the dense path: {dense / analysis:.0f}×")
    targets.check("analyze / Householder-QR floor", analysis / floor, 0.5, "×")
    targets.check("factored_svd / Householder-QR floor", medians[svd_name] / floor, 0.5, "×")
    targets.check("factored_svd: max |UᵀU − I|, |VᵀV − I|", orthogonality, 1e-4)
    targets.check("factored_svd: rebuilt ΔW, relative error", rebuilt, 1e-5)
    targets.check("analyze: max |φ − φ of the dense path|", phi_error, 1e-5)
    targets.check("peak extra memory / one snapshot", extra / snapshot_bytes, 3.0, "×")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
