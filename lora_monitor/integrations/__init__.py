"""Front-ends of the engine, one per framework, each importing its framework only when used:

- :mod:`lora_monitor.integrations.lightning` — :class:`LoRASubspaceMonitor`, a Lightning
  ``Callback``;
- :mod:`lora_monitor.integrations.transformers` — :class:`LoRASubspaceCallback`, a transformers
  ``TrainerCallback`` (``Trainer``, TRL's ``SFTTrainer``);
- :mod:`lora_monitor.integrations.accelerate` — :class:`LoRAAcceleratorMonitor`, the engine in
  a plain ``accelerate`` loop.

Each maps its framework's hooks onto the engine's front-end contract (the
:mod:`lora_monitor.engine.monitor` docstring) and uses nothing else of the engine; what each
reads back (``latest_analysis``, ``recommendation``) is :mod:`lora_monitor.integrations.engine_results`'.
"""
