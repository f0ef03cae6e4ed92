"""Whole LoRA factors on every rank of a sharded strategy, for a snapshot.

Data parallelism (DDP) keeps a full replica of every parameter on each rank: nothing to do.
Sharded strategies split parameters across ranks, and a snapshot needs whole factors. Only the
LoRA factors are gathered — O((d + k)·r) per module, never W₀ — with the strategy's own
collective, which every rank must enter, outside forward and backward (the front-ends give the
engine a :class:`Process` whose ``gathered`` does it; the strategies' own gathers live with them,
in ``lora_monitor.integrations``):

- FSDP (``FSDPStrategy``): ``FullyShardedDataParallel.summon_full_params`` of the wrapped model;
- FSDP2 (``ModelParallelStrategy``, ``fully_shard``): parameters are ``DTensor`` s, gathered by
  ``DTensor.full_tensor()`` (:func:`full_factors`);
- DeepSpeed ZeRO-3 (``DeepSpeedStrategy``, stage 3): ``deepspeed.zero.GatheredParameters`` of
  the LoRA parameters only.

With several ranks the analysis itself is spread: each rank analyses every ``world_size``-th
module (:func:`rank_share`) and the small results — φ grids and spectra, kilobytes — are
gathered on every rank (:func:`all_gather_objects`), instead of every rank repeating the whole
analysis that only rank zero logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor behind a (possibly) sharded parameter; a collective for a DTensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed tensors: nothing can be sharded that way
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_factors(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, LoRAFactors]:
    """``factors`` with every DTensor factor (FSDP2) replaced by the whole tensor.

    Collective when any factor is a DTensor: call it on every rank, in the same module order.
    Plain tensors are returned as they are (no copy). ``base_weight`` is dropped for DTensors:
    gathering W₀ would cost d·k per module.
    """
    gathered = {}
    for key, f in factors.items():
        A, B = _full(f.lora_A), _full(f.lora_B)
        if A is f.lora_A and B is f.lora_B:
            gathered[key] = f
        else:
            gathered[key] = dataclasses.replace(f, lora_A=A, lora_B=B, base_weight=None)
    return gathered


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA factors' parameters of ``module`` (only those: W₀ is never gathered)."""
    return [p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name]


@contextlib.contextmanager
def fsdp_gathered(fsdp_model: torch.nn.Module) -> Iterator[None]:
    """FSDP (1): every unit's parameters whole on every rank (a collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    # Summoning the root gathers every unit: peft's LoRA modules may sit in any of them.
    # No writeback (the snapshot only reads) and a copy on every rank (all ranks capture).
    with FullyShardedDataParallel.summon_full_params(fsdp_model, writeback=False, recurse=True):
        yield


@contextlib.contextmanager
def deepspeed_gathered(module: torch.nn.Module) -> Iterator[None]:
    """DeepSpeed ZeRO-3: the LoRA parameters of ``module`` whole on every rank (a collective)."""
    import deepspeed

    # modifier_rank=None: read-only, every rank gets the whole parameters.
    with deepspeed.zero.GatheredParameters(lora_parameters(module), modifier_rank=None):
        yield


def rank_share(keys: Iterable[ModuleKey], rank: int, world_size: int) -> list[ModuleKey]:
    """The modules ``rank`` analyses when ``world_size`` ranks share the work: every
    ``world_size``-th of the sorted keys, so each rank gets modules of every shape (its batched
    calls stay large) and about the same amount of work."""
    return sorted(keys)[rank::world_size]


@dataclasses.dataclass(frozen=True)
class Process:
    """Where the monitor runs, as its front-end knows it: this process's global rank, how many
    processes train together, and how to make sharded LoRA parameters whole for a snapshot.

    Attributes:
        rank: the global rank (0 in a single process); only rank 0 writes.
        world_size: the number of training processes.
        gathered: a context manager factory inside which the LoRA factors are whole on every
            rank (FSDP's ``summon_full_params``, DeepSpeed ZeRO-3's ``GatheredParameters``);
            entered on every rank, outside forward and backward.
    """

    rank: int = 0
    world_size: int = 1
    gathered: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_torch_distributed(cls) -> Process:
        """The rank and world size of torch's default process group (one process without)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
        return cls()

    @property
    def spreads_analysis(self) -> bool:
        """Whether the ranks split the analysis (several ranks, in one process group)."""
        return (
            self.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() == self.world_size
        )


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank (a collective: call it on all).

    Meant for small picklable results; tensors in them should be on the host.
    """
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
