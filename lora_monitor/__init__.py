"""lora_monitor: the LoRA paper's Section 7 analysis, live, wherever LoRA trains.

Layout, from the maths up (each layer imports only those above it in this list):

- :mod:`lora_monitor.functional` — pure tensor maths (factored SVD, φ grids, spectra);
- :mod:`lora_monitor.adapters` — all peft knowledge: LoRA factors of a live model or a saved adapter;
- :mod:`lora_monitor.snapshots` — copies of the factors at a step and their batched analysis;
- :mod:`lora_monitor.recommend` — the rank suggested by an analysis;
- :mod:`lora_monitor.tags`, :mod:`lora_monitor.plots`, :mod:`lora_monitor.rendering`,
  :mod:`lora_monitor.outputs` — what is written (names, figures, drawn fast snapshot after
  snapshot) and where (TensorBoard, W&B, MLflow);
- :mod:`lora_monitor.config` — :class:`MonitorOptions`, the options every front-end validates with;
- :mod:`lora_monitor.engine` — :class:`LoRAMonitor`, the framework-free monitor (a plain loop
  uses it directly);
- :mod:`lora_monitor.integrations` — front-ends: :class:`LoRASubspaceMonitor` (Lightning),
  :class:`LoRASubspaceCallback` (transformers ``Trainer``, TRL);
- :mod:`lora_monitor.cli` — ``lora-monitor compare|inspect`` on saved adapters.

Importing the package costs nothing: each name below loads its module (and its framework)
on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "AnalysisWarning": "lora_monitor.engine",
    "LoRAMonitor": "lora_monitor.engine",
    "MonitorOptions": "lora_monitor.config",
    "LoRAFactors": "lora_monitor.adapters",
    "LoRAMonitorError": "lora_monitor.adapters",
    "LoRASubspaceMonitor": "lora_monitor.integrations.lightning",
    "LoRASubspaceCallback": "lora_monitor.integrations.transformers",
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
