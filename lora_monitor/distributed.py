"""Whole LoRA factors on every rank of a sharded strategy, for a snapshot.

Data parallelism (DDP) keeps a full replica of every parameter on each rank: nothing to do.
Sharded strategies split parameters across ranks, and a snapshot needs whole factors. Only the
LoRA factors are gathered — O((d + k)·r) per module, never W₀ — with the strategy's own
collective, which every rank must enter, outside forward and backward (the callback does it in
``on_train_batch_end`` on every rank):

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
from typing import Any, Iterable, Iterator, Mapping

import lightning.pytorch as pl
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


def _lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in module.named_parameters() if ".lora_A." in name or ".lora_B." in name]


@contextlib.contextmanager
def gathered_lora_parameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Inside this context the LoRA parameters of ``pl_module`` are whole on every rank.

    Enter it on every rank (it is a collective under FSDP and DeepSpeed ZeRO-3), outside
    forward/backward. Other strategies (single device, DDP, FSDP2 whose DTensors
    :func:`full_factors` gathers) need nothing.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # Summoning the root gathers every unit: peft's LoRA modules may sit in any of them.
        # No writeback (the snapshot only reads) and a copy on every rank (all ranks capture).
        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False, recurse=True):
            yield
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        # modifier_rank=None: read-only, every rank gets the whole parameters.
        with deepspeed.zero.GatheredParameters(_lora_parameters(pl_module), modifier_rank=None):
            yield
    else:
        yield


def rank_share(keys: Iterable[ModuleKey], rank: int, world_size: int) -> list[ModuleKey]:
    """The modules ``rank`` analyses when ``world_size`` ranks share the work: every
    ``world_size``-th of the sorted keys, so each rank gets modules of every shape (its batched
    calls stay large) and about the same amount of work."""
    return sorted(keys)[rank::world_size]


def analysis_is_spread(trainer: pl.Trainer) -> bool:
    """Whether the ranks of ``trainer`` split the analysis (several ranks, one process group)."""
    return (
        trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() == trainer.world_size
    )


def all_gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank (a collective: call it on all).

    Meant for small picklable results; tensors in them should be on the host.
    """
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
