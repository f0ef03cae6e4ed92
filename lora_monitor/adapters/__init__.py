"""All of lora_monitor's knowledge of peft: where the LoRA factors of a model are, and what they
mean under each variant.

A live model (a ``PeftModel``, or any ``torch.nn.Module`` — a ``LightningModule`` — holding peft
LoRA layers anywhere inside it) or an adapter directory written by ``save_pretrained`` is turned
into one :class:`LoRAFactors` per (layer index, projection): peft's ``lora_A`` (r×k), ``lora_B``
(d×r) and ``scaling`` in the (out, in) orientation of ``torch.nn.Linear`` whatever the layer
type, with what a variant adds (DoRA's magnitude, AdaLoRA's E, a PiSSA-like initialization).

- :mod:`~lora_monitor.adapters.factors`: :class:`LoRAFactors`, module keys and naming;
- :mod:`~lora_monitor.adapters.live`: live models (:func:`find_lora_factors`);
- :mod:`~lora_monitor.adapters.saved`: saved adapters (:func:`load_adapter`);
- :mod:`~lora_monitor.adapters.fused`: the q|k|v rows of fused projections per architecture;
- :mod:`~lora_monitor.adapters.variants`: peft's LoRA variants, quantized base weights;
- :mod:`~lora_monitor.adapters.selection`: choosing modules, checking a reference.
"""

from lora_monitor.adapters.factors import LoRAFactors, LoRAMonitorError, ModuleKey, Rows, is_sharded, select_rows
from lora_monitor.adapters.fused import FusedSplit, fused_split
from lora_monitor.adapters.live import find_lora_factors, plain_lora_layers
from lora_monitor.adapters.saved import SavedAdapter, load_adapter
from lora_monitor.adapters.selection import check_reference_compatible, select_factors

__all__ = [
    "FusedSplit",
    "LoRAFactors",
    "LoRAMonitorError",
    "ModuleKey",
    "Rows",
    "SavedAdapter",
    "check_reference_compatible",
    "find_lora_factors",
    "is_sharded",
    "fused_split",
    "load_adapter",
    "plain_lora_layers",
    "select_rows",
    "select_factors",
]
