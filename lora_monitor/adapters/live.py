"""The LoRA factors of a live model: a ``PeftModel``, or any module holding peft LoRA layers."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from lora_monitor.adapters.factors import (
    LoRAFactors,
    LoRAMonitorError,
    ModuleKey,
    _assemble,
    _Entry,
    is_partitioned,
)
from lora_monitor.adapters.fused import split_entry
from lora_monitor.adapters.variants import (
    base_weight_of,
    initialization_in_base,
    is_adalora,
    model_config,
    peft_configs,
    read_factors,
    skip_reason,
    stores_transposed,
)


def _lora_layer_class() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    lora_layer = _lora_layer_class()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer)]


def _partitioned_factors(layer: Any, name: str) -> bool:
    """Whether adapter ``name``'s factors in ``layer`` are DeepSpeed ZeRO-3 partitions, not
    gathered: their data is empty on every rank (shape ``(0,)``) until gathered."""
    # AdaLoRA's factors are parameters, LoRA's Linear modules holding one.
    factors = [factors[name] for factors in (layer.lora_A, layer.lora_B) if name in factors]
    return any(is_partitioned(getattr(factor, "weight", factor)) for factor in factors)


def _partitioned_error(modules: list[str]) -> LoRAMonitorError:
    named = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
    return LoRAMonitorError(
        f"the LoRA factors of {named} are DeepSpeed ZeRO-3 partitions (parameters "
        f"with ds_id and ds_shape, their data empty on each rank), not gathered: the LoraConfig "
        f"is fine, but lora_monitor reads whole factors only. Pass the model to LoRAMonitor on "
        f"every rank in the process that ran deepspeed.initialize (LoRAMonitor(engine.module, ...)), "
        f"or read its factors inside deepspeed.zero.GatheredParameters(params, modifier_rank=None), "
        f"entered on every rank"
    )


def _partitioned_base(layer: Any, out_features: int, in_features: int) -> Optional[torch.Tensor]:
    """W₀ of a LoRA layer as ZeRO-3 leaves it: the partitioned parameter itself, each rank's
    share of its numbers read from its own partition, W₀ never gathered
    (:func:`~lora_monitor.engine.distributed.sharded_base_results`). Only a weight stored in
    the (d, k) orientation: a flat run of a transposed (Conv1D) weight crosses its columns."""
    weight = getattr(layer.get_base_layer(), "weight", None)
    shape = tuple(getattr(weight, "ds_shape", ()))
    if is_partitioned(weight) and not stores_transposed(layer) and shape == (out_features, in_features):
        return weight
    return None


def _adapters_of(layer: Any) -> set[str]:
    names = set(layer.lora_A.keys())
    names.update(getattr(layer, "lora_embedding_A", {}).keys())
    return names


def _no_lora_error(model: torch.nn.Module) -> LoRAMonitorError:
    cls = type(model).__name__
    config = peft_configs(model)
    if config:
        types = {str(getattr(c, "peft_type", "?")).rsplit(".", 1)[-1] for c in config.values()}
        if types - {"LORA", "ADALORA"}:
            return LoRAMonitorError(
                f"{cls} is a peft model of type {sorted(types)}, not LoRA: lora_monitor analyses "
                f"LoRA factors (lora_A, lora_B) only, of peft.LoraConfig (with DoRA, rsLoRA, "
                f"PiSSA/OLoRA/CorDA/LoftQ initializations, 4/8-bit base weights) and "
                f"peft.AdaLoraConfig; {sorted(types)} updates are not s·B·A"
            )
        return LoRAMonitorError(
            f"{cls} has a peft LoRA configuration ({sorted(config)}) but no LoRA layers left: "
            f"the adapter was merged and unloaded (merge_and_unload() / unload()) or deleted, so "
            f"ΔW is no longer separate from the base weights. Monitor the model before merging, "
            f"or analyze the saved adapter with lora_monitor.adapters.load_adapter(path)"
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
                f"adapter {adapter_name!r} not found in the model's LoRA layers; adapters present: {sorted(available)}"
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
        f"of them to choose which adapter to analyze"
    )


def plain_lora_layers(model: torch.nn.Module, adapter_name: Optional[str] = None) -> dict[str, tuple[Any, str]]:
    """The LoRA layers of ``model`` whose update is s·B·A exactly (LoRA, rsLoRA; not DoRA,
    AdaLoRA, a PiSSA-like initialization or another variant), by module path: ``(layer, the
    adapter's name)`` — what can be cut to fewer directions in place
    (:class:`~lora_monitor.adapters.truncation.LiveTruncation`)."""
    layers = _lora_layers(model)
    if not layers:
        raise _no_lora_error(model)
    name = _resolve_adapter(layers, adapter_name)
    partitioned = [module_name for module_name, layer in layers if _partitioned_factors(layer, name)]
    if partitioned:
        raise _partitioned_error(partitioned)
    config = peft_configs(model).get(name)
    if config is not None and initialization_in_base(config) is not None:
        return {}
    return {
        module_name: (layer, name)
        for module_name, layer in layers
        if name in layer.lora_A
        and skip_reason(layer, name) is None
        and not is_adalora(layer)
        and name not in getattr(layer, "lora_magnitude_vector", {})
    }


def find_lora_factors(model: torch.nn.Module, adapter_name: Optional[str] = None) -> dict[ModuleKey, LoRAFactors]:
    """The LoRA factors of every Linear LoRA layer of a live model, by (layer, projection).

    Args:
        model: a ``PeftModel``, a model with LoRA layers injected by peft, or any module (a
            ``LightningModule``) holding one as an attribute: every ``peft.tuners.lora.LoraLayer``
            found by ``named_modules()`` is used (AdaLoRA's layers are LoRA layers too).
        adapter_name: which adapter; None means the active one (an error if several are active).

    Returns:
        ``{(layer, projection): LoRAFactors}``, sorted by key. The tensors are the live
        parameters (``layer.lora_A[name].weight`` itself, row-block views of ``lora_B`` for a
        fused q|k|v module laid out in blocks, a (d, k) view of the base weight), never copies:
        copy them before the optimizer steps if a snapshot is needed. Exceptions: rows
        interleaved per head (Falcon, GPT-NeoX, BLOOM, GPT-BigCode without multi_query) are
        gathered copies of B's rows, and their W₀ is read when analyzed (``base_reader``), as
        is a quantized W₀; AdaLoRA's ``lora_A`` is the product E ⊙ A. Embedding, convolution,
        MultiheadAttention layers and LoRA variants whose update is not read (VeLoRA, ...) are
        skipped with a warning naming them.

    Raises:
        LoRAMonitorError: no LoRA layers (or they were merged and unloaded); the adapter is
            merged into the base weights; ``adapter_name`` unknown; several adapters active.
    """
    layers = _lora_layers(model)
    if not layers:
        raise _no_lora_error(model)
    name = _resolve_adapter(layers, adapter_name)
    peft_config = peft_configs(model).get(name)
    initial_in_base = initialization_in_base(peft_config) if peft_config is not None else None
    base_config = model_config(model)

    entries: list[_Entry] = []
    skipped: list[str] = []
    partitioned: list[str] = []
    for module_name, layer in layers:
        if name not in _adapters_of(layer):
            continue  # this adapter does not target this module
        if name in getattr(layer, "merged_adapters", ()):
            raise LoRAMonitorError(
                f"adapter {name!r} is merged into the base weights of {module_name} (peft "
                f"merge_adapter() / merge()): W₀ now holds W₀ + ΔW, counting ΔW twice; "
                f"call model.unmerge_adapter() before monitoring, or analyze the saved adapter "
                f"with lora_monitor.adapters.load_adapter(path)"
            )
        if _partitioned_factors(layer, name):
            partitioned.append(module_name)
            continue
        reason = skip_reason(layer, name)
        if reason is not None:
            skipped.append(f"{module_name} ({reason})")
            continue
        fields = read_factors(layer, name)
        d, k = fields["lora_B"].shape[0], fields["lora_A"].shape[1]
        base_weight, base_reader, base_quantization = base_weight_of(layer, d, k)
        if base_weight is None and base_reader is None:
            base_weight = _partitioned_base(layer, d, k)
        entry = _Entry(
            module_name=module_name,
            base_weight=base_weight,
            base_reader=base_reader,
            base_quantization=base_quantization,
            initial_in_base=initial_in_base,
            **fields,
        )
        entries.extend(split_entry(entry, base_config, stores_transposed(layer)))
    if partitioned:
        raise _partitioned_error(partitioned)
    if skipped:
        warnings.warn(
            f"lora_monitor: skipped LoRA layers that are not plain Linear factors: {', '.join(skipped)}",
            stacklevel=2,
        )
    if not entries:
        raise LoRAMonitorError(
            f"adapter {name!r} of {type(model).__name__} has no Linear LoRA layers lora_monitor "
            f"can read (skipped: {', '.join(skipped) or 'none'}); target Linear modules such as "
            f"q_proj/v_proj in LoraConfig(target_modules=...), with a variant it reads (plain, "
            f"rsLoRA, DoRA, AdaLoRA)"
        )
    return _assemble(entries)
