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

from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey

if TYPE_CHECKING:
    from lora_monitor.analysis.update_factors import UpdateFactors


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
        """Copies of every module of ``factors`` (whole, all at hand) at ``step``."""
        copies = Copies(factors)
        for key, f in factors.items():
            copies.add(key, f)
        return copies.snapshot(step)

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


class Copies:
    """The copies a :class:`Snapshot` is made of, the modules handed over one at a time
    (:meth:`add`): a caller that makes each module's factors whole (a collective gather) can
    free them as soon as they are copied, instead of holding every module whole at once.

    Same-shaped factors are copied into one stacked tensor each, and every module gets views of
    it: the analysis then finds its batches already stacked instead of copying them. Each stack
    is allocated at its first module.

    Args:
        factors: the modules that will be added, as they are before being made whole: their
            whole shapes are known (a DTensor's shape is the whole one; a fused module's
            ``rows`` say how many rows of lora_B its projection owns).
    """

    def __init__(self, factors: Mapping[ModuleKey, LoRAFactors]) -> None:
        groups: dict[tuple, list[ModuleKey]] = defaultdict(list)
        for key, f in factors.items():
            groups[_whole_shape(f)].append(key)
        #: key → (its group, its index in the group's stacks)
        self._slots = {
            key: (group, index) for group, keys in enumerate(groups.values()) for index, key in enumerate(keys)
        }
        self._sizes = [len(keys) for keys in groups.values()]
        self._stacks: dict[int, tuple[Tensor, Tensor]] = {}
        self._copies: dict[ModuleKey, LoRAFactors] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def add(self, key: ModuleKey, f: LoRAFactors) -> None:
        """Copy ``f`` (whole) into its slot; nothing of ``f`` itself is kept but its W₀."""
        group, index = self._slots[key]
        if group not in self._stacks:
            size = self._sizes[group]
            self._stacks[group] = (
                f.lora_A.new_empty((size, *f.lora_A.shape)),
                f.lora_B.new_empty((size, *f.lora_B.shape)),
            )
        stacked_A, stacked_B = self._stacks[group]
        stacked_A[index].copy_(f.lora_A.detach())
        stacked_B[index].copy_(f.lora_B.detach())
        self._copies[key] = dataclasses.replace(
            f,
            lora_A=stacked_A[index],
            lora_B=stacked_B[index],
            scaling=float(f.scaling),
            base_weight=None if f.base_weight is None else f.base_weight.detach(),
            # The variants' own small tensors change as the factors do: copied too.
            magnitude=None if f.magnitude is None else f.magnitude.detach().clone(),
            lora_E=None if f.lora_E is None else f.lora_E.detach().clone(),
        )

    def snapshot(self, step: int) -> Snapshot:
        """The snapshot of the modules added, in the order they were."""
        return Snapshot(step=step, factors=dict(self._copies))


def _whole_shape(f: LoRAFactors) -> tuple:
    """What a stack of copies of ``f`` is made for: its factors' whole shapes, dtypes and
    device, whether ``f`` is whole yet or not."""
    rows = f.lora_B.shape[0]
    if isinstance(f.rows, slice):
        rows = len(range(*f.rows.indices(rows)))
    elif f.rows is not None:
        rows = f.rows.numel()
    return (tuple(f.lora_A.shape), (rows, f.lora_B.shape[1]), f.lora_A.dtype, f.lora_B.dtype, f.lora_A.device)


def shapes_only(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, LoRAFactors]:
    """``factors`` without their values: lora_A and lora_B as meta tensors of their shapes, for
    a process that describes modules another one holds (a few bytes each, picklable)."""
    return {
        key: LoRAFactors(
            f.module_name,
            f.layer,
            f.projection,
            f.lora_A.to("meta"),
            f.lora_B.to("meta"),
            f.scaling,
        )
        for key, f in factors.items()
    }


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
