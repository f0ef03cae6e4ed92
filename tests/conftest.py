"""Shared test factories: tiny random peft LoRA models, built from configs (no hub download).

Import the factories in a test module with ``from conftest import tiny_llama_lora`` (pytest puts
``tests/`` on ``sys.path``), or use the fixtures below for the default models.

Every factory returns a ``PeftModel`` whose base weights depend only on ``base_seed`` and the
architecture, and whose LoRA factors depend only on ``seed``: two calls that differ in ``seed``
share the base model, as the paper's "two seeds" experiment needs. peft initializes lora_B to
zero; with ``randomize_B=True`` (the default) B gets random values so that ΔW ≠ 0. The global
torch RNG is left untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:  # peft and transformers are imported on use: tests of the maths stay fast
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer


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


def _wrap(
    build_base,
    *,
    rank: int,
    seed: int,
    alpha: float,
    use_rslora: bool,
    target_modules: Sequence[str],
    base_seed: int,
    randomize_B: bool,
    task_type: str,
    **lora_kwargs,
) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        base = build_base()
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            use_rslora=use_rslora,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            task_type=task_type,
            **lora_kwargs,
        )
        with warnings.catch_warnings():
            # transformers 5 deprecates an attribute that peft still reads
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            model = get_peft_model(base, config)
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
    **lora_kwargs,
) -> PeftModel:
    """A tiny random Llama causal LM with grouped-query attention and LoRA on ``target_modules``.

    4 attention heads, 2 key/value heads: v_proj and k_proj have ``hidden_size // 2`` outputs.
    Extra keyword arguments go to ``LoraConfig`` (``rank_pattern=...``, ``use_dora=...``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def build() -> torch.nn.Module:
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)

    return _wrap(
        build,
        rank=rank,
        seed=seed,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=target_modules,
        base_seed=base_seed,
        randomize_B=randomize_B,
        task_type="CAUSAL_LM",
        **lora_kwargs,
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
    **lora_kwargs,
) -> PeftModel:
    """A tiny random GPT-2 LM head model with LoRA on the fused ``c_attn`` (``fan_in_fan_out``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build() -> torch.nn.Module:
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            vocab_size=64,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config)

    return _wrap(
        build,
        rank=rank,
        seed=seed,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=target_modules,
        base_seed=base_seed,
        randomize_B=randomize_B,
        task_type="CAUSAL_LM",
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
    **lora_kwargs,
) -> PeftModel:
    """A tiny random BERT sequence classifier with LoRA on ``target_modules``.

    peft's SEQ_CLS task makes the classifier trainable (``modules_to_save``), so a saved adapter
    also holds non-LoRA tensors.
    """
    from transformers import BertConfig, BertForSequenceClassification

    def build() -> torch.nn.Module:
        config = BertConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden_size,
            vocab_size=64,
            max_position_embeddings=64,
            num_labels=num_labels,
        )
        return BertForSequenceClassification(config)

    return _wrap(
        build,
        rank=rank,
        seed=seed,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=target_modules,
        base_seed=base_seed,
        randomize_B=randomize_B,
        task_type="SEQ_CLS",
        **lora_kwargs,
    )


@pytest.fixture
def llama_lora() -> PeftModel:
    """``tiny_llama_lora()``: rank 8, LoRA on q_proj and v_proj, random B."""
    return tiny_llama_lora()


@pytest.fixture
def gpt2_lora() -> PeftModel:
    """``tiny_gpt2_lora()``: rank 8, LoRA on the fused c_attn, random B."""
    return tiny_gpt2_lora()


@pytest.fixture
def bert_lora() -> PeftModel:
    """``tiny_bert_lora()``: rank 8, LoRA on query and value, random B."""
    return tiny_bert_lora()


@pytest.fixture
def saved_llama_adapter(tmp_path: Path) -> tuple[PeftModel, Path]:
    """``(model, directory)``: ``tiny_llama_lora()`` and where ``save_pretrained`` wrote it."""
    model = tiny_llama_lora()
    directory = tmp_path / "llama_adapter"
    model.save_pretrained(str(directory))
    return model, directory
