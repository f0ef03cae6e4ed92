"""The architecture matrix: tiny random transformers models of many architectures (built by
:func:`tests.helpers.models.from_config`, no hub download), where each keeps its fused q|k|v
module, what each is trained on, and LoRA on a copy of a base model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from tests.helpers.models import add_lora, from_config, tiny_llama

VOCAB = 96


@dataclass(frozen=True)
class Architecture:
    """A tiny model: how to build it, what to feed it, which modules LoRA targets."""

    name: str
    build: Callable[[], torch.nn.Module]
    target_modules: tuple[str, ...]
    #: The fused q|k|v module of layer 0 (its path in the base model), if any.
    fused: str | None = None
    task_type: str | None = "CAUSAL_LM"
    #: What the model is trained on: ``"tokens"`` (next token), ``"seq2seq"`` (labels through
    #: the decoder), ``"audio"`` (Whisper's log-mel features), ``"classify"`` (a label per
    #: sequence), ``"image"`` (a label per image): see :func:`training_samples`.
    inputs: str = "tokens"
    lora_kwargs: dict[str, Any] = field(default_factory=dict)


def builder(config_class: str, model_class: str, **config: Any) -> Callable[[], torch.nn.Module]:
    """How to build ``model_class`` of ``config_class(**config)`` (a vocabulary of ``VOCAB``
    unless ``config`` says otherwise)."""
    return partial(from_config, config_class, model_class, **{"vocab_size": VOCAB, **config})


# The tables are kept one architecture to a few lines.
# fmt: off
FUSED = {
    "gpt2": Architecture(
        "gpt2",
        builder("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=32),
        ("c_attn",),
        fused="transformer.h.0.attn.c_attn",
        lora_kwargs={"fan_in_fan_out": True},
    ),
    "gpt_bigcode_mq": Architecture(
        "gpt_bigcode_mq",
        builder(
            "GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=32, n_layer=2, n_head=4, n_positions=32,
            multi_query=True,
        ),
        ("c_attn",),
        fused="transformer.h.0.attn.c_attn",
    ),
    "gpt_bigcode_mha": Architecture(
        "gpt_bigcode_mha",
        builder(
            "GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=32, n_layer=2, n_head=4, n_positions=32,
            multi_query=False,
        ),
        ("c_attn",),
        fused="transformer.h.0.attn.c_attn",
    ),
    "phi3": Architecture(
        "phi3",
        builder(
            "Phi3Config", "Phi3ForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
        ),
        ("qkv_proj",),
        fused="model.layers.0.self_attn.qkv_proj",
    ),
    "falcon_mha": Architecture(
        "falcon_mha",
        builder(
            "FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            multi_query=False, new_decoder_architecture=False,
        ),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
    "falcon_mq": Architecture(
        "falcon_mq",
        builder(
            "FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            multi_query=True, new_decoder_architecture=False,
        ),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
    "falcon_grouped": Architecture(
        "falcon_grouped",
        builder(
            "FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2, new_decoder_architecture=True,
        ),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
    "gpt_neox": Architecture(
        "gpt_neox",
        builder(
            "GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32,
        ),
        ("query_key_value",),
        fused="gpt_neox.layers.0.attention.query_key_value",
    ),
    "bloom": Architecture(
        "bloom",
        builder("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
}


#: Architectures whose q and v are separate modules (they worked before issue 9).
SEPARATE = {
    "llama": Architecture(
        "llama",
        partial(tiny_llama, VOCAB, max_position_embeddings=32, seed=None),
        ("q_proj", "v_proj"),
    ),
    "mistral": Architecture(
        "mistral",
        builder(
            "MistralConfig", "MistralForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    ),
    "qwen2": Architecture(
        "qwen2",
        builder(
            "Qwen2Config", "Qwen2ForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    ),
    "opt": Architecture(
        "opt",
        builder(
            "OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=32,
        ),
        ("q_proj", "v_proj"),
    ),
}


_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_SEQ2SEQ = {
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
}


#: Architectures added for issue 9 whose q and v are separate modules too: other decoders,
#: encoder-decoders (q and v of the encoder, the decoder and its cross-attention), encoders
#: with a classification head (peft keeps the head trainable: modules_to_save) and ViT.
MORE = {
    "gemma": Architecture(
        "gemma",
        builder(
            "GemmaConfig", "GemmaForCausalLM", **_SMALL, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    ),
    "gemma2": Architecture(
        "gemma2",
        builder(
            "Gemma2Config", "Gemma2ForCausalLM", **_SMALL, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=32, sliding_window=4,
        ),
        ("q_proj", "v_proj"),
    ),
    "t5": Architecture(
        "t5",
        builder(
            "T5Config", "T5ForConditionalGeneration", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0,
        ),
        ("q", "v"),
        task_type="SEQ_2_SEQ_LM",
        inputs="seq2seq",
    ),
    "bart": Architecture(
        "bart",
        builder("BartConfig", "BartForConditionalGeneration", **_SEQ2SEQ, max_position_embeddings=32),
        ("q_proj", "v_proj"),
        task_type="SEQ_2_SEQ_LM",
        inputs="seq2seq",
    ),
    "whisper": Architecture(
        "whisper",
        builder(
            "WhisperConfig", "WhisperForConditionalGeneration", **_SEQ2SEQ, num_mel_bins=8, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            suppress_tokens=None, begin_suppress_tokens=None,
        ),
        ("q_proj", "v_proj"),
        task_type=None,
        inputs="audio",
    ),
    "bert": Architecture(
        "bert",
        builder("BertConfig", "BertForSequenceClassification", **_SMALL, max_position_embeddings=32),
        ("query", "value"),
        task_type="SEQ_CLS",
        inputs="classify",
    ),
    "roberta": Architecture(
        "roberta",
        builder(
            "RobertaConfig", "RobertaForSequenceClassification", **_SMALL, max_position_embeddings=40, pad_token_id=1,
        ),
        ("query", "value"),
        task_type="SEQ_CLS",
        inputs="classify",
    ),
    "distilbert": Architecture(
        "distilbert",
        builder(
            "DistilBertConfig", "DistilBertForSequenceClassification", dim=32, hidden_dim=64, n_layers=2, n_heads=4,
            max_position_embeddings=32,
        ),
        ("q_lin", "v_lin"),
        task_type="SEQ_CLS",
        inputs="classify",
    ),
    "vit": Architecture(
        "vit",
        builder(
            "ViTConfig", "ViTForImageClassification", **_SMALL, image_size=8, patch_size=4, num_channels=3,
            num_labels=3,
        ),
        ("q_proj", "v_proj"),  # transformers 5 names them so (4: query, value)
        task_type=None,
        inputs="image",
        lora_kwargs={"modules_to_save": ["classifier"]},
    ),
}
# fmt: on


def base_model(arch: Architecture, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return arch.build().eval()


def peft_model(arch: Architecture, base: torch.nn.Module, seed: int = 1, **lora_kwargs: Any):
    """LoRA (or ``lora_kwargs``' variant) on ``arch.target_modules`` of a deep copy of ``base``."""
    from peft import LoraConfig

    settings = {"r": 4, "lora_alpha": 8, "target_modules": list(arch.target_modules), "lora_dropout": 0.0}
    settings.update(arch.lora_kwargs)
    settings.update(lora_kwargs)
    config_class = settings.pop("config_class", LoraConfig)
    if arch.task_type is not None:
        settings["task_type"] = arch.task_type
    return add_lora(copy.deepcopy(base), config_class(**settings), seed)


def probe_fused_rows(arch: Architecture, base: torch.nn.Module) -> dict[str, list[int]]:
    """The rows of layer 0's fused module that the architecture's own attention code hands to
    q, k and v: its output is replaced by the row numbers, and what reaches the attention
    (scaled_dot_product_attention, or Falcon's ``_split_heads`` before transformers 5 / BLOOM's ``_reshape``) is read
    back. Independent of lora_monitor's layout table."""
    modules = dict(base.named_modules())
    fused = modules[arch.fused]
    attention = modules[arch.fused.rsplit(".", 1)[0]]
    out_features = fused.weight.shape[1 if type(fused).__name__ == "Conv1D" else 0]
    code = torch.arange(out_features, dtype=torch.float32).view(1, 1, out_features)

    def rows(tensor: torch.Tensor, heads_dim: int) -> list[int]:
        # (..., heads, head_dim) per token: heads in order; repeated (broadcast) heads once.
        flat = tensor.movedim(heads_dim, -2).reshape(-1, tensor.shape[-1])
        seen = dict.fromkeys(tuple(int(v) for v in row) for row in flat)
        return [v for head in seen for v in head]

    if hasattr(attention, "_split_heads"):  # Falcon: all three layouts live in this method
        q, k, v = attention._split_heads(code)
        return {"q": rows(q[0, 0], 0), "k": rows(k[0, 0], 0), "v": rows(v[0, 0], 0)}
    if hasattr(attention, "_reshape"):  # BLOOM
        q, k, v = attention._reshape(code)
        return {"q": rows(q[0, :, 0], 0), "k": rows(k[0, :, 0], 0), "v": rows(v[0, :, 0], 0)}
    captured: list[tuple[torch.Tensor, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def capture(query, key, value, *args, **kwargs):
        captured.append((query, key, value))
        return sdpa(query, key, value, *args, **kwargs)

    handle = fused.register_forward_hook(lambda module, args, output: code.expand_as(output).clone())
    torch.nn.functional.scaled_dot_product_attention = capture
    try:
        with torch.no_grad():
            base(input_ids=torch.zeros(1, 1, dtype=torch.long))
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        handle.remove()
    q, k, v = captured[0]
    # (heads, tokens, head_dim) of the one token: transformers' SDPA path may fold a
    # key-value group's query heads into the token axis (no repeat of k and v), so every
    # (head_dim,) row of the tensor is a head, in order.
    return {name: rows(t[0].reshape(-1, t.shape[-1]), 0) for name, t in zip("qkv", (q, k, v))}


def training_samples(arch: Architecture, count: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Random training samples for ``arch.inputs``, each a dict of the model's keyword inputs."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        return torch.randint(3, VOCAB, (n,), generator=generator)

    samples = []
    for _ in range(count):
        if arch.inputs == "tokens":
            ids = tokens(length)
            samples.append({"input_ids": ids, "labels": ids})
        elif arch.inputs == "seq2seq":
            samples.append({"input_ids": tokens(length), "labels": tokens(length)})
        elif arch.inputs == "audio":  # (mel bins, 2 · max_source_positions) frames
            features = torch.randn(8, 32, generator=generator)
            samples.append({"input_features": features, "labels": tokens(length)})
        elif arch.inputs == "classify":
            label = torch.randint(0, 2, (), generator=generator)
            samples.append({"input_ids": tokens(length), "labels": label})
        elif arch.inputs == "image":
            label = torch.randint(0, 3, (), generator=generator)
            samples.append({"pixel_values": torch.randn(3, 8, 8, generator=generator), "labels": label})
        else:
            raise ValueError(f"unknown inputs {arch.inputs!r}")
    return samples


def quantized_llama(directory, bits: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(the pretrained float32 Llama, the same loaded by transformers in 4 or 8 bits by
    bitsandbytes)``, saved to and read from ``directory`` (hidden size 64: bitsandbytes' CPU
    4-bit kernels quantize blocks of 64 inputs)."""
    import warnings

    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    pretrained = tiny_llama(VOCAB, hidden_size=64, intermediate_size=64, max_position_embeddings=32).eval()
    pretrained.save_pretrained(str(directory / "base"))
    quantization = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = LlamaForCausalLM.from_pretrained(
            str(directory / "base"), quantization_config=quantization, device_map="cpu"
        )
    return pretrained, quantized
