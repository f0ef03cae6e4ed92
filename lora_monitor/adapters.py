"""All of lora_monitor's knowledge of peft: where the LoRA factors of a model are.

A live model (a ``PeftModel``, or any ``torch.nn.Module`` — a ``LightningModule`` — holding peft
LoRA layers anywhere inside it) or an adapter directory written by ``save_pretrained``
(``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin``) is turned into
one :class:`LoRAFactors` per (layer index, projection): peft's ``lora_A`` (r×k), ``lora_B``
(d×r) and ``scaling``, so that ΔW = scaling · lora_B @ lora_A in the (out, in) orientation of
``torch.nn.Linear`` whatever the layer type.

Naming rules (shared by live models and saved adapters, so that the two give the same keys):

- the layer index is the first purely numeric component of the module path (``-1`` for a module
  outside any numbered stack, e.g. a classification head);
- the projection is canonical for attention projections (``q_proj``/``query``/``q``/``q_lin`` →
  ``"q"``, likewise ``"k"``, ``"v"``; ``o_proj``/``out_proj`` → ``"o"``), else the module's last
  name (``"gate_proj"``, ``"dense"``);
- GPT-2's fused ``c_attn`` (B has 3·d rows for d = in_features) is split in three factors
  ``"q"``, ``"k"``, ``"v"`` that share A and hold row blocks of B (2·d rows in a cross-attention
  block: ``"k"``, ``"v"``; ``q_attn`` is ``"q"``);
- when two modules would get the same key (an encoder and a decoder stack, BERT's three
  ``dense`` layers in one block), their projections are qualified with the first component
  where their paths differ: ``"encoder.q"`` / ``"decoder.q"``, ``"attention.dense"`` /
  ``"intermediate.dense"`` / ``"output.dense"``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

#: (layer index, projection), e.g. ``(3, "q")``: how the rest of lora_monitor names a module.
ModuleKey = tuple[int, str]


class LoRAMonitorError(ValueError):
    """A problem the user must fix: what was found, what was expected, what to do."""


@dataclass(frozen=True)
class LoRAFactors:
    """The factors of one LoRA update ΔW = scaling · lora_B @ lora_A.

    Attributes:
        module_name: the module's path in the model (or the adapter file's key prefix), e.g.
            ``"base_model.model.model.layers.3.self_attn.q_proj"``.
        layer: layer index (the first integer in the module path).
        projection: canonical projection name: ``"q"``, ``"k"``, ``"v"``, ``"o"`` for the
            attention projections of known architectures (``q_proj``, ``query``, GPT-2's fused
            ``c_attn`` split in three, ...), else the module's own last name (``"gate_proj"``).
        lora_A: A, ``(r, k)``.
        lora_B: B, ``(d, r)``; for a fused ``c_attn`` the row block of this projection.
        scaling: s (α/r, or α/√r with rsLoRA).
        base_weight: W₀ in the (d, k) orientation, a view into the live model (None for
            adapters loaded from disk).
    """

    module_name: str
    layer: int
    projection: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    base_weight: Optional[Tensor] = None

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


# --------------------------------------------------------------------------------------------
# Naming


_CANONICAL_PROJECTIONS: dict[str, str] = {
    **dict.fromkeys(("q_proj", "query", "q", "q_lin", "q_attn"), "q"),
    **dict.fromkeys(("k_proj", "key", "k", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "value", "v", "v_lin"), "v"),
    **dict.fromkeys(("o_proj", "out_proj"), "o"),
}

#: Fused query/key/value projections split into per-projection factors (B's row blocks).
_FUSED_QKV_NAMES = ("c_attn",)

#: What the paths of a peft model start with; stripped to match peft's ``rank_pattern`` keys.
_PEFT_PREFIX = "base_model.model."


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
    """One LoRA update before its key is made unique."""

    module_name: str
    projection: str
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    base_weight: Optional[Tensor]
    qualifiers: list[str] = field(default_factory=list)

    @property
    def layer(self) -> int:
        return _layer_index(self.module_name)


def _split_entry(entry: _Entry) -> list[_Entry]:
    """Split a fused q|k|v update (GPT-2's ``c_attn``) into row blocks of B and of W₀."""
    last = entry.module_name.rsplit(".", 1)[-1]
    if last not in _FUSED_QKV_NAMES:
        return [entry]
    rows, in_features = entry.lora_B.shape[0], entry.lora_A.shape[1]
    if rows == 3 * in_features:
        parts = ("q", "k", "v")
    elif rows == 2 * in_features and "cross" in entry.module_name.lower():
        parts = ("k", "v")  # GPT-2 cross-attention: c_attn holds k|v, q_attn holds q
    else:
        warnings.warn(
            f"lora_monitor: {entry.module_name} is named like a fused q|k|v projection but its "
            f"lora_B has {rows} rows for {in_features} input features (not 3·{in_features}); "
            f"it is kept whole as projection {last!r}",
            stacklevel=3,
        )
        return [entry]
    d = rows // len(parts)
    return [
        _Entry(
            module_name=entry.module_name,
            projection=name,
            lora_A=entry.lora_A,
            lora_B=entry.lora_B[i * d : (i + 1) * d],
            scaling=entry.scaling,
            base_weight=(
                None if entry.base_weight is None else entry.base_weight[i * d : (i + 1) * d]
            ),
        )
        for i, name in enumerate(parts)
    ]


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


def _assemble(entries: Iterable[_Entry]) -> dict[ModuleKey, LoRAFactors]:
    """Split fused projections, make keys unique and build the :class:`LoRAFactors`."""
    split = [part for entry in entries for part in _split_entry(entry)]
    groups: dict[ModuleKey, list[_Entry]] = defaultdict(list)
    for entry in split:
        groups[(entry.layer, entry.projection)].append(entry)
    for group in groups.values():
        _qualify(group)
    result: dict[ModuleKey, LoRAFactors] = {}
    for entry in split:
        projection = ".".join([*entry.qualifiers, entry.projection])
        factors = LoRAFactors(
            module_name=entry.module_name,
            layer=entry.layer,
            projection=projection,
            lora_A=entry.lora_A,
            lora_B=entry.lora_B,
            scaling=entry.scaling,
            base_weight=entry.base_weight,
        )
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


# --------------------------------------------------------------------------------------------
# Live models


def _lora_layer_class() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _is_conv1d(module: torch.nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2), whose weight is stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def _base_weight(layer: Any, out_features: int, in_features: int) -> Optional[Tensor]:
    """W₀ of a LoRA layer as a (d, k) view, or None if its weight is not a plain matrix."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        return None
    if getattr(layer, "fan_in_fan_out", False) or _is_conv1d(base):
        weight = weight.T
    if tuple(weight.shape) != (out_features, in_features):
        return None  # quantized or sharded storage: no (d, k) view of W₀
    return weight


def _skip_reason(layer: Any, name: str) -> Optional[str]:
    """Why the factors of adapter ``name`` in ``layer`` are not a plain Linear LoRA, or None."""
    if name in getattr(layer, "lora_embedding_A", {}):
        return "Embedding LoRA"
    if isinstance(layer.get_base_layer(), torch.nn.MultiheadAttention):
        return "MultiheadAttention LoRA"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if not (isinstance(lora_A, torch.nn.Linear) and isinstance(lora_B, torch.nn.Linear)):
        return f"{type(lora_A).__name__} factors (not Linear)"
    A, B = lora_A.weight, lora_B.weight
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        return f"factor shapes A {tuple(A.shape)}, B {tuple(B.shape)}"
    return None


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    lora_layer = _lora_layer_class()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer)]


def _adapters_of(layer: Any) -> set[str]:
    names = set(layer.lora_A.keys())
    names.update(getattr(layer, "lora_embedding_A", {}).keys())
    return names


def _no_lora_error(model: torch.nn.Module) -> LoRAMonitorError:
    cls = type(model).__name__
    for module in model.modules():
        config = getattr(module, "peft_config", None)
        if not isinstance(config, Mapping) or not config:
            continue
        types = {str(getattr(c, "peft_type", "?")).rsplit(".", 1)[-1] for c in config.values()}
        if types - {"LORA"}:
            return LoRAMonitorError(
                f"{cls} is a peft model of type {sorted(types)}, not LoRA: lora_monitor analyses "
                f"LoRA factors (lora_A, lora_B) only; use peft.LoraConfig"
            )
        return LoRAMonitorError(
            f"{cls} has a peft LoRA configuration ({sorted(config)}) but no LoRA layers left: "
            f"the adapter was merged and unloaded (merge_and_unload() / unload()) or deleted, so "
            f"ΔW is no longer separate from the base weights. Monitor the model before merging, "
            f"or analyse the saved adapter with lora_monitor.adapters.load_adapter(path)"
        )
    return LoRAMonitorError(
        f"no peft LoRA layers found in {cls}; wrap the model with "
        f"peft.get_peft_model(model, LoraConfig(target_modules=[...])) before training (a "
        f"LightningModule may hold the PeftModel as an attribute), and pass the module that "
        f"contains it"
    )


def _resolve_adapter(layers: list[tuple[str, Any]], adapter_name: Optional[str]) -> str:
    available: set[str] = set()
    for _, layer in layers:
        available |= _adapters_of(layer)
    if adapter_name is not None:
        if adapter_name not in available:
            raise LoRAMonitorError(
                f"adapter {adapter_name!r} not found in the model's LoRA layers; adapters "
                f"present: {sorted(available)}"
            )
        return adapter_name
    active: set[str] = set()
    for _, layer in layers:
        active.update(a for a in layer.active_adapters if a in available)
    if len(active) == 1:
        return next(iter(active))
    if not active:
        raise LoRAMonitorError(
            f"no LoRA adapter is active in the model (adapters present: {sorted(available)}); "
            f"activate one with model.set_adapter(name) or pass adapter_name="
        )
    raise LoRAMonitorError(
        f"several LoRA adapters are active at once: {sorted(active)}; pass adapter_name= one "
        f"of them to choose which adapter to analyse"
    )


def find_lora_factors(
    model: torch.nn.Module, adapter_name: Optional[str] = None
) -> dict[ModuleKey, LoRAFactors]:
    """The LoRA factors of every plain Linear LoRA layer of a live model, by (layer, projection).

    Args:
        model: a ``PeftModel``, a model with LoRA layers injected by peft, or any module (a
            ``LightningModule``) holding one as an attribute: every ``peft.tuners.lora.LoraLayer``
            found by ``named_modules()`` is used.
        adapter_name: which adapter; None means the active one (an error if several are active).

    Returns:
        ``{(layer, projection): LoRAFactors}``, sorted by key. The tensors are the live
        parameters (``layer.lora_A[name].weight`` itself, row-block views of ``lora_B`` for a
        fused ``c_attn``, a (d, k) view of the base weight), never copies: copy them before
        the optimizer steps if a snapshot is needed. Embedding, convolution and
        MultiheadAttention LoRA layers are skipped with a warning.

    Raises:
        LoRAMonitorError: no LoRA layers (or they were merged and unloaded); the adapter is
            merged into the base weights; ``adapter_name`` unknown; several adapters active.
    """
    layers = _lora_layers(model)
    if not layers:
        raise _no_lora_error(model)
    name = _resolve_adapter(layers, adapter_name)

    entries: list[_Entry] = []
    skipped: list[str] = []
    for module_name, layer in layers:
        if name not in _adapters_of(layer):
            continue  # this adapter does not target this module
        if name in getattr(layer, "merged_adapters", ()):
            raise LoRAMonitorError(
                f"adapter {name!r} is merged into the base weights of {module_name} (peft "
                f"merge_adapter() / merge()): W₀ now holds W₀ + ΔW, counting ΔW twice; "
                f"call model.unmerge_adapter() before monitoring, or analyse the saved adapter "
                f"with lora_monitor.adapters.load_adapter(path)"
            )
        reason = _skip_reason(layer, name)
        if reason is not None:
            skipped.append(f"{module_name} ({reason})")
            continue
        A = layer.lora_A[name].weight
        B = layer.lora_B[name].weight
        entries.append(
            _Entry(
                module_name=module_name,
                projection=_projection_name(module_name),
                lora_A=A,
                lora_B=B,
                scaling=float(layer.scaling[name]),
                base_weight=_base_weight(layer, B.shape[0], A.shape[1]),
            )
        )
    if skipped:
        warnings.warn(
            f"lora_monitor: skipped LoRA layers that are not plain Linear factors: "
            f"{', '.join(skipped)}",
            stacklevel=2,
        )
    if not entries:
        raise LoRAMonitorError(
            f"adapter {name!r} of {type(model).__name__} has no plain Linear LoRA layers "
            f"(skipped: {', '.join(skipped) or 'none'}); target Linear modules such as "
            f"q_proj/v_proj in LoraConfig(target_modules=...)"
        )
    return _assemble(entries)


# --------------------------------------------------------------------------------------------
# Saved adapters


@dataclass
class SavedAdapter:
    """An adapter read from a ``save_pretrained`` directory, without its base model.

    Attributes:
        path: the adapter directory.
        config: the contents of ``adapter_config.json``.
        factors: ``{(layer, projection): LoRAFactors}`` with ``base_weight=None``.
    """

    path: Path
    config: dict
    factors: dict[ModuleKey, LoRAFactors]


_SAVED_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern matching the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


def _read_tensors(file: Path) -> dict[str, Tensor]:
    if file.stat().st_size == 0:
        raise LoRAMonitorError(
            f"adapter weights file {file} is empty (an interrupted save?); save the adapter "
            f"again with model.save_pretrained(...)"
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoRAMonitorError(
            f"cannot read adapter weights file {file}: {type(exc).__name__}: {exc}; the file is "
            f"corrupt or truncated, save the adapter again with model.save_pretrained(...)"
        ) from exc
    if not isinstance(tensors, Mapping):
        raise LoRAMonitorError(
            f"adapter weights file {file} holds a {type(tensors).__name__}, not a state dict of "
            f"tensors; expected the file written by peft's save_pretrained"
        )
    return dict(tensors)


def load_adapter(path: str | os.PathLike) -> SavedAdapter:
    """Read the LoRA factors of an adapter saved by peft's ``save_pretrained``.

    No base model is loaded: only ``adapter_config.json`` and ``adapter_model.safetensors``
    (or ``adapter_model.bin`` when there is no safetensors file). The scaling of each module
    follows peft: ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), ``r`` and
    ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` where a pattern matches the
    module path. Keys and the split of GPT-2's fused ``c_attn`` are the same as
    :func:`find_lora_factors` gives for the live model.

    Args:
        path: the adapter directory (a file inside it is accepted too).

    Raises:
        LoRAMonitorError: missing directory, not a peft adapter directory, not a LoRA adapter,
            an empty or corrupt weights file, inconsistent factors.
    """
    path = Path(path)
    if path.is_file() and path.name.startswith(("adapter_config", "adapter_model")):
        path = path.parent
    if not path.exists():
        raise LoRAMonitorError(
            f"adapter directory not found: {path}; pass the directory given to "
            f"model.save_pretrained(...)"
        )
    if not path.is_dir():
        raise LoRAMonitorError(
            f"{path} is a file, not an adapter directory; pass the directory given to "
            f"model.save_pretrained(...)"
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        nested = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
        hint = (
            f"; adapters saved in its subdirectories (peft saves non-default adapters under "
            f"their name): {nested}"
            if nested
            else ""
        )
        raise LoRAMonitorError(
            f"not a peft adapter directory: {path} has no adapter_config.json; expected "
            f"adapter_config.json and adapter_model.safetensors written by save_pretrained{hint}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise LoRAMonitorError(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise LoRAMonitorError(f"{config_file} holds a {type(config).__name__}, not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LoRAMonitorError(
            f"{config_file} has peft_type {config.get('peft_type')!r}, not 'LORA': lora_monitor "
            f"analyses LoRA adapters only"
        )

    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        weights_file = path / "adapter_model.bin"
    if not weights_file.is_file():
        raise LoRAMonitorError(
            f"{path} has adapter_config.json but no adapter_model.safetensors nor "
            f"adapter_model.bin; save the adapter again with model.save_pretrained(...)"
        )
    tensors = _read_tensors(weights_file)

    pairs: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        match = _SAVED_KEY.match(key)
        if match is not None and isinstance(tensor, Tensor):
            pairs[match["module"]][match["ab"]] = tensor

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    entries: list[_Entry] = []
    for module_name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise LoRAMonitorError(
                f"{weights_file} holds one factor of module {module_name} but not its {missing}; "
                f"the file is incomplete, save the adapter again"
            )
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2:
            continue  # convolution LoRA: not a Linear update
        if B.shape[1] != A.shape[0]:
            raise LoRAMonitorError(
                f"module {module_name} in {weights_file}: lora_A is {tuple(A.shape)} and lora_B "
                f"is {tuple(B.shape)}; their ranks disagree, the file is corrupt"
            )
        relative = module_name
        if relative.startswith(_PEFT_PREFIX):
            relative = relative[len(_PEFT_PREFIX) :]
        r = _pattern_value(rank_pattern, relative, config.get("r", 8))
        alpha = _pattern_value(alpha_pattern, relative, config.get("lora_alpha", 8))
        if int(r) != A.shape[0]:
            raise LoRAMonitorError(
                f"{config_file} gives rank r={r} to module {module_name} but its lora_A in "
                f"{weights_file} has {A.shape[0]} rows; the config and the weights do not belong "
                f"together"
            )
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        entries.append(
            _Entry(
                module_name=module_name,
                projection=_projection_name(module_name),
                lora_A=A,
                lora_B=B,
                scaling=float(scaling),
                base_weight=None,
            )
        )
    if not entries:
        raise LoRAMonitorError(
            f"{weights_file} holds no Linear LoRA factors (keys ending in lora_A.weight / "
            f"lora_B.weight); found {len(tensors)} other tensors"
        )
    return SavedAdapter(path=path, config=config, factors=_assemble(entries))


# --------------------------------------------------------------------------------------------
# Selection and compatibility


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
        unmatched = [
            t for t in target_modules if not any(_entry_matches(t, f) for f in factors.values())
        ]
        if unmatched:
            raise LoRAMonitorError(
                f"target_modules {unmatched} match no LoRA module; available: "
                f"{_describe(factors)}"
            )
    if layers is not None:
        present = {f.layer for f in factors.values()}
        unmatched_layers = [layer for layer in layers if layer not in present]
        if unmatched_layers:
            raise LoRAMonitorError(
                f"layers {unmatched_layers} have no LoRA module; available: {_describe(factors)}"
            )
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
        raise LoRAMonitorError(
            f"unknown basis {basis!r}; expected one of {', '.join(map(repr, _BASIS_SIDE))}"
        )
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
