"""The framework-free engine: :class:`LoRAMonitor` and the pieces it ties together.

- :mod:`~lora_monitor.engine.options` — :class:`MonitorOptions`, validated on construction;
- :mod:`~lora_monitor.engine.references` — what each snapshot is compared with, resume state;
- :mod:`~lora_monitor.engine.runner` — where the analysis runs (training thread, spread over
  ranks, or a worker thread: :mod:`~lora_monitor.engine.background`);
- :mod:`~lora_monitor.engine.reporter` — outputs, warnings, strict mode, the console line;
- :mod:`~lora_monitor.engine.probe_runner` — the functional probe's batch, loss and schedule;
- :mod:`~lora_monitor.engine.distributed` — ranks (:class:`RankContext`) and sharded strategies;
- :mod:`~lora_monitor.engine.monitored` — what a monitor watches: the model, its modules, snapshots;
- :mod:`~lora_monitor.engine.monitor` — :class:`LoRAMonitor`, the lifecycle (attach, step,
  close).
"""

from lora_monitor.engine.monitor import LoRAMonitor
from lora_monitor.engine.monitored import default_layers
from lora_monitor.engine.options import MonitorKwargs, MonitorOptions, spells_out_options
from lora_monitor.engine.reporter import AnalysisWarning

__all__ = ["AnalysisWarning", "LoRAMonitor", "MonitorKwargs", "MonitorOptions", "default_layers", "spells_out_options"]
