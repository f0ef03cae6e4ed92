"""A snapshot: detached copies of the LoRA factors of the monitored modules at one step.

A :class:`Snapshot` copies only the factors (O((d + k)·r) per module), never ΔW, stacked by
shape (:func:`group_by_shape`), the batches the analysis makes, so that it finds them stacked.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey

if TYPE_CHECKING:
    from lora_monitor.analysis.variants import UpdateFactors


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
        # views of it: the analysis then finds its batches already stacked instead of copying them.
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

    def without_base_weights(self) -> Snapshot:
        """This snapshot without W₀ (its numbers taken already, or W₀ about to be freed)."""
        factors = {
            key: dataclasses.replace(f, base_weight=None, base_reader=None, rows=None)
            for key, f in self.factors.items()
        }
        return Snapshot(step=self.step, factors=factors)

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


def group_by_shape(
    current: Mapping[ModuleKey, LoRAFactors],
    reference: Optional[Mapping[ModuleKey, LoRAFactors]],
    updates: Optional[Mapping[ModuleKey, UpdateFactors]] = None,
) -> dict[tuple, list[ModuleKey]]:
    """The keys of ``current`` in the batches :func:`~lora_monitor.analysis.analyze` makes: same factor shapes and
    device (and, given, the same reference shapes and update kind)."""
    groups: dict[tuple, list[ModuleKey]] = defaultdict(list)
    for key, f in current.items():
        shape: tuple = (tuple(f.lora_A.shape), tuple(f.lora_B.shape), f.lora_A.device)
        if reference is not None:
            r = reference[key]
            shape += (tuple(r.lora_A.shape), tuple(r.lora_B.shape))
        if updates is not None:
            # A variant's update factors (rank 2r since the initial ones) batch apart.
            u = updates[key]
            shape += (u.is_plain(f), tuple(u.A.shape), tuple(u.B.shape))
        groups[shape].append(key)
    return groups
