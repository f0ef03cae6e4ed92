"""Choosing modules by name and layer, and checking a reference adapter against a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from lora_monitor.adapters.factors import LoRAFactors, LoRAMonitorError, ModuleKey, _describe


def _entry_matches(entry: str, factors: LoRAFactors) -> bool:
    module = factors.module_name
    return (
        entry == factors.projection
        or entry == factors.projection.rsplit(".", 1)[-1]
        or entry == module.rsplit(".", 1)[-1]
        or module == entry
        or module.endswith("." + entry)
    )


def select_factors(
    factors: Mapping[ModuleKey, LoRAFactors],
    target_modules: Optional[Sequence[str]],
    layers: Optional[Sequence[int]],
) -> dict[ModuleKey, LoRAFactors]:
    """The factors of the modules named in ``target_modules`` at the layers in ``layers``.

    A ``target_modules`` entry matches a module if it equals its canonical projection (``"q"``,
    ``"encoder.q"``), the projection's last part (``"q"`` for ``"encoder.q"``), the module's
    own last name (``"q_proj"``, ``"c_attn"`` for all three of q, k, v), or the module path or
    a dotted suffix of it (``"self_attn.q_proj"``), as in peft's ``target_modules``. None means
    all modules, all layers.

    Raises:
        LoRAMonitorError: an entry of ``target_modules`` or ``layers`` matches nothing, or
            together they select nothing; the message lists what is available.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if target_modules is not None:
        unmatched = [t for t in target_modules if not any(_entry_matches(t, f) for f in factors.values())]
        if unmatched:
            raise LoRAMonitorError(f"target_modules {unmatched} match no LoRA module; available: {_describe(factors)}")
    if layers is not None:
        present = {f.layer for f in factors.values()}
        unmatched_layers = [layer for layer in layers if layer not in present]
        if unmatched_layers:
            raise LoRAMonitorError(f"layers {unmatched_layers} have no LoRA module; available: {_describe(factors)}")
    selected = {
        key: f
        for key, f in factors.items()
        if (target_modules is None or any(_entry_matches(t, f) for t in target_modules))
        and (layers is None or f.layer in layers)
    }
    if not selected:
        raise LoRAMonitorError(
            f"target_modules {list(target_modules or [])} and layers {list(layers or [])} each "
            f"match some module but select no module together; available keys: "
            f"{sorted(factors)}"
        )
    return selected


_BASIS_SIDE = {"A": "input", "delta_w_right": "input", "B": "output", "delta_w_left": "output"}


def check_reference_compatible(
    current: Mapping[ModuleKey, LoRAFactors],
    reference: Mapping[ModuleKey, LoRAFactors],
    basis: str,
) -> None:
    """Check that the model's updates can be compared with a reference adapter's in ``basis``.

    Every key of ``current`` must be in ``reference``, and ΔW must have the same shape (d, k)
    in both: the basis vectors live in ℝ^k (``"A"``, ``"delta_w_right"``) or ℝ^d (``"B"``,
    ``"delta_w_left"``), and a different d or k means another base model. Ranks may differ.

    Raises:
        LoRAMonitorError: unknown basis, keys missing from the reference, shapes differ.
    """
    if basis not in _BASIS_SIDE:
        raise LoRAMonitorError(f"unknown basis {basis!r}; expected one of {', '.join(map(repr, _BASIS_SIDE))}")
    missing = [key for key in current if key not in reference]
    if missing:
        raise LoRAMonitorError(
            f"the reference adapter has no module for keys {missing}; it has {sorted(reference)}. "
            f"Restrict the monitor to the modules both share with target_modules=/layers=, or use "
            f"a reference trained with the same LoraConfig(target_modules=...)"
        )
    for key, factors in current.items():
        ref = reference[key]
        shape = (factors.out_features, factors.in_features)
        ref_shape = (ref.out_features, ref.in_features)
        if shape != ref_shape:
            side = _BASIS_SIDE[basis]
            raise LoRAMonitorError(
                f"reference module {key} has ΔW of shape {ref_shape} but the model's has "
                f"{shape}: the reference adapter was trained on another base model (basis "
                f"{basis!r} compares {side}-space vectors, of dimension "
                f"{shape[1] if side == 'input' else shape[0]} here and "
                f"{ref_shape[1] if side == 'input' else ref_shape[0]} in the reference)"
            )
