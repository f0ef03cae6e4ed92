"""lora_monitor: the LoRA paper's Section 7 analysis, live, wherever LoRA trains.

Layers, from the maths up; each imports only those above it in this list (a test checks it):

- :mod:`lora_monitor.functional` — pure tensor maths: factored SVD, φ grids, spectra;
- :mod:`lora_monitor.adapters` — all peft knowledge: the LoRA factors of a live model or of a
  saved adapter, under every variant and architecture;
- :mod:`lora_monitor.analysis` — snapshots of the factors, their batched analysis, the rank
  they suggest;
- :mod:`lora_monitor.outputs` — what is written (tag names, report text, figures) and the
  writers (TensorBoard, W&B, MLflow);
- :mod:`lora_monitor.engine` — :class:`LoRAMonitor`, the framework-free monitor (a plain
  loop uses it directly), with its options, references, runner and reporter;
- :mod:`lora_monitor.integrations` — front-ends: :class:`LoRASubspaceMonitor` (Lightning),
  :class:`LoRASubspaceCallback` (transformers ``Trainer``, TRL), :class:`LoRAAcceleratorMonitor`
  (an ``accelerate`` loop);
- :mod:`lora_monitor.cli` — ``lora-monitor`` on adapters saved on disk.

Importing the package costs nothing: each name below loads its module (and its framework)
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "AnalysisWarning": "lora_monitor.engine",
    "LoRAMonitor": "lora_monitor.engine",
    "MonitorOptions": "lora_monitor.engine",
    "LoRAFactors": "lora_monitor.adapters",
    "LoRAMonitorError": "lora_monitor.adapters",
    "LoRASubspaceMonitor": "lora_monitor.integrations.lightning",
    "LoRASubspaceCallback": "lora_monitor.integrations.transformers",
    "LoRAAcceleratorMonitor": "lora_monitor.integrations.accelerate",
    "factored_svd": "lora_monitor.functional",
    "singular_basis": "lora_monitor.functional",
    "subspace_similarity": "lora_monitor.functional",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
