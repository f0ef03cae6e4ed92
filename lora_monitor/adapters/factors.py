"""What one LoRA update is made of (:class:`LoRAFactors`), and how lora_monitor names modules.

Naming rules (shared by live models and saved adapters, so that the two give the same keys):

- the layer index is the first purely numeric component of the module path (``-1`` for a module
  outside any numbered stack, e.g. a classification head);
- the projection is canonical for attention projections (``q_proj``/``query``/``q``/``q_lin`` →
  ``"q"``, likewise ``"k"``, ``"v"``; ``o_proj``/``out_proj`` → ``"o"``), else the module's last
  name (``"gate_proj"``, ``"dense"``);
- a fused q|k|v projection (GPT-2's and GPT-BigCode's ``c_attn``, Phi-3's ``qkv_proj``,
  Falcon's, GPT-NeoX's and BLOOM's ``query_key_value``) is split in three factors ``"q"``,
  ``"k"``, ``"v"`` that share A and hold the rows of B each architecture gives that projection
  (:mod:`lora_monitor.adapters.fused`);
- when two modules would get the same key (an encoder and a decoder stack, BERT's three
  ``dense`` layers in one block), their projections are qualified with the first component
  where their paths differ: ``"encoder.q"`` / ``"decoder.q"``, ``"attention.dense"`` /
  ``"intermediate.dense"`` / ``"output.dense"``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union, overload

from torch import Tensor

#: (layer index, projection), e.g. ``(3, "q")``: how the rest of lora_monitor names a module.
ModuleKey = tuple[int, str]

#: Which output rows of a module a projection owns: a slice, or an index tensor where the
#: architecture interleaves its projections per head.
Rows = Union[slice, Tensor]


class LoRAMonitorError(ValueError):
    """A problem the user must fix: what was found, what was expected, what to do."""


@dataclass(frozen=True)
class LoRAFactors:
    """The factors of one LoRA update, so that ΔW = scaling · lora_B @ lora_A for plain LoRA.

    Attributes:
        module_name: the module's path in the model (or the adapter file's key prefix), e.g.
            ``"base_model.model.model.layers.3.self_attn.q_proj"``.
        layer: layer index (the first integer in the module path).
        projection: canonical projection name: ``"q"``, ``"k"``, ``"v"``, ``"o"`` for the
            attention projections of known architectures (``q_proj``, ``query``, a fused
            q|k|v split in three, ...), else the module's own last name (``"gate_proj"``).
        lora_A: A, ``(r, k)``; for AdaLoRA E ⊙ A, its singular values folded in.
        lora_B: B, ``(d, r)``; for a fused q|k|v module the rows of this projection.
        scaling: s (α/r, or α/√r with rsLoRA; AdaLoRA: α/r / (ranknum + 1e-5)).
        base_weight: W₀ in the (d, k) orientation, a view into the live model (None for
            adapters loaded from disk, and where no view of it exists: see ``base_reader``);
            under DeepSpeed ZeRO-3 the partitioned parameter itself (:func:`is_partitioned`).
        base_reader: reads W₀ as a fresh (d, k) tensor where it is not stored as a plain
            matrix with these rows contiguous (4/8-bit quantized storage, rows interleaved per
            head): called one module at a time by the analysis, the result dropped after use.
        magnitude: DoRA's magnitude vector m ``(d,)`` (rows of this projection), else None:
            the model then applies W' = diag(m / ‖row of W₀ + s·B·A‖)·(W₀ + s·B·A).
        lora_E: AdaLoRA's singular values E ``(r,)`` (already folded into ``lora_A``), else
            None; the rank it keeps is the count of non-zero entries.
        initial_in_base: the ``init_lora_weights`` (``"pissa"``, ``"olora"``, ``"corda"``,
            ``"loftq"``) that moved s·B₀·A₀ out of the base weight at initialization, so that
            the update since the pretrained weight is s·(B·A − B₀·A₀); None when the base layer
            holds the pretrained weight.
        base_quantization: bitsandbytes' 4-bit quantization state of a W₀ stored packed and
            sharded across processes (QLoRA with FSDP2): ``base_weight`` then holds the packed
            bytes, which each rank dequantizes from its own shard. None otherwise.
        rows: the output rows of its module this projection owns, not selected yet: set only
            where the module's tensors are sharded (DTensors, FSDP2), whose slicing would
            gather them, or where W₀ is a ZeRO-3 partition (read in flat runs, not rows).
            ``lora_B``, ``magnitude`` and ``base_weight`` are then the whole module's;
            gathering the factors selects the rows of B and m
            (:func:`lora_monitor.engine.distributed.full_factors`), W₀ is never gathered.
    """

    module_name: str
    layer: int
    projection: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    base_weight: Optional[Tensor] = None
    base_reader: Optional[Callable[[], Tensor]] = None
    magnitude: Optional[Tensor] = None
    lora_E: Optional[Tensor] = None
    initial_in_base: Optional[str] = None
    base_quantization: Optional[Any] = None
    rows: Optional[Rows] = None

    @property
    def key(self) -> ModuleKey:
        return (self.layer, self.projection)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def variant(self) -> str:
        """The peft variant, as messages name it: ``"LoRA"``, ``"DoRA"``, ``"AdaLoRA"``, with
        the initialization that changed the base weight (``"LoRA (pissa init)"``)."""
        name = "DoRA" if self.magnitude is not None else "AdaLoRA" if self.lora_E is not None else "LoRA"
        return f"{name} ({self.initial_in_base} init)" if self.initial_in_base else name

    def read_base_weight(self) -> Optional[Tensor]:
        """W₀ as a (d, k) matrix (a view, or a fresh tensor from ``base_reader``); None if the
        factors carry neither."""
        if self.base_weight is not None:
            return self.base_weight
        return self.base_reader() if self.base_reader is not None else None

    @property
    def has_base_weight(self) -> bool:
        return self.base_weight is not None or self.base_reader is not None

    @property
    def base_is_sharded(self) -> bool:
        """W₀ is split across processes (FSDP2's DTensor, a DeepSpeed ZeRO-3 partition, which a
        snapshot holds as a meta tensor of its shape): only collective products can read it."""
        weight = self.base_weight
        return is_sharded(weight) or is_partitioned(weight) or (weight is not None and weight.is_meta)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (split across processes by FSDP2 or a device mesh)."""
    if tensor is None or type(tensor).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_partitioned(tensor: object) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter not gathered now: its data is empty
    (shape ``(0,)``), each rank holding a run of the flattened whole in ``ds_tensor``, and its
    shape is ``ds_shape``. Inside ``deepspeed.zero.GatheredParameters`` it is whole again."""
    status = getattr(tensor, "ds_status", None)
    # Read by name: deepspeed need not be importable to tell (ZeroParamStatus.AVAILABLE).
    return hasattr(tensor, "ds_id") and getattr(status, "name", None) != "AVAILABLE"


# --------------------------------------------------------------------------------------------
# Naming


_CANONICAL_PROJECTIONS: dict[str, str] = {
    **dict.fromkeys(("q_proj", "query", "q", "q_lin", "q_attn"), "q"),
    **dict.fromkeys(("k_proj", "key", "k", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "value", "v", "v_lin"), "v"),
    **dict.fromkeys(("o_proj", "out_proj"), "o"),
}

#: What the paths of a peft model start with; stripped to match peft's ``rank_pattern`` keys.
PEFT_PREFIX = "base_model.model."


def _layer_index(module_name: str) -> int:
    """The first purely numeric component of a module path, -1 if there is none."""
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return -1


def _projection_name(module_name: str) -> str:
    last = module_name.rsplit(".", 1)[-1]
    return _CANONICAL_PROJECTIONS.get(last, last)


@dataclass
class _Entry:
    """One LoRA update before its key is made unique (and before a fused module is split)."""

    module_name: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    base_weight: Optional[Tensor]
    #: Default: the module's canonical projection name (``q_proj`` → ``q``).
    projection: str = ""
    base_reader: Optional[Callable[[Optional[Rows]], Tensor]] = None
    magnitude: Optional[Tensor] = None
    lora_E: Optional[Tensor] = None
    initial_in_base: Optional[str] = None
    base_quantization: Optional[Any] = None
    #: The output rows this entry owns in its module (None: all of them).
    rows: Optional[Rows] = None
    qualifiers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.projection:
            self.projection = _projection_name(self.module_name)

    @property
    def layer(self) -> int:
        return _layer_index(self.module_name)


def _qualify(group: list[_Entry]) -> None:
    """Give entries sharing one key distinct qualifiers from where their module paths differ.

    The first differing path component that is not a number is used (``encoder``/``decoder``,
    ``attention``/``intermediate``); if only numbers differ, the number with the component
    before it (``experts.3``). Entries still sharing a qualifier are separated recursively.
    """
    if len(group) < 2:
        return
    paths = [e.module_name.split(".") for e in group]
    length = max(len(p) for p in paths)
    padded = [p + [""] * (length - len(p)) for p in paths]
    differing = [i for i in range(length) if len({p[i] for p in padded}) > 1]
    if not differing:  # identical paths: a fused split already made the projections differ
        return
    named = [i for i in differing if not any(p[i].isdigit() for p in padded)]
    index = named[0] if named else differing[0]
    subgroups: dict[str, list[_Entry]] = defaultdict(list)
    for entry, path in zip(group, padded):
        part = path[index]
        if part.isdigit() and index > 0:
            part = f"{path[index - 1]}.{part}"
        if part:
            entry.qualifiers.append(part)
        subgroups[part].append(entry)
    for subgroup in subgroups.values():
        _qualify(subgroup)


@overload
def select_rows(tensor: Tensor, rows: Optional[Rows]) -> Tensor: ...


@overload
def select_rows(tensor: Optional[Tensor], rows: Optional[Rows]) -> Optional[Tensor]: ...


def select_rows(tensor: Optional[Tensor], rows: Optional[Rows]) -> Optional[Tensor]:
    """``tensor``'s rows ``rows``: a view for a slice, a gathered copy for an index tensor."""
    if tensor is None or rows is None:
        return tensor
    if isinstance(rows, slice):
        return tensor[rows]
    return tensor.index_select(0, rows.to(tensor.device))


def _factors_of(entry: _Entry, projection: str) -> LoRAFactors:
    rows = entry.rows
    sharded = any(is_sharded(t) for t in (entry.lora_B, entry.magnitude, entry.base_weight))
    if rows is not None and (sharded or is_partitioned(entry.base_weight)):
        # Slicing a DTensor gathers it (W₀ included), a ZeRO-3 partition has no rows to slice:
        # the rows are kept to select once gathered, or to read the partition's share by.
        return LoRAFactors(
            module_name=entry.module_name,
            layer=entry.layer,
            projection=projection,
            lora_A=entry.lora_A,
            lora_B=entry.lora_B,
            scaling=entry.scaling,
            base_weight=entry.base_weight,
            magnitude=entry.magnitude,
            lora_E=entry.lora_E,
            initial_in_base=entry.initial_in_base,
            base_quantization=entry.base_quantization,
            rows=rows,
        )
    base_weight, base_reader = entry.base_weight, None
    if base_weight is not None and rows is not None and not isinstance(rows, slice):
        # Per-head rows are no view of W₀: read them when analyzed instead of keeping a copy.
        reader, index = base_weight, rows
        base_weight = None
        base_reader = lambda: reader.index_select(0, index.to(reader.device))  # noqa: E731
    elif entry.base_reader is not None:
        read = entry.base_reader
        base_reader = lambda: read(rows)  # noqa: E731
    return LoRAFactors(
        module_name=entry.module_name,
        layer=entry.layer,
        projection=projection,
        lora_A=entry.lora_A,
        lora_B=select_rows(entry.lora_B, rows),
        scaling=entry.scaling,
        base_weight=select_rows(base_weight, rows),
        base_reader=base_reader,
        magnitude=select_rows(entry.magnitude, rows),
        lora_E=entry.lora_E,
        initial_in_base=entry.initial_in_base,
        base_quantization=entry.base_quantization,
    )


def _assemble(entries: Iterable[_Entry]) -> dict[ModuleKey, LoRAFactors]:
    """Make keys unique and build the :class:`LoRAFactors` (fused modules already split)."""
    entries = list(entries)
    groups: dict[ModuleKey, list[_Entry]] = defaultdict(list)
    for entry in entries:
        groups[(entry.layer, entry.projection)].append(entry)
    for group in groups.values():
        _qualify(group)
    result: dict[ModuleKey, LoRAFactors] = {}
    for entry in entries:
        factors = _factors_of(entry, ".".join([*entry.qualifiers, entry.projection]))
        if factors.key in result:  # cannot happen for distinct paths; guard against silent loss
            raise LoRAMonitorError(
                f"modules {result[factors.key].module_name} and {entry.module_name} both map to "
                f"key {factors.key}; please report this model layout to lora_monitor"
            )
        result[factors.key] = factors
    return dict(sorted(result.items()))


def _describe(factors: Mapping[ModuleKey, LoRAFactors]) -> str:
    projections = sorted({f.projection for f in factors.values()})
    layers = sorted({f.layer for f in factors.values()})
    modules = sorted({f.module_name.rsplit(".", 1)[-1] for f in factors.values()})
    return f"projections {projections} (module names {modules}), layers {layers}"
