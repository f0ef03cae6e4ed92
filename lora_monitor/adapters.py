"""All of lora_monitor's knowledge of peft: where the LoRA factors of a model are.

A live model (a ``PeftModel``, or any ``torch.nn.Module`` — a ``LightningModule`` — holding peft
LoRA layers anywhere inside it) or an adapter directory written by ``save_pretrained``
(``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin``) is turned into
one :class:`LoRAFactors` per (layer index, projection): peft's ``lora_A`` (r×k), ``lora_B``
(d×r) and ``scaling``, so that ΔW = scaling · lora_B @ lora_A in the (out, in) orientation of
``torch.nn.Linear`` whatever the layer type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
