"""Tiny random transformers models of many architectures, from configs (no hub download), and
where each keeps its fused q|k|v module, for the variant and architecture matrix tests."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

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


def causal_lm(config_class: str, model_class: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        settings = {"vocab_size": VOCAB, **config}
        cfg = getattr(transformers, config_class)(**settings)
        return getattr(transformers, model_class)(cfg)

    return build


FUSED = {
    "gpt2": Architecture(
        "gpt2",
        causal_lm("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=32),
        ("c_attn",),
        fused="transformer.h.0.attn.c_attn",
        lora_kwargs={"fan_in_fan_out": True},
    ),
    "gpt_bigcode_mq": Architecture(
        "gpt_bigcode_mq",
        causal_lm("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=True),
        ("c_attn",),
        fused="transformer.h.0.attn.c_attn",
    ),
    "gpt_bigcode_mha": Architecture(
        "gpt_bigcode_mha",
        causal_lm("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=False),
        ("c_attn",),
        fused="transformer.h.0.attn.c_attn",
    ),
    "phi3": Architecture(
        "phi3",
        causal_lm(
            "Phi3Config", "Phi3ForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
        ),
        ("qkv_proj",),
        fused="model.layers.0.self_attn.qkv_proj",
    ),
    "falcon_mha": Architecture(
        "falcon_mha",
        causal_lm(
            "FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            multi_query=False, new_decoder_architecture=False,
        ),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
    "falcon_mq": Architecture(
        "falcon_mq",
        causal_lm(
            "FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            multi_query=True, new_decoder_architecture=False,
        ),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
    "falcon_grouped": Architecture(
        "falcon_grouped",
        causal_lm(
            "FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_kv_heads=2, new_decoder_architecture=True,
        ),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
    "gpt_neox": Architecture(
        "gpt_neox",
        causal_lm(
            "GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32,
        ),
        ("query_key_value",),
        fused="gpt_neox.layers.0.attention.query_key_value",
    ),
    "bloom": Architecture(
        "bloom",
        causal_lm("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4),
        ("query_key_value",),
        fused="transformer.h.0.self_attention.query_key_value",
    ),
}


def base_model(arch: Architecture, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return arch.build().eval()


def peft_model(arch: Architecture, base: torch.nn.Module, seed: int = 1, **lora_kwargs: Any):
    """LoRA (or ``lora_kwargs``' variant) on ``arch.target_modules`` of a deep copy of ``base``."""
    import warnings

    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "lora_alpha": 8, "target_modules": list(arch.target_modules), "lora_dropout": 0.0}
    settings.update(arch.lora_kwargs)
    settings.update(lora_kwargs)
    config_class = settings.pop("config_class", LoraConfig)
    if arch.task_type is not None:
        settings["task_type"] = arch.task_type
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(base), config_class(**settings))


def probe_fused_rows(arch: Architecture, base: torch.nn.Module) -> dict[str, list[int]]:
    """The rows of layer 0's fused module that the architecture's own attention code hands to
    q, k and v: its output is replaced by the row numbers, and what reaches the attention
    (scaled_dot_product_attention, or Falcon's ``_split_heads`` / BLOOM's ``_reshape``) is read
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
    return {name: rows(t[0, :, 0], 0) for name, t in zip("qkv", (q, k, v))}


#: Architectures whose q and v are separate modules (they worked before issue 9).
SEPARATE = {
    "llama": Architecture(
        "llama",
        causal_lm(
            "LlamaConfig", "LlamaForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    ),
    "mistral": Architecture(
        "mistral",
        causal_lm(
            "MistralConfig", "MistralForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    ),
    "qwen2": Architecture(
        "qwen2",
        causal_lm(
            "Qwen2Config", "Qwen2ForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    ),
    "opt": Architecture(
        "opt",
        causal_lm(
            "OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, word_embed_proj_dim=32,
        ),
        ("q_proj", "v_proj"),
    ),
}


def model_with_head(config_class: str, model_class: str, **config: Any) -> Callable[[], torch.nn.Module]:
    """Like :func:`causal_lm` for any model class (seq2seq, classification, vision)."""
    return causal_lm(config_class, model_class, **config)


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
        causal_lm("GemmaConfig", "GemmaForCausalLM", **_SMALL, num_key_value_heads=2, head_dim=8, max_position_embeddings=32),
        ("q_proj", "v_proj"),
    ),
    "gemma2": Architecture(
        "gemma2",
        causal_lm(
            "Gemma2Config", "Gemma2ForCausalLM", **_SMALL, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=32, sliding_window=4,
        ),
        ("q_proj", "v_proj"),
    ),
    "t5": Architecture(
        "t5",
        model_with_head(
            "T5Config", "T5ForConditionalGeneration", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0,
        ),
        ("q", "v"),
        task_type="SEQ_2_SEQ_LM",
        inputs="seq2seq",
    ),
    "bart": Architecture(
        "bart",
        model_with_head("BartConfig", "BartForConditionalGeneration", **_SEQ2SEQ, max_position_embeddings=32),
        ("q_proj", "v_proj"),
        task_type="SEQ_2_SEQ_LM",
        inputs="seq2seq",
    ),
    "whisper": Architecture(
        "whisper",
        model_with_head(
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
        model_with_head("BertConfig", "BertForSequenceClassification", **_SMALL, max_position_embeddings=32),
        ("query", "value"),
        task_type="SEQ_CLS",
        inputs="classify",
    ),
    "roberta": Architecture(
        "roberta",
        model_with_head(
            "RobertaConfig", "RobertaForSequenceClassification", **_SMALL, max_position_embeddings=40, pad_token_id=1,
        ),
        ("query", "value"),
        task_type="SEQ_CLS",
        inputs="classify",
    ),
    "distilbert": Architecture(
        "distilbert",
        model_with_head(
            "DistilBertConfig", "DistilBertForSequenceClassification", dim=32, hidden_dim=64, n_layers=2, n_heads=4,
            max_position_embeddings=32,
        ),
        ("q_lin", "v_lin"),
        task_type="SEQ_CLS",
        inputs="classify",
    ),
    "vit": Architecture(
        "vit",
        model_with_head(
            "ViTConfig", "ViTForImageClassification", **_SMALL, image_size=8, patch_size=4, num_channels=3, num_labels=3,
        ),
        ("q_proj", "v_proj"),  # transformers 5 names them so (4: query, value)
        task_type=None,
        inputs="image",
        lora_kwargs={"modules_to_save": ["classifier"]},
    ),
}


def quantized_llama(directory, bits: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(the pretrained float32 Llama, the same loaded by transformers in 4 or 8 bits by
    bitsandbytes)``, saved to and read from ``directory`` (hidden size 64: bitsandbytes' CPU
    4-bit kernels quantize blocks of 64 inputs)."""
    import warnings

    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    arch = Architecture(
        "llama64",
        causal_lm(
            "LlamaConfig", "LlamaForCausalLM", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        ),
        ("q_proj", "v_proj"),
    )
    pretrained = base_model(arch)
    pretrained.save_pretrained(str(directory / "base"))
    quantization = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = LlamaForCausalLM.from_pretrained(str(directory / "base"), quantization_config=quantization, device_map="cpu")
    return pretrained, quantized
