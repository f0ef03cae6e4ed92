"""Snapshots of LoRA factors at a training step, and their batched analysis against a reference.

A :class:`Snapshot` copies only the factors (O((d + k)·r) per module), never ΔW. Analysis groups
modules of the same shapes into one batch, so a 32-layer model costs a handful of batched
QR/SVD calls on the model's own device, and moves the small results to the host once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.functional import Basis, factored_svd, singular_basis, subspace_similarity


@dataclass
class Snapshot:
    """Detached copies of the LoRA factors of the monitored modules at one optimizer step."""

    step: int
    factors: dict[ModuleKey, LoRAFactors]

    @classmethod
    def capture(cls, factors: Mapping[ModuleKey, LoRAFactors], step: int) -> Snapshot:
        copies = {
            key: LoRAFactors(
                module_name=f.module_name,
                layer=f.layer,
                projection=f.projection,
                lora_A=f.lora_A.detach().clone(),
                lora_B=f.lora_B.detach().clone(),
                scaling=float(f.scaling),
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
                }
                for f in self.factors.values()
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Snapshot:
        factors = [LoRAFactors(**module) for module in state["modules"]]
        return cls(step=int(state["step"]), factors={f.key: f for f in factors})


@dataclass
class ModuleAnalysis:
    """What one snapshot says about one module, on the host.

    ``phi`` is the grid φ(reference, current, i, j) of shape ``(r_ref, r_cur)`` in the chosen
    basis (None without a reference); ``singular_values`` the spectrum of the current ΔW.
    """

    key: ModuleKey
    singular_values: Tensor
    phi: Optional[Tensor] = None
    problems: list[str] = field(default_factory=list)

    @property
    def scalars(self) -> dict[str, float]:
        """The per-module scalars the monitor logs (see the callback's docstring)."""
        s = self.singular_values
        values = {
            "delta_w_norm": float(s.square().sum().sqrt()),
            "sigma_max": float(s[0]) if s.numel() else 0.0,
        }
        if self.phi is not None:
            diagonal = torch.diagonal(self.phi)
            values["phi_top"] = float(self.phi[0, 0])
            values["phi_mean"] = float(diagonal.mean())
        # A module with non-finite factors logs nothing rather than a NaN that breaks plots.
        return {name: value for name, value in values.items() if math.isfinite(value)}


def _group_by_shape(
    current: Mapping[ModuleKey, LoRAFactors], reference: Optional[Mapping[ModuleKey, LoRAFactors]]
) -> dict[tuple, list[ModuleKey]]:
    groups: dict[tuple, list[ModuleKey]] = defaultdict(list)
    for key, f in current.items():
        shape = (tuple(f.lora_A.shape), tuple(f.lora_B.shape), f.lora_A.device)
        if reference is not None:
            r = reference[key]
            shape += (tuple(r.lora_A.shape), tuple(r.lora_B.shape))
        groups[shape].append(key)
    return groups


def _stack(factors: list[LoRAFactors], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    A = torch.stack([f.lora_A.to(device) for f in factors])
    B = torch.stack([f.lora_B.to(device) for f in factors])
    scaling = torch.tensor([float(f.scaling) for f in factors], device=device)
    return B, A, scaling


def analyze(
    current: Snapshot,
    reference: Optional[Mapping[ModuleKey, LoRAFactors]] = None,
    basis: Basis = "A",
) -> dict[ModuleKey, ModuleAnalysis]:
    """Spectra of every module of ``current`` and, given a reference, its φ grids.

    Same-shaped modules are analysed in one batched call on the device of the snapshot; the
    reference's factors are moved there. A module whose factors are not finite, or whose ΔW is
    zero while the basis is one of ΔW's, gets no φ and a note in ``problems`` instead.
    """
    device_results: dict[ModuleKey, dict[str, Tensor]] = {}
    for (_, _, device, *_), keys in _group_by_shape(current.factors, reference).items():
        B, A, scaling = _stack([current.factors[k] for k in keys], device)
        current_basis, spectrum = _basis_and_spectrum(B, A, scaling, basis)
        batch: dict[str, Tensor] = {"singular_values": spectrum}
        if reference is not None:
            reference_factors = _stack([reference[k] for k in keys], device)
            reference_basis, reference_spectrum = _basis_and_spectrum(*reference_factors, basis)
            batch["reference_singular_values"] = reference_spectrum
            batch["phi"] = subspace_similarity(reference_basis, current_basis)
        for index, key in enumerate(keys):
            device_results[key] = {name: value[index] for name, value in batch.items()}

    # One transfer of everything small to the host, after all device work is queued.
    host_results = {
        key: {name: value.cpu() for name, value in values.items()}
        for key, values in device_results.items()
    }
    analyses = {}
    for key, values in host_results.items():
        analysis = ModuleAnalysis(key=key, singular_values=values["singular_values"], phi=values.get("phi"))
        for role, spectrum in (("", values["singular_values"]), ("the reference's ", values.get("reference_singular_values"))):
            if spectrum is None:
                continue
            if not torch.isfinite(spectrum).all():
                analysis.problems.append(f"{role}LoRA factors hold NaN or Inf")
            elif basis.startswith("delta_w") and not spectrum.any():
                analysis.problems.append(f"{role}ΔW is exactly zero, so its singular vectors are undefined")
        if analysis.problems:
            analysis.phi = None
        analyses[key] = analysis
    return analyses


def _basis_and_spectrum(B: Tensor, A: Tensor, scaling: Tensor, basis: Basis) -> tuple[Tensor, Tensor]:
    """The chosen singular basis and ΔW's singular values, sharing the factored SVD when they can."""
    U, S, Vh = factored_svd(B, A, scaling)
    if basis == "delta_w_left":
        return U, S
    if basis == "delta_w_right":
        return Vh.mT, S
    return singular_basis(B, A, scaling, basis), S
