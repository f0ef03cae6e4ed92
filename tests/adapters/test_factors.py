"""lora_monitor.adapters.factors: the key of each LoRA module, (layer index, projection), qualified by
where the paths differ when short names collide (cross-attention, encoder and decoder, MLPs)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from lora_monitor.adapters import find_lora_factors, load_adapter, select_factors
from tests.helpers.dense import assert_match_peft
from tests.helpers.models import randomize_lora_B, tiny_bert_lora, tiny_gpt2


def test_gpt2_cross_attention_keys():
    torch.manual_seed(0)  # the base model and then the LoRA factors
    base = tiny_gpt2(n_layer=1, n_positions=16, add_cross_attention=True, seed=None)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "q_attn"], fan_in_fan_out=True)
    model = get_peft_model(base, config)
    randomize_lora_B(model)
    factors = find_lora_factors(model)
    # self-attention c_attn is q|k|v; cross-attention c_attn is k|v and q_attn is q
    assert set(factors) == {(0, f"{blk}.{p}") for blk in ("attn", "crossattention") for p in "qkv"}
    assert factors[(0, "crossattention.q")].module_name.endswith("crossattention.q_attn")
    assert factors[(0, "crossattention.v")].base_weight.shape == (32, 32)
    assert_match_peft(factors, model)


def test_colliding_names_are_qualified_by_where_paths_differ(tmp_path):
    model = tiny_bert_lora(target_modules=("query", "dense"))
    factors = find_lora_factors(model)
    assert {p for (layer, p) in factors if layer == 0} == {"q", "attention.dense", "intermediate.dense", "output.dense"}
    assert factors[(0, "intermediate.dense")].module_name.endswith("layer.0.intermediate.dense")
    assert factors[(0, "output.dense")].module_name.endswith("layer.0.output.dense")
    assert_match_peft(factors, model)
    model.save_pretrained(str(tmp_path))
    assert set(load_adapter(tmp_path).factors) == set(factors)
    assert set(select_factors(factors, ["dense"], [1])) == {
        (1, "attention.dense"),
        (1, "intermediate.dense"),
        (1, "output.dense"),
    }


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.v_proj = torch.nn.Linear(8, 4)


class _EncoderDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.ModuleList([_Block(), _Block()])
        self.decoder = torch.nn.ModuleList([_Block(), _Block()])


def test_encoder_decoder_keys():
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_EncoderDecoder(), config)
    randomize_lora_B(model)
    factors = find_lora_factors(model)
    stacks = ("encoder", "decoder")
    assert set(factors) == {(i, f"{stack}.{p}") for i in (0, 1) for stack in stacks for p in "qv"}
    assert factors[(1, "decoder.v")].module_name == "base_model.model.decoder.1.v_proj"
    assert_match_peft(factors, model)
    assert set(select_factors(factors, ["q"], [0])) == {(0, "encoder.q"), (0, "decoder.q")}
    assert set(select_factors(factors, ["decoder.q"], None)) == {(0, "decoder.q"), (1, "decoder.q")}
