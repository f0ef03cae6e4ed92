"""Whole LoRA factors on every rank of a sharded strategy, and W₀'s numbers without W₀ whole.

Data parallelism (DDP) keeps a full replica of every parameter on each rank: nothing to do.
Sharded strategies split parameters across ranks, and a snapshot needs whole factors. Only the
LoRA factors are gathered — O((d + k)·r) per module, never W₀ — with the strategy's own
collective, which every rank must enter, outside forward and backward (the front-ends give the
engine a :class:`RankContext` — this rank, the world size, and a ``gathered`` that does it; the
strategies' own gathers live with them, in ``lora_monitor.integrations``):

- FSDP (``FSDPStrategy``): ``FullyShardedDataParallel.summon_full_params`` of the wrapped model;
- FSDP2 (``ModelParallelStrategy``, ``fully_shard``): parameters are ``DTensor`` s, gathered by
  ``DTensor.full_tensor()`` (:func:`full_factors`);
- DeepSpeed ZeRO-3 (``DeepSpeedStrategy``, the ``Trainer`` with a stage-3 config,
  ``deepspeed.initialize`` in a plain loop): ``deepspeed.zero.GatheredParameters`` of the LoRA
  parameters only (:func:`deepspeed_gathered`).

A W₀ sharded by FSDP2 or partitioned by ZeRO-3 stays so: what needs it — ‖W₀‖_F² and the
amplification's Uᵀ W₀ V — is a sum over the ranks' blocks (FSDP2's rows or columns, ZeRO-3's
runs of the flattened weight), one all-reduce of every module's m×m result
(:func:`sharded_base_results`).

With several ranks the analysis itself is spread: each rank analyses every ``world_size``-th
module (:func:`rank_share`) and the small results — φ grids and spectra, kilobytes — are
gathered on every rank (:func:`all_gather_objects`), instead of every rank repeating the whole
analysis that only rank zero logs. Each rank then keeps only its share: a snapshot makes every
module whole in turn on every rank (the gathers are collectives) but copies only the share
(:func:`capture_kept`), so that its memory, and its references', falls with the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, LoRAMonitorError, ModuleKey, Rows, is_sharded, select_rows
from lora_monitor.adapters.factors import is_partitioned
from lora_monitor.adapters.variants import dequantize_4bit_shard
from lora_monitor.analysis.snapshot import Copies, Snapshot
from lora_monitor.functional.spectra import frobenius_norm
from lora_monitor.functional.svd import factored_svd
from lora_monitor.functional.weights import amplification_from_projection, block_projection, run_projection


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor behind a (possibly) sharded parameter; a collective for a DTensor."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def whole_factors(f: LoRAFactors) -> LoRAFactors:
    """``f`` with every DTensor factor (FSDP2) replaced by the whole tensor.

    Collective when a factor is a DTensor: call it on every rank, for the same modules in the
    same order. lora_A, lora_B, DoRA's magnitude and AdaLoRA's E are gathered (the rows a fused
    module's projection owns selected after gathering); a sharded W₀ is kept as it is, with its
    rows, for :func:`sharded_base_results`: gathering it would cost d·k per module. Plain
    factors are returned as they are (no copy).
    """
    if f.rows is None and not any(is_sharded(t) for t in (f.lora_A, f.lora_B, f.magnitude, f.lora_E)):
        return f
    base_weight, rows = f.base_weight, f.rows
    if base_weight is not None and not f.base_is_sharded:
        base_weight, rows = select_rows(base_weight, rows), None
    return dataclasses.replace(
        f,
        lora_A=_full(f.lora_A),
        lora_B=select_rows(_full(f.lora_B), f.rows),
        magnitude=None if f.magnitude is None else select_rows(_full(f.magnitude), f.rows),
        lora_E=None if f.lora_E is None else _full(f.lora_E),
        base_weight=base_weight,
        rows=rows,
    )


def full_factors(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, LoRAFactors]:
    """:func:`whole_factors` of every module, all whole at once (a collective with DTensors)."""
    return {key: whole_factors(f) for key, f in factors.items()}


def capture_kept(
    live: Mapping[ModuleKey, LoRAFactors],
    kept: Collection[ModuleKey],
    step: int,
    sums: Optional[ShardedBaseSums] = None,
) -> Snapshot:
    """A snapshot at ``step`` of the ``kept`` modules of ``live``.

    Every module is made whole (:func:`whole_factors`), one at a time in the order of ``live``
    — on every rank the same collectives, kept or not — and added to ``sums`` when given (its
    W₀ numbers need every module); the kept ones are copied (a ZeRO-3 partition of W₀ replaced
    by its shape, :func:`without_partition`). Each whole module is dropped as the next replaces
    it: at most one is whole beside the copies, whatever the share kept.
    """
    copies = Copies({key: live[key] for key in kept})
    for key, f in live.items():
        whole = whole_factors(f)
        if sums is not None:
            sums.add(key, whole)
        if key in copies:
            copies.add(key, without_partition(whole))
    return copies.snapshot(step)


def without_partition(f: LoRAFactors) -> LoRAFactors:
    """``f`` with a W₀ ZeRO-3 partition replaced by a meta tensor of its shape, once
    :func:`sharded_base_results` read it: a snapshot's copy of a partition would be an empty
    tensor that no longer says it is one, while a meta W₀ stays sharded
    (:attr:`~lora_monitor.adapters.LoRAFactors.base_is_sharded`) for the analysis, which then
    says what it leaves out (intruder dimensions, DoRA) as under FSDP2."""
    if not is_partitioned(f.base_weight):
        return f
    return dataclasses.replace(f, base_weight=_shape_only(f.base_weight), rows=None)


def without_partitions(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, LoRAFactors]:
    """:func:`without_partition` of every module."""
    return {key: without_partition(f) for key, f in factors.items()}


def _shape_only(weight: Any) -> Tensor:
    """A meta tensor of a partitioned parameter's (d, k) shape and dtype: no memory, no values."""
    return torch.empty(tuple(weight.ds_shape), dtype=weight.dtype, device="meta")


@dataclasses.dataclass(frozen=True)
class LocalBlock:
    """This rank's block of a (d, k) weight: ``weight[row0 : row0 + m, col0 : col0 + n]``.

    ``counts`` is False on the replicas of a replicated mesh dimension (HSDP): their block is
    another rank's too, and must enter a sum once.
    """

    tensor: Tensor
    row0: int
    col0: int
    counts: bool


def _local(weight: Tensor) -> tuple[Tensor, list[int], bool]:
    """This rank's local tensor of a DTensor, its offset in the whole, and whether it enters
    a sum over the ranks (False on the replicas of a replicated mesh dimension)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, weight.placements  # type: ignore[attr-defined]
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    coordinate = mesh.get_coordinate() or []
    counts = all(c == 0 for c, p in zip(coordinate, placements) if isinstance(p, Replicate))
    return weight.to_local(), [int(o) for o in offset], counts  # type: ignore[attr-defined]


def local_block(weight: Tensor) -> LocalBlock:
    """The block of a DTensor (d, k) weight this rank holds, and where it sits.

    FSDP2 shards rows in ``ceil(d / world_size)`` chunks, the last ranks' short or empty
    (``to_local()`` is the unpadded block); a transposed view (GPT-2's Conv1D) is sharded on
    its columns instead. The offsets come from the function distributed checkpointing uses.
    """
    local, offset, counts = _local(weight)
    return LocalBlock(local, offset[0], offset[1], counts)


def _rows_in_block(rows: Optional[Rows], count: int, row0: int, m: int) -> tuple[Rows, Rows]:
    """The rows of a projection (of ``count`` rows, owning ``rows`` of its module) that fall
    in a block of module rows ``[row0, row0 + m)``: as rows of the block, and as the
    projection's own rows (those of its U)."""
    if rows is None:
        rows = slice(0, count)
    if isinstance(rows, slice):
        start, stop = max(rows.start, row0), min(rows.stop, row0 + m)
        start = min(start, stop)
        return slice(start - row0, stop - row0), slice(start - rows.start, stop - rows.start)
    inside = (rows >= row0) & (rows < row0 + m)
    return rows[inside] - row0, inside.nonzero().view(-1)


def shards_base(f: LoRAFactors) -> bool:
    """Whether :func:`sharded_base_results` computes ``f``'s W₀ numbers: a plain update
    (LoRA, rsLoRA, AdaLoRA) over a W₀ sharded across the whole world, stored as a matrix or as
    bitsandbytes' packed 4 bits (not a fused module's rows of those), or partitioned by ZeRO-3
    over the whole world, its partition in memory (not swapped out to NVMe). DoRA's rescaled
    rows and a PiSSA-like W₀ (the base layer holds W − s·B₀·A₀) are not summed shard by shard."""
    if not f.base_is_sharded or f.magnitude is not None or f.initial_in_base is not None:
        return False
    if is_partitioned(f.base_weight):
        weight: Any = f.base_weight
        group_size = torch.distributed.get_world_size(group=weight.ds_process_group)
        return group_size == torch.distributed.get_world_size() and weight.ds_tensor.numel() > 0
    if f.base_quantization is not None and f.rows is not None:
        return False
    mesh = f.base_weight.device_mesh  # type: ignore[union-attr]
    return mesh.size() == torch.distributed.get_world_size()


def _partition_run(f: LoRAFactors, U: Tensor) -> tuple[Tensor, Tensor, int]:
    """This rank's run of a W₀ ZeRO-3 partitions, as :func:`run_projection` takes it:
    ``(U, values, the flat row-major (d, k) index of the first)``. A partition is the run
    ``[size·rank, size·(rank + 1))`` of the flattened weight (DeepSpeed's ``_partition_param``),
    the last rank's padded past the end.

    A fused module's projection owns some of its rows only: the returned ``U`` is spread over
    the module's rows (zero on the others) and the other rows' values are zeroed, so that they
    add nothing to either sum.
    """
    weight: Any = f.base_weight
    local = weight.ds_tensor.reshape(-1).to(U.device)
    first = local.numel() * torch.distributed.get_rank(group=weight.ds_process_group)
    values = local[: max(0, min(local.numel(), weight.ds_numel - first))]
    if f.rows is not None:
        d, k = weight.ds_shape
        owned = torch.zeros(d, dtype=torch.bool, device=U.device)
        owned[f.rows] = True
        values = values * owned[torch.arange(first, first + values.numel(), device=U.device) // k]
        spread = U.new_zeros(d, U.shape[-1])
        spread[f.rows] = U
        U = spread
    return U, values, first


class ShardedBaseSums:
    """``delta_w_amplification`` and ``delta_w_relative_norm`` of every module whose W₀ is
    sharded (:func:`shards_base`), from the whole factors and this rank's block (or run) of W₀,
    the modules handed over one at a time (:meth:`add`), so that a caller that gathers them one
    by one never holds more than one whole.

    Every rank decomposes every such module's ΔW from its factors (O((d + k)·r²), small next
    to the products) and takes its block's share of ``Uᵀ W₀ V`` (m×m) and of ‖W₀‖_F²; one
    all-reduce sums them all (:meth:`results`): W₀ is never whole anywhere.
    """

    def __init__(self) -> None:
        #: key → (ΔW's singular values, this rank's share of Uᵀ W₀ V and of ‖W₀‖_F², flat).
        self._shares: dict[ModuleKey, tuple[Tensor, Tensor]] = {}
        #: The first failure: the sums are then given up on every module (raised by results).
        self._error: Optional[Exception] = None

    def add(self, key: ModuleKey, f: LoRAFactors) -> None:
        """Take this rank's share of ``f``'s sums, if its W₀ is sharded. Not collective. A
        failure is kept for :meth:`results` to raise: a caller gathering the next modules
        must go on with the other ranks."""
        if self._error is not None or not shards_base(f):
            return
        try:
            self._shares[key] = _base_share(f)
        except Exception as error:
            self._error = error

    def results(self) -> dict[ModuleKey, dict[str, Tensor]]:
        """The numbers of every module added whose W₀ is sharded. Collective: call it on every
        rank after adding the same modules. ``{}`` without a sharded W₀ (nothing collective).

        Raises:
            Exception: the first failure of :meth:`add`, before anything collective.
        """
        if self._error is not None:
            raise self._error
        keys = sorted(self._shares)
        if not keys:
            return {}
        total = torch.cat([self._shares[key][1] for key in keys])
        torch.distributed.all_reduce(total)
        results, offset = {}, 0
        for key in keys:
            S = self._shares[key][0]
            m = S.numel()
            projected = total[offset : offset + m * m].view(m, m)
            squared_norm = total[offset + m * m]
            offset += m * m + 1
            results[key] = {
                "delta_w_amplification": amplification_from_projection(S, projected),
                "delta_w_relative_norm": frobenius_norm(S) / squared_norm.sqrt(),
            }
        return results


def _base_share(f: LoRAFactors) -> tuple[Tensor, Tensor]:
    """ΔW's singular values and this rank's share of ``[Uᵀ W₀ V (flat), ‖W₀‖_F²]``."""
    U, S, Vh = factored_svd(f.lora_B, f.lora_A, f.scaling)
    if is_partitioned(f.base_weight) or f.base_quantization is not None:  # a flat run of W₀
        if is_partitioned(f.base_weight):
            U, values, first = _partition_run(f, U)
        else:
            packed, packed_offset, counts = _local(f.base_weight)  # type: ignore[arg-type]
            values, first = dequantize_4bit_shard(packed, packed_offset[0], f.base_quantization)
            values = values if counts else values[:0]
        return S, torch.cat(
            [run_projection(U, Vh, values, first).reshape(-1), values.to(S.dtype).square().sum().reshape(1)]
        )
    block = local_block(f.base_weight)  # type: ignore[arg-type]
    m, n = block.tensor.shape
    local_rows, own_rows = _rows_in_block(f.rows, f.out_features, block.row0, m)
    W = block.tensor[local_rows] if isinstance(local_rows, slice) else block.tensor.index_select(0, local_rows)
    columns = slice(block.col0, block.col0 + n)
    if not block.counts:
        W = W[:0]
    U_rows = U[own_rows] if isinstance(own_rows, slice) else U.index_select(0, own_rows)
    share = block_projection(U_rows, Vh, W, columns=columns)
    return S, torch.cat([share.reshape(-1), W.to(S.dtype).square().sum().reshape(1)])


def sharded_base_results(factors: Mapping[ModuleKey, LoRAFactors]) -> dict[ModuleKey, dict[str, Tensor]]:
    """:class:`ShardedBaseSums` of every module of ``factors`` (whole): a collective, to call on
    every rank with the same modules; ``{}`` without a sharded W₀ (nothing collective)."""
    sums = ShardedBaseSums()
    for key, f in factors.items():
        sums.add(key, f)
    return sums.results()


#: What peft names the parameters of a LoRA update (A, B, AdaLoRA's E, DoRA's magnitude).
LORA_PARAMETERS = (".lora_A.", ".lora_B.", ".lora_E.", ".lora_magnitude_vector.")


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA update's parameters of ``module`` by name (only those: W₀ is never gathered)."""
    return {name: p for name, p in module.named_parameters() if any(part in name for part in LORA_PARAMETERS)}


def zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the LoRA factors of ``module`` (``deepspeed.initialize``
    with stage 3, or ``deepspeed.zero.Init``): parameters with ``ds_id``, gathered or not."""
    return any(hasattr(p, "ds_id") for p in lora_parameters(module).values())


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
    """DeepSpeed ZeRO-3: the LoRA parameters of ``module`` whole on every rank (a collective).

    Raises:
        LoRAMonitorError: the partitions cannot be gathered (deepspeed not importable, or its
            gather failed), naming the parameters.
    """
    parameters = lora_parameters(module)
    names = ", ".join(list(parameters)[:2]) + (f" and {len(parameters) - 2} more" if len(parameters) > 2 else "")
    try:
        import deepspeed
    except ImportError as error:
        raise LoRAMonitorError(
            f"the LoRA factors ({names}) are DeepSpeed ZeRO-3 partitions and deepspeed cannot be "
            f"imported here ({error}) to gather them: run the monitor in the environment that trains "
            f"with deepspeed"
        ) from error
    with contextlib.ExitStack() as stack:
        try:
            # modifier_rank=None: read-only, every rank gets the whole parameters.
            stack.enter_context(deepspeed.zero.GatheredParameters(list(parameters.values()), modifier_rank=None))
        except Exception as error:
            raise LoRAMonitorError(
                f"DeepSpeed ZeRO-3 could not gather the LoRA factors ({names}) with "
                f"deepspeed.zero.GatheredParameters: {type(error).__name__}: {error}. Every rank "
                f"must take the monitor's snapshots together (call LoRAMonitor.step on all ranks), "
                f"after deepspeed.initialize and outside forward and backward"
            ) from error
        yield


def rank_share(keys: Iterable[ModuleKey], rank: int, world_size: int) -> list[ModuleKey]:
    """The modules ``rank`` analyses when ``world_size`` ranks share the work: every
    ``world_size``-th of the sorted keys, so each rank gets modules of every shape (its batched
    calls stay large) and about the same amount of work."""
    return sorted(keys)[rank::world_size]


@dataclasses.dataclass(frozen=True)
class RankContext:
    """Where the monitor runs, as its front-end knows it: this process's global rank, how many
    processes train together, and how to make sharded LoRA parameters whole for a snapshot.

    Attributes:
        rank: the global rank (0 in a single process); only rank 0 writes.
        world_size: the number of training processes.
        gathered: a context manager factory inside which the LoRA factors are whole on every
            rank (FSDP's ``summon_full_params``, DeepSpeed ZeRO-3's ``GatheredParameters``);
            entered on every rank, outside forward and backward.
        keeps_base_weight: False where what ``gathered`` makes whole is freed when it exits
            (FSDP's ``summon_full_params`` gathers W₀ with the factors): W₀'s numbers are then
            computed inside it, at the snapshot's step.
        collective_forward: the strategy, as messages name it (``"FSDP"``, ``"DeepSpeed
            ZeRO-3"``), whose forward gathers parameters from every rank, so that no rank can
            run one alone (the functional probe, read on rank zero only, does not run); None
            where each rank holds the whole model (single process, DDP) or FSDP2's DTensors.
    """

    rank: int = 0
    world_size: int = 1
    gathered: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    keeps_base_weight: bool = True
    collective_forward: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_torch_distributed(cls) -> RankContext:
        """The rank and world size of torch's default process group (one process without)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
        return cls()

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, rank: Optional[int] = None, world_size: Optional[int] = None
    ) -> RankContext:
        """Where a monitor of ``model`` runs, from the model itself: gathering through FSDP (1)
        when ``model`` is its wrapped root and through DeepSpeed when ZeRO-3 partitions its
        LoRA factors (a plain loop hands the monitor what it trains, or ``engine.module``; a
        front-end its strategy's wrapped model). ``rank`` and ``world_size`` as the front-end's
        framework counts them; default torch's process group (:meth:`from_torch_distributed`)."""
        context = cls.from_torch_distributed()
        if rank is not None and world_size is not None:
            context = dataclasses.replace(context, rank=rank, world_size=world_size)
        # ZeRO-3 partitions on a single rank too: its factors are empty until gathered.
        if zero3_partitioned(model):
            return dataclasses.replace(
                context, gathered=lambda: deepspeed_gathered(model), collective_forward="DeepSpeed ZeRO-3"
            )
        if context.world_size > 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(model, FullyShardedDataParallel):
                return dataclasses.replace(
                    context, gathered=lambda: fsdp_gathered(model), keeps_base_weight=False, collective_forward="FSDP"
                )
        return context

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
