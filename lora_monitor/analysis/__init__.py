"""Snapshots of the LoRA factors, their analysis, and the rank they suggest.

- :mod:`~lora_monitor.analysis.snapshot` — :class:`Snapshot`: copies of the factors at a step;
- :mod:`~lora_monitor.analysis.update_factors` — which factors carry the update each peft variant
  applies;
- :mod:`~lora_monitor.analysis.device` — the batched work on the model's device;
- :mod:`~lora_monitor.analysis.results` — :class:`ModuleAnalysis`, per module on the host;
- :mod:`~lora_monitor.analysis.snapshot_analysis` — :func:`analyze`, the three steps together;
- :mod:`~lora_monitor.analysis.rank` — the LoRA rank an analysis suggests, with its evidence.
"""

from lora_monitor.analysis.device import ReferenceBases
from lora_monitor.analysis.results import ModuleAnalysis, new_notes
from lora_monitor.analysis.snapshot import Snapshot, group_by_shape
from lora_monitor.analysis.snapshot_analysis import analyze
from lora_monitor.analysis.update_factors import missing_initial_note, shares_lora_A, with_base_weights

__all__ = [
    "ModuleAnalysis",
    "ReferenceBases",
    "Snapshot",
    "analyze",
    "group_by_shape",
    "missing_initial_note",
    "new_notes",
    "shares_lora_A",
    "with_base_weights",
]
