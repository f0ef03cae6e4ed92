"""The analysis of one snapshot against a reference: :func:`analyze`.

Three steps, each in its own module: which factors carry each module's update
(:mod:`~lora_monitor.analysis.update_factors`), the batched work on the device
(:mod:`~lora_monitor.analysis.device`), and the per-module results on the host
(:mod:`~lora_monitor.analysis.results`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.analysis.device import ReferenceBases, device_results, to_host
from lora_monitor.analysis.results import ModuleAnalysis, assemble
from lora_monitor.analysis.snapshot import Snapshot
from lora_monitor.analysis.update_factors import sharded_base_notes, update_of, with_base_weights
from lora_monitor.functional.bases import Basis


def analyze(
    current: Snapshot,
    reference: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    basis: Basis = "A",
    *,
    initial: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    intruder_top_k: Optional[int] = None,
    reference_bases: Optional[ReferenceBases] = None,
    base_results: Optional[Mapping[ModuleKey, Mapping[str, Tensor]]] = None,
) -> dict[ModuleKey, ModuleAnalysis]:
    """Spectra of every module of ``current`` and, given a reference, its φ grids.

    Same-shaped modules are analyzed in one batched call on the device of the snapshot; the
    reference's factors are moved there. A module whose factors are not finite, or whose ΔW is
    zero while the basis is one of ΔW's, gets no φ and a note in ``problems`` instead.

    ΔW is the update the model applies, whatever the variant (:mod:`lora_monitor.analysis.update_factors`):
    s·B·A; s·(B·A − B₀·A₀) from ``initial`` for a PiSSA-like initialization (factored, rank
    ≤ 2r); B·(E ⊙ A)·s/(ranknum + ε) for AdaLoRA (folded in by the adapters layer); for DoRA
    (D − I)·W₀ + D·s·B·A, formed and decomposed densely one module at a time (it is full rank),
    while φ in ΔW's bases reads the directional term D·s·B·A. The bases ``"A"`` and ``"B"`` are
    always those of ``lora_A`` and ``lora_B`` themselves. Where the update cannot be known,
    ``delta_w_known`` is False and ``notes`` says why.

    Where a module's factors carry W₀ (``base_weight``, or ``base_reader`` for quantized or
    per-head storage, read one module at a time and dropped), its amplification and
    ‖ΔW‖_F/‖W₀‖_F are computed from two thin products (W₀ is never stacked, kept nor
    decomposed); with ``intruder_top_k`` also its intruder dimensions, which cost two dense
    SVDs per module. ``initial`` (the factors before the first optimizer step) gives
    φ(A₀, A, r, r). ``reference_bases`` (:meth:`ReferenceBases.compute` of ``reference`` in
    the same basis) saves decomposing a reference that does not change. Where W₀ is sharded
    across processes, its numbers are those of ``base_results``
    (:func:`lora_monitor.engine.distributed.sharded_base_results`, summed over the shards).

    Cost per batch: one QR of each factor — from its Gram matrix (one GEMM) where that is exact,
    else Householder, Q formed for the factor the basis lives on only — and r×r SVDs; the
    current basis stays factored (``Q @ W``, see :func:`~lora_monitor.functional.factored_basis`),
    so φ costs a product with the reference basis. ΔW's explicit singular vectors are only
    formed for batches whose modules carry W₀.
    """
    if reference_bases is not None and reference_bases.basis != basis:
        raise ValueError(f"analyze: reference_bases are in basis {reference_bases.basis!r}, not {basis!r}")
    factors = current.factors
    if reference is not None:
        reference = with_base_weights(reference, factors)
    updates = {key: update_of(f, (initial or {}).get(key), basis) for key, f in factors.items()}
    for key, f in factors.items():
        updates[key].notes += sharded_base_notes(f, key in (base_results or {}), intruder_top_k)
    results, dimensions = device_results(
        factors,
        updates,
        reference,
        basis,
        initial=initial,
        intruder_top_k=intruder_top_k,
        reference_bases=reference_bases,
        base_results=base_results,
    )
    return assemble(to_host(results), dimensions, updates, reference, initial, basis)
