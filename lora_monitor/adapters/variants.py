"""peft's LoRA variants in a live model: what each layer's adapter is, and how to read it.

Accepted, each read so that the analysis computes the update the model applies:

- plain LoRA and rsLoRA: ΔW = s·B·A;
- DoRA (``use_dora=True``): the magnitude vector m is read as well (see ``docs/maths.md``);
- AdaLoRA (peft's ``AdaLoraConfig``): E is folded into A and ranknum into s, so that
  ΔW = s/(ranknum + 1e-5)·B·(E ⊙ A) is again a product of factors;
- initializations that move s·B₀·A₀ out of the base weight (PiSSA, OLoRA, CorDA, LoftQ):
  marked, so that the analysis subtracts the initial factors;
- W₀ stored by bitsandbytes in 4 or 8 bits (QLoRA): read through peft's dequantization, one
  module at a time.

Anything else peft calls a LoRA variant (VeLoRA, activated LoRA, Arrow, QALoRA, block-diagonal
LoRA, MonteCLoRA, MiCA, KaSA, ...) changes what the layer computes from B and A: such layers are
skipped with a warning naming the variant, never read as s·B·A.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from lora_monitor.adapters.factors import Rows, is_sharded

#: ``init_lora_weights`` values (prefixes: ``pissa_niter_16``) whose initialization subtracts
#: s·B₀·A₀ from the base weight.
INITIALIZATIONS_IN_BASE = ("pissa", "olora", "corda", "loftq")

#: peft's LoraVariant classes whose update lora_monitor reads (DoRA's magnitude is read apart).
_ACCEPTED_VARIANTS = ("DoraLinearVariant",)


def is_adalora(layer: Any) -> bool:
    return hasattr(layer, "lora_E") and hasattr(layer, "ranknum")


def _is_conv1d(module: torch.nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2), whose weight is stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def stores_transposed(layer: Any) -> bool:
    """True when the base layer's weight is (in, out): ``fan_in_fan_out`` or a ``Conv1D``."""
    return bool(getattr(layer, "fan_in_fan_out", False)) or _is_conv1d(layer.get_base_layer())


def skip_reason(layer: Any, name: str) -> Optional[str]:
    """Why the factors of adapter ``name`` in ``layer`` are not an update lora_monitor reads."""
    if name in getattr(layer, "lora_embedding_A", {}):
        return "Embedding LoRA"
    if isinstance(layer.get_base_layer(), torch.nn.MultiheadAttention):
        return "MultiheadAttention LoRA"
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and type(variant).__name__ not in _ACCEPTED_VARIANTS:
        kind = type(variant).__name__.removesuffix("Variant")
        return f"peft LoRA variant {kind}: its update is not s·B·A and lora_monitor does not read it"
    if is_adalora(layer):
        A, B = layer.lora_A[name], layer.lora_B[name]
    else:
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        if not (isinstance(lora_A, torch.nn.Linear) and isinstance(lora_B, torch.nn.Linear)):
            return f"{type(lora_A).__name__} factors (not Linear)"
        A, B = lora_A.weight, lora_B.weight
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        return f"factor shapes A {tuple(A.shape)}, B {tuple(B.shape)}"
    return None


def read_factors(layer: Any, name: str) -> dict[str, Any]:
    """``lora_A``, ``lora_B``, ``scaling`` and the variant's extra tensors of one adapter, as the
    fields of :class:`~lora_monitor.adapters.LoRAFactors` (live parameters where they are
    parameters: AdaLoRA's E ⊙ A is a fresh product)."""
    scaling = float(layer.scaling[name])
    if is_adalora(layer):
        E = layer.lora_E[name]
        # peft: B @ (A * E) * scaling / (ranknum + 1e-5); ranknum is fixed at r, not trained.
        return {
            "lora_A": layer.lora_A[name].detach() * E.detach(),
            "lora_B": layer.lora_B[name],
            "scaling": scaling / (float(layer.ranknum[name]) + 1e-5),
            "lora_E": E.view(-1),
        }
    magnitude = None
    if name in getattr(layer, "lora_magnitude_vector", {}):
        magnitude = layer.lora_magnitude_vector[name].weight.view(-1)
    return {
        "lora_A": layer.lora_A[name].weight,
        "lora_B": layer.lora_B[name].weight,
        "scaling": scaling,
        "magnitude": magnitude,
    }


def _dequantized(base: torch.nn.Module, transpose: bool, rows: Optional[Rows]) -> Tensor:
    from peft.utils.integrations import dequantize_module_weight

    with torch.no_grad():
        weight: Tensor = dequantize_module_weight(base)
    weight = weight.T if transpose else weight
    if rows is None:
        return weight
    return weight[rows] if isinstance(rows, slice) else weight.index_select(0, rows.to(weight.device))


def is_quantized(weight: Any) -> bool:
    """bitsandbytes' 4-bit (``Params4bit``) and 8-bit (``Int8Params``) storage."""
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def base_weight_of(
    layer: Any, out_features: int, in_features: int
) -> tuple[Optional[Tensor], Optional[Callable[[Optional[Rows]], Tensor]], Optional[Any]]:
    """W₀ of a LoRA layer: ``(a (d, k) view, None, None)``, or ``(None, a reader of the rows
    asked for, None)`` for quantized storage, or ``(packed bytes, None, its quantization
    state)`` for 4-bit storage sharded across processes (QLoRA with FSDP2: each rank reads its
    own shard, :func:`dequantize_4bit_shard`), or ``(None, None, None)`` where it cannot be
    read as a matrix."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    transpose = stores_transposed(layer)
    state = getattr(base, "quant_state", None)
    if is_sharded(weight) and state is not None and type(base).__name__ == "Linear4bit":
        return weight, None, state
    if is_quantized(weight):
        return None, lambda rows: _dequantized(base, transpose, rows), None
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        return None, None, None
    if transpose:
        weight = weight.T
    if tuple(weight.shape) != (out_features, in_features):
        return None, None, None  # storage that is no (d, k) matrix (8-bit sharded, ...)
    return weight, None, None


def dequantize_4bit_shard(packed: Tensor, element_offset: int, state: Any) -> tuple[Tensor, int]:
    """This rank's values of a bitsandbytes 4-bit W₀ whose packed storage FSDP2 shards:
    ``(values (float32), the flat row-major (d, k) index of the first)``.

    ``packed`` is the local shard of the packed storage (any storage dtype), ``element_offset``
    its first element's index in the whole storage. bitsandbytes' layout (its default backend's
    ``_dequantize_4bit_compute``): byte i holds value 2i in its high nibble and 2i + 1 in its
    low one; value v is ``code[nibble]·absmax[v // blocksize]``, the absmax dequantized first
    under double quantization; values are rounded to the state's dtype as bitsandbytes does.
    """
    raw = packed.contiguous().view(torch.uint8).reshape(-1)
    first = 2 * element_offset * packed.element_size()
    nibbles = torch.stack([raw >> 4, raw & 0xF], dim=-1).reshape(-1).long()
    count = max(0, min(nibbles.numel(), math.prod(state.shape) - first))  # the last byte may pad
    absmax = state.absmax
    if state.nested:
        import bitsandbytes.functional as bnb_functional

        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    blocks = torch.arange(first, first + count, device=raw.device) // state.blocksize
    values = state.code.float()[nibbles[:count]] * absmax.float()[blocks]
    return values.to(state.dtype).float(), first


def peft_configs(model: torch.nn.Module) -> Mapping[str, Any]:
    """The ``peft_config`` mapping (adapter name → config) of the first module holding one."""
    for module in model.modules():
        config = getattr(module, "peft_config", None)
        if isinstance(config, Mapping) and config:
            return config
    return {}


def initialization_in_base(config: Any) -> Optional[str]:
    """The ``init_lora_weights`` of a peft config when it moved s·B₀·A₀ out of the base weight."""
    init = getattr(config, "init_lora_weights", None)
    if isinstance(config, Mapping):
        init = config.get("init_lora_weights")
    if isinstance(init, str):
        for name in INITIALIZATIONS_IN_BASE:
            if init.lower().startswith(name):
                return name
    return None


def model_config(model: torch.nn.Module) -> Optional[dict[str, Any]]:
    """The transformers config of the base model inside ``model``, as a dict (None if none)."""
    for module in model.modules():
        config: Any = getattr(module, "config", None)
        if hasattr(config, "to_dict") and hasattr(config, "model_type"):
            return config.to_dict()
    return None
