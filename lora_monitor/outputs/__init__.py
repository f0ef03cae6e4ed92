"""What the monitor writes, and where: pure naming and text, figures, and the writers.

- :mod:`~lora_monitor.outputs.tags` — every tag and what it means (the tag reference);
- :mod:`~lora_monitor.outputs.rank_text` — the rank suggestion as text (console, Markdown);
- :mod:`~lora_monitor.outputs.plots` — the figures (matplotlib, loaded on first use);
- :mod:`~lora_monitor.outputs.rendering` — the figures drawn fast, snapshot after snapshot;
- :mod:`~lora_monitor.outputs.writers` — :class:`Output` and its TensorBoard, W&B and MLflow
  implementations (Lightning's loggers: ``lora_monitor.integrations.lightning_loggers``).
"""

from lora_monitor.outputs.writers import MLflowOutput, Output, SummaryWriterOutput, WandbOutput

__all__ = ["MLflowOutput", "Output", "SummaryWriterOutput", "WandbOutput"]
