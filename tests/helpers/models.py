"""Tiny random transformers models with peft LoRA, built from configs (no hub download).

Every model is built one way, :func:`from_config`; the Llama of every test (the LoRA factories,
the transformers front-end, the architecture matrix, QLoRA) is :func:`tiny_llama`. LoRA is added
by :func:`add_lora`, its factors drawn from a seed of their own.

The factories :func:`tiny_llama_lora`, :func:`tiny_gpt2_lora` and :func:`tiny_bert_lora` return a
``PeftModel`` whose base weights depend only on ``base_seed`` and the architecture, and whose
LoRA factors depend only on ``seed``: two calls that differ in ``seed`` share the base model, as
the paper's "two seeds" experiment needs. peft initializes lora_B to zero; with
``randomize_B=True`` (the default) B gets random values so that ΔW ≠ 0. The global torch RNG is
left untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # peft and transformers are imported on use: tests of the maths stay fast
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer

#: The short name of each projection module the tests target.
PROJECTIONS = {"q_proj": "q", "v_proj": "v"}


def from_config(config_class: str, model_class: str, **config: Any) -> torch.nn.Module:
    """``transformers.<model_class>(transformers.<config_class>(**config))``: random weights
    drawn from the global RNG (seed it, or fork it, around the call)."""
    import transformers

    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


def seeded(build: Callable[[], torch.nn.Module], seed: Optional[int]) -> torch.nn.Module:
    """``build()`` with its weights drawn from ``seed`` (the global RNG untouched), or from the
    caller's RNG where ``seed`` is None."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_llama(
    vocab_size: int = 64,
    *,
    hidden_size: int = 32,
    intermediate_size: Optional[int] = None,
    num_layers: int = 2,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 64,
    seed: Optional[int] = 0,
) -> torch.nn.Module:
    """A tiny random Llama causal LM: 4 attention heads and, by default, 2 key/value heads
    (grouped-query attention: v_proj and k_proj have ``hidden_size // 2`` outputs), an MLP of
    ``2 · hidden_size`` unless told otherwise, its weights from ``seed`` (see :func:`seeded`)."""
    config = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )
    return seeded(lambda: from_config("LlamaConfig", "LlamaForCausalLM", **config), seed)


def tiny_gpt2(seed: Optional[int] = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random GPT-2 LM head model (fused ``c_attn``, ``Conv1D`` layers): 2 layers of
    width 32, 4 heads, a vocabulary of 64; ``overrides`` go to ``GPT2Config``."""
    config = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    config.update(overrides)
    return seeded(lambda: from_config("GPT2Config", "GPT2LMHeadModel", **config), seed)


def tiny_bert(seed: Optional[int] = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random BERT sequence classifier: 2 layers of width 32, 4 heads, 2 labels;
    ``overrides`` go to ``BertConfig``."""
    hidden_size = overrides.pop("hidden_size", 32)
    config = dict(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        vocab_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    config.update(overrides)
    return seeded(lambda: from_config("BertConfig", "BertForSequenceClassification", **config), seed)


def add_lora(base: torch.nn.Module, config: PeftConfig, seed: int) -> PeftModel:
    """``get_peft_model(base, config)``, the LoRA factors drawn from ``seed`` (the global RNG
    untouched), the set-up warnings of peft and transformers silenced."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return get_peft_model(base, config)


def randomize_lora_B(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every lora_B (and lora_embedding_B) of every adapter random N(0, std²) values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in sorted(layer.lora_B.keys()):
                weight = layer.lora_B[name].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """The (path, layer) pairs of all peft LoRA layers of a model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_layers_by_key(model: torch.nn.Module) -> dict[tuple[int, str], LoraLayer]:
    """``(layer index, "q" or "v") → LoRA layer`` of the q_proj and v_proj modules of a model
    (the index: the first number in the module's path)."""
    return {
        (int(next(part for part in name.split(".") if part.isdigit())), PROJECTIONS[name.rsplit(".", 1)[-1]]): layer
        for name, layer in lora_layers(model)
    }


def _lora_model(
    base: Callable[[], torch.nn.Module],
    task_type: str,
    rank: int,
    seed: int,
    alpha: float,
    use_rslora: bool,
    target_modules: Sequence[str],
    base_seed: int,
    randomize_B: bool,
    **lora_kwargs: Any,
) -> PeftModel:
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        # A string is peft's own ("all-linear", a regular expression); else a list of names.
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        lora_dropout=0.0,
        task_type=task_type,
        **lora_kwargs,
    )
    model = add_lora(seeded(base, base_seed), config, seed)
    if randomize_B:
        randomize_lora_B(model, seed=seed + 1000)
    return model


def tiny_llama_lora(
    rank: int = 8,
    seed: int = 0,
    alpha: float = 16,
    use_rslora: bool = False,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    base_seed: int = 0,
    randomize_B: bool = True,
    **lora_kwargs: Any,
) -> PeftModel:
    """:func:`tiny_llama` with LoRA on ``target_modules``. Extra keyword arguments go to
    ``LoraConfig`` (``rank_pattern=...``, ``use_dora=...``)."""
    build = partial(tiny_llama, hidden_size=hidden_size, num_layers=num_layers, seed=None)
    return _lora_model(
        build, "CAUSAL_LM", rank, seed, alpha, use_rslora, target_modules, base_seed, randomize_B, **lora_kwargs
    )


def tiny_gpt2_lora(
    rank: int = 8,
    seed: int = 0,
    alpha: float = 16,
    use_rslora: bool = False,
    target_modules: Sequence[str] = ("c_attn",),
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    base_seed: int = 0,
    randomize_B: bool = True,
    **lora_kwargs: Any,
) -> PeftModel:
    """:func:`tiny_gpt2` with LoRA on the fused ``c_attn`` (``fan_in_fan_out``)."""
    build = partial(tiny_gpt2, n_embd=hidden_size, n_layer=num_layers, seed=None)
    return _lora_model(
        build,
        "CAUSAL_LM",
        rank,
        seed,
        alpha,
        use_rslora,
        target_modules,
        base_seed,
        randomize_B,
        fan_in_fan_out=True,
        **lora_kwargs,
    )


def tiny_bert_lora(
    rank: int = 8,
    seed: int = 0,
    alpha: float = 16,
    use_rslora: bool = False,
    target_modules: Sequence[str] = ("query", "value"),
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_labels: int = 2,
    base_seed: int = 0,
    randomize_B: bool = True,
    **lora_kwargs: Any,
) -> PeftModel:
    """:func:`tiny_bert` with LoRA on ``target_modules``.

    peft's SEQ_CLS task makes the classifier trainable (``modules_to_save``), so a saved adapter
    also holds non-LoRA tensors.
    """
    build = partial(tiny_bert, hidden_size=hidden_size, num_hidden_layers=num_layers, num_labels=num_labels, seed=None)
    return _lora_model(
        build, "SEQ_CLS", rank, seed, alpha, use_rslora, target_modules, base_seed, randomize_B, **lora_kwargs
    )


def llama_lora_module(model: PeftModel, layer: int, projection: str) -> LoraLayer:
    """The LoRA layer of a :func:`tiny_llama_lora`'s ``<projection>_proj`` in ``layer``."""
    return model.base_model.model.model.layers[layer].self_attn.get_submodule(f"{projection}_proj")


#: The factories by architecture, and the module keys of the model each makes by default.
TINY_LORA = {"llama": tiny_llama_lora, "gpt2": tiny_gpt2_lora, "bert": tiny_bert_lora}
TINY_LORA_KEYS = {
    "llama": {(0, "q"), (0, "v"), (1, "q"), (1, "v")},
    "gpt2": {(0, "q"), (0, "k"), (0, "v"), (1, "q"), (1, "k"), (1, "v")},
    "bert": {(0, "q"), (0, "v"), (1, "q"), (1, "v")},
}
