"""Front-ends of the engine, one per framework, each importing its framework only when used:

- :mod:`lora_monitor.integrations.lightning` — :class:`LoRASubspaceMonitor`, a Lightning
  ``Callback``;
- :mod:`lora_monitor.integrations.transformers` — :class:`LoRASubspaceCallback`, a transformers
  ``TrainerCallback`` (``Trainer``, TRL's ``SFTTrainer``).
"""
