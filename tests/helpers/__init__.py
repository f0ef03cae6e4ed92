"""What the tests share, imported as ``from tests.helpers.models import tiny_llama_lora``.

- :mod:`~tests.helpers.models` — every tiny transformers model built one way
  (:func:`~tests.helpers.models.from_config`), the one Llama builder, LoRA added by one
  function with its seeds, and finding a model's LoRA layers;
- :mod:`~tests.helpers.architectures` — the architecture matrix (fused and separate q|k|v,
  encoder-decoders, encoders, ViT), its training samples and the probe of fused rows;
- :mod:`~tests.helpers.factors` — random :class:`~lora_monitor.adapters.LoRAFactors` without peft;
- :mod:`~tests.helpers.dense` — independent dense references: ΔW from peft's own
  ``get_delta_weight``, full SVDs, φ by its definition;
- :mod:`~tests.helpers.linalg` — random matrices of known structure for the maths tests;
- :mod:`~tests.helpers.events` — reading TensorBoard event files back;
- :mod:`~tests.helpers.lightning` — a Lightning module and a quiet CPU ``Trainer``;
- :mod:`~tests.helpers.data` — the MiniLM tokenizer, a token data set and the transformers
  ``TrainingArguments`` of the front-end tests;
- :mod:`~tests.helpers.distributed` — an engine that records which modules each rank analyzed.

Nothing here imports Lightning or transformers on import, except :mod:`~tests.helpers.lightning`:
a subprocess that must not load Lightning can import the others.
"""
