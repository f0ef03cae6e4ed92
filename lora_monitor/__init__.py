"""lora_monitor: the LoRA paper's Section 7 analysis, live, as a Lightning callback.

Layout, from the maths up:

- :mod:`lora_monitor.functional` — pure tensor maths (factored SVD, φ grids, spectra);
- :mod:`lora_monitor.adapters` — all peft knowledge: LoRA factors of a live model or a saved adapter;
- :mod:`lora_monitor.snapshots` — copies of the factors at a step and their batched analysis;
- :mod:`lora_monitor.plots` — heatmap figures;
- :mod:`lora_monitor.callback` — :class:`LoRASubspaceMonitor`, the Lightning/TensorBoard side.
"""

from lora_monitor.adapters import LoRAFactors, LoRAMonitorError
from lora_monitor.callback import AnalysisWarning, LoRASubspaceMonitor
from lora_monitor.functional import factored_svd, singular_basis, subspace_similarity

__all__ = [
    "AnalysisWarning",
    "LoRAFactors",
    "LoRAMonitorError",
    "LoRASubspaceMonitor",
    "factored_svd",
    "singular_basis",
    "subspace_similarity",
]
