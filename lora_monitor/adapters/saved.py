"""Adapters saved by peft's ``save_pretrained``, read without their base model."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lora_monitor.adapters.factors import (
    PEFT_PREFIX,
    LoRAFactors,
    LoRAMonitorError,
    ModuleKey,
    _assemble,
    _Entry,
)
from lora_monitor.adapters.fused import split_entry
from lora_monitor.adapters.variants import initialization_in_base


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
#: DoRA's magnitude vector m, as peft saves it.
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern matching the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


#: safetensors' names of floating dtypes, for the meta tensors of modules left unread.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _saved_module(key: str) -> Optional[str]:
    """The module path a saved tensor belongs to (its factor or DoRA magnitude), else None."""
    match = _SAVED_KEY.match(key) or _MAGNITUDE_KEY.match(key)
    return match["module"] if match is not None else None


def _read_safetensors(file: Path, modules: Optional[Collection[str]]) -> dict[str, Tensor]:
    """The file's tensors; with ``modules``, the other modules' tensors are meta tensors of
    their shape, from the file's header alone (no data is read for them)."""
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            if modules is None or _saved_module(key) in modules:
                tensors[key] = f.get_tensor(key)
            else:
                header = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(header.get_dtype(), torch.float32)
                tensors[key] = torch.empty(header.get_shape(), dtype=dtype, device="meta")
    return tensors


def _read_tensors(file: Path, modules: Optional[Collection[str]] = None) -> dict[str, Tensor]:
    if file.stat().st_size == 0:
        raise LoRAMonitorError(
            f"adapter weights file {file} is empty (an interrupted save?); save the adapter "
            f"again with model.save_pretrained(...)"
        )
    try:
        if file.suffix == ".safetensors":
            tensors = _read_safetensors(file, modules)
        else:  # a pickle cannot be read in parts: always whole
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


def _base_config(
    path: Path, config: Mapping[str, Any], base_config: Union[None, Mapping[str, Any], str, os.PathLike]
) -> Optional[dict[str, Any]]:
    """The base model's transformers config: given, or a ``config.json`` beside the adapter or
    in a local ``base_model_name_or_path`` directory; None if none is found."""
    if isinstance(base_config, Mapping):
        return dict(base_config)
    candidates = [Path(base_config)] if base_config is not None else []
    if base_config is None:
        candidates.append(path / "config.json")
        base = config.get("base_model_name_or_path")
        if isinstance(base, str) and base:
            candidates.append(Path(base) / "config.json")
    for candidate in candidates:
        file = candidate / "config.json" if candidate.is_dir() else candidate
        if file.is_file():
            try:
                return json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise LoRAMonitorError(f"cannot read the base model's config {file}: {exc}") from exc
        if base_config is not None:
            raise LoRAMonitorError(f"base model config not found: {candidate}; pass its config.json")
    return None


@dataclass
class SavedModule:
    """One LoRA module of a saved adapter, as peft applies it: ΔW = scaling · B @ A."""

    module_name: str
    lora_A: Tensor
    lora_B: Tensor
    r: int
    alpha: float
    scaling: float
    magnitude: Optional[Tensor] = None


@dataclass
class SavedModules:
    """What a ``save_pretrained`` directory holds: its config, every tensor of its weights
    file (by key), and its Linear LoRA modules."""

    path: Path
    config: dict
    weights_file: Path
    tensors: dict[str, Tensor]
    modules: list[SavedModule]


def read_saved_modules(path: str | os.PathLike, modules: Optional[Collection[str]] = None) -> SavedModules:
    """Read and check an adapter directory (see :func:`load_adapter`, whose ``modules`` this
    takes); the modules are as saved, a fused q|k|v module whole.

    Raises:
        LoRAMonitorError: as :func:`load_adapter`.
    """
    path = Path(path)
    if path.is_file() and path.name.startswith(("adapter_config", "adapter_model")):
        path = path.parent
    if not path.exists():
        raise LoRAMonitorError(
            f"adapter directory not found: {path}; pass the directory given to model.save_pretrained(...)"
        )
    if not path.is_dir():
        raise LoRAMonitorError(
            f"{path} is a file, not an adapter directory; pass the directory given to model.save_pretrained(...)"
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        nested = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
        hint = (
            f"; adapters saved in its subdirectories (peft saves non-default adapters under their name): {nested}"
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
    if peft_type == "ADALORA":
        # Its update B·(E ⊙ A)·α/(ranknum + ε) uses each layer's ranknum, which peft does not
        # save, and its factors are resized by the pruning's rank_pattern: the loaded model
        # has both as peft applies them.
        raise LoRAMonitorError(
            f"{config_file} is an AdaLoRA adapter: lora_monitor does not read saved AdaLoRA "
            f"adapters (their update B·(E ⊙ A)·α/(ranknum + ε) uses each layer's ranknum, which "
            f"is not saved). Load "
            f"it into its base model (peft.PeftModel.from_pretrained(base, {str(path)!r})) and "
            f"analyze the live model: lora_monitor.adapters.find_lora_factors(model), or the "
            f"monitor during training"
        )
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
    tensors = _read_tensors(weights_file, modules)

    pairs: dict[str, dict[str, Tensor]] = defaultdict(dict)
    magnitudes: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        match = _SAVED_KEY.match(key)
        if match is not None and isinstance(tensor, Tensor):
            pairs[match["module"]][match["ab"]] = tensor
        magnitude = _MAGNITUDE_KEY.match(key)
        if magnitude is not None and isinstance(tensor, Tensor):
            magnitudes[magnitude["module"]] = tensor.reshape(-1)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    saved: list[SavedModule] = []
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
        if relative.startswith(PEFT_PREFIX):
            relative = relative[len(PEFT_PREFIX) :]
        r = _pattern_value(rank_pattern, relative, config.get("r", 8))
        alpha = _pattern_value(alpha_pattern, relative, config.get("lora_alpha", 8))
        if int(r) != A.shape[0]:
            raise LoRAMonitorError(
                f"{config_file} gives rank r={r} to module {module_name} but its lora_A in "
                f"{weights_file} has {A.shape[0]} rows; the config and the weights do not belong "
                f"together"
            )
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        saved.append(SavedModule(module_name, A, B, int(r), float(alpha), float(scaling), magnitudes.get(module_name)))
    if not saved:
        raise LoRAMonitorError(
            f"{weights_file} holds no Linear LoRA factors (keys ending in lora_A.weight / "
            f"lora_B.weight); found {len(tensors)} other tensors"
        )
    return SavedModules(path, config, weights_file, tensors, saved)


def load_adapter(
    path: str | os.PathLike,
    base_config: Union[None, Mapping[str, Any], str, os.PathLike] = None,
    *,
    modules: Optional[Collection[str]] = None,
) -> SavedAdapter:
    """Read the LoRA factors of an adapter saved by peft's ``save_pretrained``.

    No base model is loaded: only ``adapter_config.json`` and ``adapter_model.safetensors``
    (or ``adapter_model.bin`` when there is no safetensors file). The scaling of each module
    follows peft: ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), ``r`` and
    ``lora_alpha`` taken from ``rank_pattern`` / ``alpha_pattern`` where a pattern matches the
    module path. Keys and the split of fused q|k|v modules are the same as
    :func:`find_lora_factors` gives for the live model where the layout is known without the
    base model (GPT-2's ``c_attn``, GPT-BigCode's multi-query ``c_attn``) or from its config;
    other fused modules are kept whole, with a warning saying why.

    Without the base model, W₀ is unknown: for a DoRA adapter (its magnitude vector is read)
    and for one initialized by PiSSA/OLoRA/CorDA/LoftQ (whose initial factors were moved out
    of W₀ and are not saved), the factors alone do not give the update the model applies, and
    the analysis says so instead of reading s·B·A as ΔW.

    Args:
        path: the adapter directory (a file inside it is accepted too).
        base_config: the base model's transformers config (a mapping, or the path of its
            ``config.json`` or of its directory), to split fused q|k|v modules; default a
            ``config.json`` beside the adapter or in ``base_model_name_or_path``.
        modules: the module paths (:attr:`LoRAFactors.module_name`) whose tensors are read;
            the other modules' factors are meta tensors of their shapes, from the safetensors
            header alone, so that keys, ranks and shapes are those of the whole adapter while
            only part of it is in memory (the CLI streams an adapter this way). None: all. An
            ``adapter_model.bin`` is always read whole.

    Raises:
        LoRAMonitorError: missing directory, not a peft adapter directory, not a LoRA adapter,
            an empty or corrupt weights file, inconsistent factors.
    """
    saved = read_saved_modules(path, modules)
    model_config = _base_config(saved.path, saved.config, base_config)
    initial_in_base = initialization_in_base(saved.config)
    fan_in_fan_out = bool(saved.config.get("fan_in_fan_out", False))
    entries: list[_Entry] = []
    for module in saved.modules:
        entry = _Entry(
            module_name=module.module_name,
            lora_A=module.lora_A,
            lora_B=module.lora_B,
            scaling=module.scaling,
            base_weight=None,
            magnitude=module.magnitude,
            initial_in_base=initial_in_base,
        )
        entries.extend(split_entry(entry, model_config, fan_in_fan_out))
    return SavedAdapter(path=saved.path, config=saved.config, factors=_assemble(entries))
