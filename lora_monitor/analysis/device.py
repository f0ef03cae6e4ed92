"""The device side of a snapshot's analysis: batched factorizations, φ products, W₀ products.

Modules of the same shapes are stacked into one batch (:func:`group_by_shape`), so a 32-layer
model costs a handful of batched QR/SVD calls on the model's own device; the small results
move to the host once (:func:`to_host`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.analysis.snapshot import group_by_shape
from lora_monitor.analysis.update_factors import UpdateFactors, needs_update, update_of, with_base_weights
from lora_monitor.functional.bases import Basis, basis_info
from lora_monitor.functional.similarity import column_space_similarity, subspace_similarity
from lora_monitor.functional.spectra import frobenius_norm
from lora_monitor.functional.svd import compute_dtype, factored_basis, factored_svd
from lora_monitor.functional.updates import dora_update
from lora_monitor.functional.weights import amplification_factor, intruder_dimensions


def _stacked(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``torch.stack(tensors)`` on ``device``, without a copy when they already are consecutive
    equal-sized slices of one buffer on it (the views :meth:`Snapshot.capture` makes)."""
    first = tensors[0]
    step = first.numel()
    consecutive = first.device == device and all(
        t.shape == first.shape
        and t.stride() == first.stride()
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + index * step
        for index, t in enumerate(tensors)
    )
    if consecutive and first.is_contiguous():
        return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack([t.to(device) for t in tensors])


def _stack(factors: list[LoRAFactors], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    A = _stacked([f.lora_A for f in factors], device)
    B = _stacked([f.lora_B for f in factors], device)
    scaling = torch.tensor([float(f.scaling) for f in factors], device=device)
    return B, A, scaling


def reference_group(
    reference: Mapping[ModuleKey, LoRAFactors],
    keys: list[ModuleKey],
    device: torch.device,
    basis: Basis,
    initial: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of reference modules: ``(basis (n, r_ref, stacked), ΔW's singular values, the
    singular values ordering the basis)``, the basis multiplied out since it is reused."""
    factors = [reference[k] for k in keys]
    B, A, scaling = _stack(factors, device)
    if basis_info(basis).of_update and any(needs_update(f) for f in factors):
        updates = [update_of(f, (initial or {}).get(k), basis) for k, f in zip(keys, factors)]
        B = torch.stack([u.B.to(device) for u in updates])
        A = torch.stack([u.A.to(device) for u in updates])
    S, Q, W, basis_S = factored_basis(B, A, scaling, basis)
    return Q @ W, S, basis_S


@dataclass
class ReferenceBases:
    """The singular bases of a reference that never changes, computed once for every snapshot.

    An adapter directory, or a run's first snapshot, is compared with every later snapshot:
    decomposing it again each time would double the cost of :func:`~lora_monitor.analysis.analyze`. Built with the
    grouping :func:`~lora_monitor.analysis.analyze` uses, so that a batch of modules is found already stacked.
    """

    basis: Basis
    #: ``tuple of keys → (bases, singular values, basis singular values)``, stacked per batch.
    groups: dict[tuple[ModuleKey, ...], tuple[Tensor, Tensor, Tensor]]

    @classmethod
    def compute(
        cls,
        reference: Mapping[ModuleKey, LoRAFactors],
        current: Mapping[ModuleKey, LoRAFactors],
        basis: Basis,
        initial: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    ) -> ReferenceBases:
        """The bases of ``reference``, on the devices of the ``current`` factors it will be
        compared with (``initial``: the run's initial factors, for a PiSSA-like reference)."""
        reference = with_base_weights(reference, current)
        groups = {
            tuple(keys): reference_group(reference, keys, device, basis, initial)
            for (_, _, device, *_), keys in group_by_shape(current, reference).items()
            # A variant's ΔW bases may need the initial factors: the analysis computes those.
            if initial is not None
            or not basis_info(basis).of_update
            or not any(needs_update(reference[k]) for k in keys)
        }
        return cls(basis=basis, groups=groups)

    def batch(self, keys: list[ModuleKey]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        return self.groups.get(tuple(keys))


def device_results(
    factors: Mapping[ModuleKey, LoRAFactors],
    updates: Mapping[ModuleKey, UpdateFactors],
    reference: Optional[Mapping[ModuleKey, LoRAFactors]],
    basis: Basis,
    *,
    initial: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    intruder_top_k: Optional[int] = None,
    reference_bases: Optional[ReferenceBases] = None,
    base_results: Optional[Mapping[ModuleKey, Mapping[str, Tensor]]] = None,
) -> tuple[dict[ModuleKey, dict[str, Tensor]], dict[ModuleKey, int]]:
    """Every module's results on its device, by name, and the dimension n of its basis space.

    Per batch of same-shaped modules: one QR of each factor and r×r SVDs (the current basis
    stays factored, so φ costs a product with the reference basis); ΔW's vectors on both sides
    only where a module carries W₀, whose products are made module by module
    (:func:`_base_results`, :func:`_dora_results`). A W₀ sharded across processes is never read
    here: its numbers come summed over the shards, in ``base_results``.
    """
    results: dict[ModuleKey, dict[str, Tensor]] = {}
    dimensions: dict[ModuleKey, int] = {}
    for (_, _, device, *_), keys in group_by_shape(factors, reference, updates).items():
        B, A, scaling = _stack([factors[k] for k in keys], device)
        plain = all(updates[k].is_plain(factors[k]) for k in keys)
        if not plain:
            update_B = torch.stack([updates[k].B.to(device) for k in keys])
            update_A = torch.stack([updates[k].A.to(device) for k in keys])
        on_factors = plain or not basis_info(basis).of_update
        S, Q, W, basis_spectrum = factored_basis(*((B, A) if on_factors else (update_B, update_A)), scaling, basis)
        raw_A = A
        if not plain:
            B, A = update_B, update_A  # ΔW from here on: its spectrum, its vectors
        # ΔW's vectors on both sides are needed only for the amplification against W₀.
        if not plain or any(factors[k].has_base_weight and not factors[k].base_is_sharded for k in keys):
            U, S_update, Vh = factored_svd(B, A, scaling)
            S = S_update if on_factors and not plain else S
        batch: dict[str, Tensor] = {"singular_values": S, "basis_singular_values": basis_spectrum}
        if reference is not None:
            cached = reference_bases.batch(keys) if reference_bases is not None else None
            reference_basis, reference_S, reference_spectrum = cached or reference_group(
                reference, keys, device, basis, initial
            )
            batch["reference_singular_values"] = reference_S
            batch["reference_basis_singular_values"] = reference_spectrum
            batch["phi"] = subspace_similarity(reference_basis, Q, W)
        if initial is not None and all(k in initial for k in keys):
            initial_A = torch.stack([initial[k].lora_A.to(device) for k in keys])
            # φ(A₀, A, r, r) does not depend on how the bases are rotated: no basis is formed.
            batch["a_init_similarity"] = column_space_similarity(initial_A.mT, raw_A.mT)
        for index, key in enumerate(keys):
            results[key] = {name: value[index] for name, value in batch.items()}
            dimensions[key] = Q.shape[-2]
            f = factors[key]
            if f.lora_E is not None:
                results[key]["adalora_kept_rank"] = (f.lora_E != 0).sum()
            if base_results is not None and key in base_results:  # W₀ read at the snapshot's step
                results[key].update({name: value.to(device) for name, value in base_results[key].items()})
                continue
            if not updates[key].known or not f.has_base_weight or f.base_is_sharded:
                continue
            W0 = f.read_base_weight()  # a fresh tensor for quantized or per-head W₀: dropped below
            assert W0 is not None
            if f.initial_in_base is not None:
                assert initial is not None  # else the update is not known
                # The pretrained weight: the base layer holds W − s·B₀·A₀ (formed for this module).
                B0, A0 = initial[key].lora_B.to(device), initial[key].lora_A.to(device)
                dtype = compute_dtype(B0, A0)  # float64 where float32 products are rounded
                W0 = W0.to(device) + f.scaling * (B0.to(dtype) @ A0.to(dtype)).to(W0.dtype)
            if f.magnitude is not None:
                results[key].update(_dora_results(f, W0.to(device), intruder_top_k))
                continue
            svd = (U[index], S[index], Vh[index])
            results[key].update(_base_results(svd, W0, intruder_top_k))
    return results, dimensions


def base_weight_results(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, dict[str, Tensor]]:
    """Amplification and ‖ΔW‖_F/‖W₀‖_F of every module with a plain update (LoRA, rsLoRA,
    AdaLoRA) whose W₀ is here and whole, now: for a W₀ that is whole only for a moment (FSDP's
    ``summon_full_params``), read at the snapshot's step and not kept."""
    results = {}
    for key, f in factors.items():
        W0 = f.base_weight if f.magnitude is None and f.initial_in_base is None and not f.base_is_sharded else None
        if W0 is not None:
            results[key] = _base_results(factored_svd(f.lora_B, f.lora_A, f.scaling), W0, None)
    return results


def _base_results(svd: tuple[Tensor, Tensor, Tensor], W0: Tensor, intruder_top_k: Optional[int]) -> dict[str, Tensor]:
    """Amplification, ‖ΔW‖_F/‖W₀‖_F and (asked for) intruder dimensions of one module, from
    ΔW's thin SVD ``svd`` and its base weight."""
    U, S, Vh = svd
    W0 = W0.to(U.device)
    results = {
        "delta_w_amplification": amplification_factor(U, S, Vh, W0),
        "delta_w_relative_norm": frobenius_norm(S) / torch.linalg.vector_norm(W0, dtype=S.dtype),
    }
    if intruder_top_k is not None:
        results["intruder_dimensions"] = intruder_dimensions(W0, U, S, Vh, top_k=intruder_top_k)
    return results


def _dora_results(f: LoRAFactors, W0: Tensor, intruder_top_k: Optional[int]) -> dict[str, Tensor]:
    """DoRA's ΔW = (D − I)·W₀ + D·s·B·A, formed for this module alone and decomposed densely:
    its true spectrum (full length), amplification against its top-r directions, the norms of
    its two parts and the spread of D."""
    assert f.magnitude is not None
    dora = dora_update(f.lora_B, f.lora_A, f.scaling, f.magnitude, W0)
    U, S, Vh = torch.linalg.svd(dora.delta, full_matrices=False)
    r = f.rank
    results = {
        "singular_values": S,
        "delta_w_amplification": amplification_factor(U[:, :r], S, Vh[:r], W0),
        "delta_w_relative_norm": frobenius_norm(S) / torch.linalg.vector_norm(W0, dtype=S.dtype),
        "dora_magnitude_norm": dora.magnitude_norm,
        "dora_direction_norm": dora.direction_norm,
        "dora_scale_std": dora.scale.std(correction=0),
    }
    if intruder_top_k is not None:
        results["intruder_dimensions"] = intruder_dimensions(W0, U, S, Vh, top_k=intruder_top_k)
    return results


def to_host(results: dict[ModuleKey, dict[str, Tensor]]) -> dict[ModuleKey, dict[str, Tensor]]:
    """Move every small result to the host in one transfer per (device, dtype), not one per
    tensor: on a GPU each ``.cpu()`` would be a synchronizing round trip."""
    by_kind: dict[tuple, list[tuple[ModuleKey, str, Tensor]]] = defaultdict(list)
    for key, values in results.items():
        for name, value in values.items():
            by_kind[value.device, value.dtype].append((key, name, value))
    host: dict[ModuleKey, dict[str, Tensor]] = {key: {} for key in results}
    for entries in by_kind.values():
        flat = torch.cat([value.reshape(-1) for _, _, value in entries]).cpu()
        pieces = flat.split([value.numel() for _, _, value in entries])
        for (key, name, value), piece in zip(entries, pieces):
            host[key][name] = piece.view(value.shape)
    return host
