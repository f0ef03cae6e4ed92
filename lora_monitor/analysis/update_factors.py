"""The peft variants' rules, at the analysis: which factors carry the update a module applies.

ΔW is the merged weight minus the pretrained one (``docs/maths.md``): s·B·A for plain LoRA; for a
PiSSA-like initialization s·(B·A − B₀·A₀), which needs the run's initial factors; for DoRA
(D − I)·W₀ + D·s·B·A, which needs W₀. :func:`update_of` gives the factors the analysis
decomposes, or says why the update cannot be known from what the run has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.functional.bases import Basis, basis_info
from lora_monitor.functional.updates import dora_update, since_initial


@dataclass
class UpdateFactors:
    """How one module's update enters the batched analysis: factors ``(B, A)`` whose s·B·A is
    the update the model applies (DoRA: its directional term D·s·B·A, the magnitude part added
    module by module), or the plain factors where that update cannot be known (``known``)."""

    B: Tensor
    A: Tensor
    known: bool = True
    notes: list[str] = field(default_factory=list)

    def is_plain(self, f: LoRAFactors) -> bool:
        return self.B is f.lora_B and self.A is f.lora_A


def unknown_because(f: LoRAFactors, initial: Optional[LoRAFactors]) -> Optional[str]:
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
    if f.magnitude is not None and f.base_is_sharded:
        return (
            "DoRA rescales the rows of W₀ + s·B·A, and W₀ is sharded across processes (FSDP2): "
            "lora_monitor does not compute this update from shards; no ΔW numbers"
        )
    if f.magnitude is not None and not f.has_base_weight:
        return (
            "DoRA rescales the rows of W₀ + s·B·A, and W₀ is not known here (a saved "
            "adapter, quantized storage that cannot be read, or a W₀ FSDP frees after gathering "
            "it): no ΔW numbers"
        )
    return None


def sharded_base_notes(f: LoRAFactors, computed: bool, intruder_top_k: Optional[int]) -> list[str]:
    """What a module whose W₀ is sharded across processes leaves out (``computed``: its W₀
    numbers were summed over the shards)."""
    if not f.base_is_sharded or f.magnitude is not None:  # DoRA: unknown_because says it
        return []
    notes = []
    if not computed:
        if f.initial_in_base is not None:
            why = f"its {f.initial_in_base} initialization keeps W − s·B₀·A₀ in the base layer"
        elif f.base_quantization is not None and f.rows is not None:
            why = "this projection's rows of a fused 4-bit module are not read from packed shards"
        else:
            why = "its device mesh does not span every process"
        notes.append(
            f"W₀ is sharded across processes and {why}: delta_w_amplification and "
            f"delta_w_relative_norm are not computed"
        )
    if intruder_top_k is not None:
        notes.append(
            "W₀ is sharded across processes: intruder_dimensions needs a dense SVD of W₀ + ΔW "
            "and is not computed (W₀ is never gathered)"
        )
    return notes


def update_of(f: LoRAFactors, initial: Optional[LoRAFactors], basis: Basis) -> UpdateFactors:
    """The factors of the update ``f`` applies (see :mod:`lora_monitor.functional.updates`)."""
    update = UpdateFactors(f.lora_B, f.lora_A)
    reason = unknown_because(f, initial)
    if reason is not None:
        update.known = False
        update.notes.append(reason)
        return update
    if f.initial_in_base is not None:
        assert initial is not None  # else unknown_because says why
        update.B, update.A = since_initial(f.lora_B, f.lora_A, initial.lora_B, initial.lora_A)
    if f.magnitude is not None and basis_info(basis).of_update:
        # φ in ΔW's bases reads the directional term D·s·B·A; D needs W₀ (read and dropped).
        W0 = f.read_base_weight()
        assert W0 is not None  # else unknown_because says why
        update.B = dora_update(f.lora_B, f.lora_A, f.scaling, f.magnitude, W0).direction_B
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


def needs_update(f: LoRAFactors) -> bool:
    """Whether ``f``'s update is anything but s·B·A."""
    return f.initial_in_base is not None or f.magnitude is not None


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
