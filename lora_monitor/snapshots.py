"""Snapshots of LoRA factors at a training step, and their batched analysis against a reference.

A :class:`Snapshot` copies only the factors (O((d + k)·r) per module), never ΔW. Analysis groups
modules of the same shapes into one batch, so a 32-layer model costs a handful of batched
QR/SVD calls on the model's own device, and moves the small results to the host once.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.functional import (
    Basis,
    amplification_factor,
    column_space_similarity,
    effective_rank,
    energy_rank,
    factored_basis,
    factored_svd,
    frobenius_norm,
    intruder_dimensions,
    shared_directions,
    stable_rank,
    subspace_similarity,
)
from lora_monitor.updates import dora_update, since_initial


@dataclass
class Snapshot:
    """Detached copies of the LoRA factors of the monitored modules at one optimizer step.

    ``base_weight`` is not copied: W₀ is frozen, so a snapshot keeps a reference to the live
    (d, k) view of it (None after a checkpoint round trip, which stores the factors only).
    """

    step: int
    factors: dict[ModuleKey, LoRAFactors]

    @classmethod
    def capture(cls, factors: Mapping[ModuleKey, LoRAFactors], step: int) -> Snapshot:
        # Same-shaped factors are copied into one stacked tensor each, and every module gets
        # views of it: analyze() then finds its batches already stacked instead of copying them.
        A, B = {}, {}
        for keys in group_by_shape(factors, None).values():
            stacked_A = torch.stack([factors[k].lora_A.detach() for k in keys])
            stacked_B = torch.stack([factors[k].lora_B.detach() for k in keys])
            for index, key in enumerate(keys):
                A[key], B[key] = stacked_A[index], stacked_B[index]
        copies = {
            key: dataclasses.replace(
                f,
                lora_A=A[key],
                lora_B=B[key],
                scaling=float(f.scaling),
                base_weight=None if f.base_weight is None else f.base_weight.detach(),
                # The variants' own small tensors change as the factors do: copied too.
                magnitude=None if f.magnitude is None else f.magnitude.detach().clone(),
                lora_E=None if f.lora_E is None else f.lora_E.detach().clone(),
            )
            for key, f in factors.items()
        }
        return cls(step=step, factors=copies)

    @property
    def nbytes(self) -> int:
        return sum(
            f.lora_A.numel() * f.lora_A.element_size() + f.lora_B.numel() * f.lora_B.element_size()
            for f in self.factors.values()
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain, CPU-resident state for a Lightning checkpoint."""
        return {
            "step": self.step,
            "modules": [
                {
                    "module_name": f.module_name,
                    "layer": f.layer,
                    "projection": f.projection,
                    "lora_A": f.lora_A.cpu(),
                    "lora_B": f.lora_B.cpu(),
                    "scaling": f.scaling,
                    **{
                        name: value.cpu() if isinstance(value, Tensor) else value
                        for name in ("magnitude", "lora_E", "initial_in_base")
                        if (value := getattr(f, name)) is not None
                    },
                }
                for f in self.factors.values()
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Snapshot:
        factors = [LoRAFactors(**module) for module in state["modules"]]
        return cls(step=int(state["step"]), factors={f.key: f for f in factors})


#: Tensor dtypes that pickle as numpy arrays.
_NUMPY_DTYPES = (torch.float32, torch.float64)


@dataclass
class ModuleAnalysis:
    """What one snapshot says about one module, on the host.

    ``phi`` is the grid φ(reference, current, i, j) of shape ``(r_ref, r_cur)`` in the chosen
    basis (None without a reference); ``singular_values`` the spectrum of the current ΔW.

    Attributes:
        dimension: n, the dimension of the space the basis vectors live in (k for ``"A"`` and
            ``"delta_w_right"``, d for ``"B"`` and ``"delta_w_left"``); φ's chance level is
            max(i, j)/n.
        basis_singular_values, reference_basis_singular_values: the singular values that order
            the basis vectors (of A, B or ΔW) of the current update and of the reference: a
            small gap between two of them means their directions can swap between runs.
        amplification: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F (the paper's §7.3); None without W₀.
        relative_norm: ‖ΔW‖_F / ‖W₀‖_F; None without W₀.
        intruders: intruder dimensions among the top-k singular vectors of W₀ + ΔW; None
            unless asked for (``intruder_top_k``).
        init_similarity: φ(A₀, A, r, r), the share of A's row space still spanned by its
            initial value A₀ (1: unchanged; chance r/k); None without an initial snapshot.
        delta_w_known: False when the update the model applies cannot be computed from what
            the run has (a PiSSA-like initialization without its initial factors, DoRA without
            W₀): then no ΔW number is logged, and ``notes`` says why.
        notes: what was left out of this module's analysis and why (not errors: φ in the
            factors' own bases is still right).
        dora_magnitude_norm, dora_direction_norm, dora_scale_std: DoRA only, see
            :data:`VARIANT_SCALAR_NAMES`.
        adalora_kept_rank: AdaLoRA only: the number of singular values E it keeps (non-zero).
    """

    key: ModuleKey
    singular_values: Tensor
    phi: Optional[Tensor] = None
    problems: list[str] = field(default_factory=list)
    dimension: Optional[int] = None
    basis_singular_values: Optional[Tensor] = None
    reference_basis_singular_values: Optional[Tensor] = None
    amplification: Optional[float] = None
    relative_norm: Optional[float] = None
    intruders: Optional[int] = None
    init_similarity: Optional[float] = None
    delta_w_known: bool = True
    notes: list[str] = field(default_factory=list)
    dora_magnitude_norm: Optional[float] = None
    dora_direction_norm: Optional[float] = None
    dora_scale_std: Optional[float] = None
    adalora_kept_rank: Optional[int] = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as numpy arrays, each with its own bytes: torch pickles a tensor through
        # torch.save (≈ 0.1 ms each) and with its whole storage (for these, the buffer of one
        # host transfer), which made gathering the analyses across ranks cost more than them.
        return {
            name: value.numpy() if isinstance(value, Tensor) and value.dtype in _NUMPY_DTYPES else value
            for name, value in vars(self).items()
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(
            {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for name, value in state.items()}
        )

    @property
    def shared_directions(self) -> Optional[int]:
        """How many top directions the reference and the update share clearly above chance
        (:func:`lora_monitor.functional.shared_directions`); None without φ."""
        if self.phi is None or self.dimension is None:
            return None
        return int(shared_directions(self.phi, self.dimension))

    @property
    def scalars(self) -> dict[str, float]:
        """The per-module scalars the monitor logs (see the callback's docstring)."""
        s = self.singular_values
        if not torch.isfinite(s).all():
            return {}  # non-finite factors: log nothing rather than NaN that breaks plots
        values: dict[str, float] = {}
        if self.delta_w_known:
            values = {
                "delta_w_norm": float(frobenius_norm(s)),
                "sigma_max": float(s[0]) if s.numel() else 0.0,
                "energy_rank": float(energy_rank(s)),
                "effective_rank": float(effective_rank(s)),
                "stable_rank": float(stable_rank(s)),
            }
        if self.phi is not None:
            diagonal = torch.diagonal(self.phi)
            values["phi_top"] = float(self.phi[0, 0])
            values["phi_mean"] = float(diagonal.mean())
        optional = {
            "shared_directions": self.shared_directions,
            "amplification": self.amplification,
            "delta_w_relative_norm": self.relative_norm,
            "intruder_dimensions": self.intruders,
            "a_init_similarity": self.init_similarity,
            **{name: getattr(self, name) for name in VARIANT_SCALAR_NAMES},
        }
        values.update({name: float(v) for name, v in optional.items() if v is not None})
        return {name: value for name, value in values.items() if math.isfinite(value)}


#: Scalars logged for the modules of some peft variants only, next to those above:
#:
#: - ``dora_magnitude_norm``: ‖(D − I)·W₀‖_F, the part of DoRA's ΔW that rescales W₀'s rows
#:   (D = diag(m / ‖row of W₀ + s·B·A‖));
#: - ``dora_direction_norm``: ‖D·s·B·A‖_F, DoRA's low-rank directional term (the one φ reads);
#: - ``dora_scale_std``: the standard deviation over rows of m / ‖row of W₀ + s·B·A‖ (0 when
#:   every row is rescaled alike);
#: - ``adalora_kept_rank``: the number of triplets AdaLoRA keeps (non-zero E).
VARIANT_SCALAR_NAMES = ("dora_magnitude_norm", "dora_direction_norm", "dora_scale_std", "adalora_kept_rank")


def group_by_shape(
    current: Mapping[ModuleKey, LoRAFactors],
    reference: Optional[Mapping[ModuleKey, LoRAFactors]],
    updates: Optional[Mapping[ModuleKey, _Update]] = None,
) -> dict[tuple, list[ModuleKey]]:
    """The keys of ``current`` in the batches :func:`analyze` makes: same factor shapes and
    device (and, given, the same reference shapes and update kind)."""
    groups: dict[tuple, list[ModuleKey]] = defaultdict(list)
    for key, f in current.items():
        shape = (tuple(f.lora_A.shape), tuple(f.lora_B.shape), f.lora_A.device)
        if reference is not None:
            r = reference[key]
            shape += (tuple(r.lora_A.shape), tuple(r.lora_B.shape))
        if updates is not None:
            # A variant's update factors (rank 2r since the initial ones) batch apart.
            u = updates[key]
            shape += (u.is_plain(f), tuple(u.A.shape), tuple(u.B.shape))
        groups[shape].append(key)
    return groups


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


@dataclass
class _Update:
    """How one module's update enters the batched analysis: factors ``(B, A)`` whose s·B·A is
    the update the model applies (DoRA: its directional term D·s·B·A, the magnitude part added
    module by module), or the plain factors where that update cannot be known (``known``)."""

    B: Tensor
    A: Tensor
    known: bool = True
    notes: list[str] = field(default_factory=list)

    def is_plain(self, f: LoRAFactors) -> bool:
        return self.B is f.lora_B and self.A is f.lora_A


def _unknown_because(f: LoRAFactors, initial: Optional[LoRAFactors]) -> Optional[str]:
    """Why the update ``f`` applies cannot be computed from what is known of it, or None."""
    if f.initial_in_base is not None:
        if f.magnitude is not None:
            return (
                f"DoRA with a {f.initial_in_base} initialization: lora_monitor does not compute "
                f"this update; no ΔW numbers"
            )
        if initial is None:
            return (
                f"its {f.initial_in_base} initialization moved s·B₀·A₀ out of the base weight and "
                f"the initial factors B₀, A₀ are not known (the monitor was attached after the "
                f"first step, or the adapter was read from disk): ΔW = s·(B·A − B₀·A₀) cannot be "
                f"computed, so no ΔW numbers are logged"
            )
    if f.magnitude is not None and not f.has_base_weight:
        return (
            "DoRA rescales the rows of W₀ + s·B·A, and W₀ is not known here (a saved "
            "adapter, or quantized storage that cannot be read): no ΔW numbers"
        )
    return None


def _update_of(f: LoRAFactors, initial: Optional[LoRAFactors], basis: Basis) -> _Update:
    """The factors of the update ``f`` applies (see :mod:`lora_monitor.updates`)."""
    update = _Update(f.lora_B, f.lora_A)
    reason = _unknown_because(f, initial)
    if reason is not None:
        update.known = False
        update.notes.append(reason)
        return update
    if f.initial_in_base is not None:
        update.B, update.A = since_initial(f.lora_B, f.lora_A, initial.lora_B, initial.lora_A)
    if f.magnitude is not None and basis.startswith("delta_w"):
        # φ in ΔW's bases reads the directional term D·s·B·A; D needs W₀ (read and dropped).
        update.B = dora_update(f.lora_B, f.lora_A, f.scaling, f.magnitude, f.read_base_weight()).direction_B
    return update


def with_base_weights(
    reference: Mapping[ModuleKey, LoRAFactors], current: Mapping[ModuleKey, LoRAFactors]
) -> dict[ModuleKey, LoRAFactors]:
    """``reference`` with W₀ taken from ``current`` where a DoRA module carries none (a run's
    snapshot restored from a checkpoint, an adapter read from disk): a reference is compared
    with the same base model, whose frozen W₀ its D = diag(m / ‖row of W₀ + s·B·A‖) needs."""
    borrowed = dict(reference)
    for key, f in reference.items():
        source = current.get(key)
        if f.magnitude is not None and not f.has_base_weight and source is not None and source.has_base_weight:
            borrowed[key] = dataclasses.replace(f, base_weight=source.base_weight, base_reader=source.base_reader)
    return borrowed


def _reference_group(
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
    if basis.startswith("delta_w") and any(_needs_update(f) for f in factors):
        updates = [_update_of(f, (initial or {}).get(k), basis) for k, f in zip(keys, factors)]
        B = torch.stack([u.B.to(device) for u in updates])
        A = torch.stack([u.A.to(device) for u in updates])
    S, Q, W, basis_S = factored_basis(B, A, scaling, basis)
    return Q @ W, S, basis_S


def _needs_update(f: LoRAFactors) -> bool:
    """Whether ``f``'s update is anything but s·B·A."""
    return f.initial_in_base is not None or f.magnitude is not None


@dataclass
class ReferenceBases:
    """The singular bases of a reference that never changes, computed once for every snapshot.

    An adapter directory, or a run's first snapshot, is compared with every later snapshot:
    decomposing it again each time would double the cost of :func:`analyze`. Built with the
    grouping :func:`analyze` uses, so that a batch of modules is found already stacked.
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
            tuple(keys): _reference_group(reference, keys, device, basis, initial)
            for (_, _, device, *_), keys in group_by_shape(current, reference).items()
            # A variant's ΔW bases may need the initial factors: analyze() computes those.
            if initial is not None
            or not basis.startswith("delta_w")
            or not any(_needs_update(reference[k]) for k in keys)
        }
        return cls(basis=basis, groups=groups)

    def batch(self, keys: list[ModuleKey]) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        return self.groups.get(tuple(keys))


def analyze(
    current: Snapshot,
    reference: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    basis: Basis = "A",
    *,
    initial: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    intruder_top_k: Optional[int] = None,
    reference_bases: Optional[ReferenceBases] = None,
) -> dict[ModuleKey, ModuleAnalysis]:
    """Spectra of every module of ``current`` and, given a reference, its φ grids.

    Same-shaped modules are analysed in one batched call on the device of the snapshot; the
    reference's factors are moved there. A module whose factors are not finite, or whose ΔW is
    zero while the basis is one of ΔW's, gets no φ and a note in ``problems`` instead.

    ΔW is the update the model applies, whatever the variant (:mod:`lora_monitor.updates`):
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
    the same basis) saves decomposing a reference that does not change.

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
    updates = {key: _update_of(f, (initial or {}).get(key), basis) for key, f in factors.items()}
    device_results: dict[ModuleKey, dict[str, Tensor]] = {}
    dimensions: dict[ModuleKey, int] = {}
    for (_, _, device, *_), keys in group_by_shape(factors, reference, updates).items():
        B, A, scaling = _stack([factors[k] for k in keys], device)
        plain = all(updates[k].is_plain(factors[k]) for k in keys)
        if not plain:
            update_B = torch.stack([updates[k].B.to(device) for k in keys])
            update_A = torch.stack([updates[k].A.to(device) for k in keys])
        on_factors = plain or basis in ("A", "B")
        S, Q, W, basis_spectrum = factored_basis(*((B, A) if on_factors else (update_B, update_A)), scaling, basis)
        raw_B, raw_A = B, A
        if not plain:
            B, A = update_B, update_A  # ΔW from here on: its spectrum, its vectors
        # ΔW's vectors on both sides are needed only for the amplification against W₀.
        if not plain or any(factors[k].has_base_weight for k in keys):
            U, S_update, Vh = factored_svd(B, A, scaling)
            S = S_update if on_factors and not plain else S
        batch: dict[str, Tensor] = {"singular_values": S, "basis_singular_values": basis_spectrum}
        if reference is not None:
            cached = reference_bases.batch(keys) if reference_bases is not None else None
            reference_basis, reference_S, reference_spectrum = cached or _reference_group(
                reference, keys, device, basis, initial
            )
            batch["reference_singular_values"] = reference_S
            batch["reference_basis_singular_values"] = reference_spectrum
            batch["phi"] = subspace_similarity(reference_basis, Q, W)
        if initial is not None and all(k in initial for k in keys):
            initial_A = torch.stack([initial[k].lora_A.to(device) for k in keys])
            # φ(A₀, A, r, r) does not depend on how the bases are rotated: no basis is formed.
            batch["init_similarity"] = column_space_similarity(initial_A.mT, raw_A.mT)
        for index, key in enumerate(keys):
            device_results[key] = {name: value[index] for name, value in batch.items()}
            dimensions[key] = Q.shape[-2]
            f = factors[key]
            if f.lora_E is not None:
                device_results[key]["kept_rank"] = (f.lora_E != 0).sum()
            if not updates[key].known or not f.has_base_weight:
                continue
            W0 = f.read_base_weight()  # a fresh tensor for quantized or per-head W₀: dropped below
            if f.initial_in_base is not None:
                # The pretrained weight: the base layer holds W − s·B₀·A₀ (formed for this module).
                start = initial[key]
                W0 = W0.to(device) + f.scaling * (start.lora_B.to(device) @ start.lora_A.to(device)).to(W0.dtype)
            if f.magnitude is not None:
                device_results[key].update(_dora_results(f, W0.to(device), intruder_top_k))
                continue
            svd = (U[index], S[index], Vh[index])
            device_results[key].update(_base_results(svd, W0, intruder_top_k))

    host_results = _to_host(device_results)
    analyses = {}
    for key, values in host_results.items():
        scalar = {name: values[name].item() for name in _SCALAR_RESULTS if name in values}
        update = updates[key]
        analysis = ModuleAnalysis(
            key=key,
            singular_values=values["singular_values"],
            phi=values.get("phi"),
            dimension=dimensions[key],
            basis_singular_values=values["basis_singular_values"],
            reference_basis_singular_values=values.get("reference_basis_singular_values"),
            amplification=scalar.get("amplification"),
            relative_norm=scalar.get("relative_norm"),
            intruders=int(scalar["intruders"]) if scalar.get("intruders", -1) >= 0 else None,
            init_similarity=scalar.get("init_similarity"),
            delta_w_known=update.known,
            notes=list(update.notes),
            dora_magnitude_norm=scalar.get("dora_magnitude_norm"),
            dora_direction_norm=scalar.get("dora_direction_norm"),
            dora_scale_std=scalar.get("dora_scale_std"),
            adalora_kept_rank=int(scalar["kept_rank"]) if "kept_rank" in scalar else None,
        )
        roles = (
            ("", values["singular_values"], values["basis_singular_values"]),
            ("the reference's ", values.get("reference_singular_values"), values.get("reference_basis_singular_values")),
        )
        for role, spectrum, basis_spectrum in roles:
            if spectrum is None:
                continue
            if not torch.isfinite(spectrum).all():
                analysis.problems.append(f"{role}LoRA factors hold NaN or Inf")
            elif not basis_spectrum.any():
                # peft starts with lora_B = 0: in bases "B" and "delta_w_*" φ is then undefined.
                analysis.problems.append(
                    f"{role}{_BASIS_MATRIX[basis]} is exactly zero, so its singular vectors are undefined"
                )
        if not update.known and basis.startswith("delta_w"):
            analysis.problems.append(f"φ in basis {basis!r} needs ΔW, which is not known ({update.notes[0]})")
        elif reference is not None and basis.startswith("delta_w"):
            reference_unknown = _unknown_because(reference[key], (initial or {}).get(key))
            if reference_unknown is not None:
                # Said once per run (a note), not as a problem at every snapshot.
                analysis.notes.append(
                    f"the reference is {reference[key].variant} and its ΔW cannot be computed "
                    f"({reference_unknown}), so φ in basis {basis!r} is not computed (φ in 'A' "
                    f"and 'B' is)"
                )
                analysis.phi = None
        if analysis.problems:
            analysis.phi = None
        analyses[key] = analysis
    return analyses


def _base_results(svd: tuple[Tensor, Tensor, Tensor], W0: Tensor, intruder_top_k: Optional[int]) -> dict[str, Tensor]:
    """Amplification, ‖ΔW‖_F/‖W₀‖_F and (asked for) intruder dimensions of one module, from
    ΔW's thin SVD ``svd`` and its base weight."""
    U, S, Vh = svd
    W0 = W0.to(U.device)
    results = {
        "amplification": amplification_factor(U, S, Vh, W0),
        "relative_norm": frobenius_norm(S) / torch.linalg.vector_norm(W0, dtype=S.dtype),
    }
    if intruder_top_k is not None:
        results["intruders"] = intruder_dimensions(W0, U, S, Vh, top_k=intruder_top_k)
    return results


def _dora_results(f: LoRAFactors, W0: Tensor, intruder_top_k: Optional[int]) -> dict[str, Tensor]:
    """DoRA's ΔW = (D − I)·W₀ + D·s·B·A, formed for this module alone and decomposed densely:
    its true spectrum (full length), amplification against its top-r directions, the norms of
    its two parts and the spread of D."""
    dora = dora_update(f.lora_B, f.lora_A, f.scaling, f.magnitude, W0)
    U, S, Vh = torch.linalg.svd(dora.delta, full_matrices=False)
    r = f.rank
    results = {
        "singular_values": S,
        "amplification": amplification_factor(U[:, :r], S, Vh[:r], W0),
        "relative_norm": frobenius_norm(S) / torch.linalg.vector_norm(W0, dtype=S.dtype),
        "dora_magnitude_norm": dora.magnitude_norm,
        "dora_direction_norm": dora.direction_norm,
        "dora_scale_std": dora.scale.std(correction=0),
    }
    if intruder_top_k is not None:
        results["intruders"] = intruder_dimensions(W0, U, S, Vh, top_k=intruder_top_k)
    return results


def _to_host(results: dict[ModuleKey, dict[str, Tensor]]) -> dict[ModuleKey, dict[str, Tensor]]:
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


#: The matrix whose singular vectors each basis is made of.
_BASIS_MATRIX = {"A": "lora_A", "B": "lora_B", "delta_w_left": "ΔW", "delta_w_right": "ΔW"}

#: Per-module results that come back as Python numbers.
_SCALAR_RESULTS = (
    "amplification",
    "relative_norm",
    "intruders",
    "init_similarity",
    "kept_rank",
    *VARIANT_SCALAR_NAMES[:3],
)


def new_notes(analyses: Mapping[ModuleKey, ModuleAnalysis], given: set[str]) -> list[str]:
    """The notes of ``analyses`` (what was left out, and why) not yet in ``given``, one message
    per distinct note naming its modules; ``given`` is updated, so that a run hears each once."""
    modules: dict[str, list[str]] = defaultdict(list)
    for (layer, projection), analysis in sorted(analyses.items()):
        for note in analysis.notes:
            if note not in given:
                modules[note].append(f"layer {layer} {projection!r}")
    given.update(modules)
    return [f"{', '.join(names)}: {note}" for note, names in modules.items()]


def missing_initial_note(factors: Mapping[ModuleKey, LoRAFactors], step: int) -> Optional[str]:
    """What a run started at ``step`` > 0 without its initial factors cannot tell, or None: an
    initialization that moved s·B₀·A₀ out of the base weight (PiSSA, ...) needs B₀, A₀ for ΔW."""
    inits = sorted({f.initial_in_base for f in factors.values() if f.initial_in_base is not None})
    if not inits:
        return None
    return (
        f"the adapter was initialized by {', '.join(inits)}, which moved s·B₀·A₀ out of the base "
        f"weight, and training starts at step {step} without the initial factors B₀, A₀ (the "
        f"monitor was attached after the first step, and no checkpoint of it holds them): ΔW = "
        f"s·(B·A − B₀·A₀) cannot be computed, so no ΔW numbers are logged. Attach the monitor "
        f"before the first optimizer step, or resume from a checkpoint the monitor saved"
    )


def shares_lora_A(factors: Mapping[ModuleKey, LoRAFactors]) -> bool:
    """Whether some monitored projections are rows of one fused module, sharing its lora_A
    (then an A-based φ cannot tell q from v)."""
    return len({f.module_name for f in factors.values()}) < len(factors)
