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
