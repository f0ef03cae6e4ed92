"""lora_monitor.adapters: LoRA factors of live peft models and of saved adapters."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from lora_monitor.adapters import (
    LoRAMonitorError,
    SavedAdapter,
    check_reference_compatible,
    find_lora_factors,
    load_adapter,
    select_factors,
)
from tests.helpers.dense import assert_match_peft, factor_delta, peft_deltas, relative_error
from tests.helpers.models import (
    randomize_lora_B,
    tiny_bert_lora,
    tiny_gpt2,
    tiny_gpt2_lora,
    tiny_llama,
    tiny_llama_lora,
)

FACTORIES = {"llama": tiny_llama_lora, "gpt2": tiny_gpt2_lora, "bert": tiny_bert_lora}
EXPECTED_KEYS = {
    "llama": {(0, "q"), (0, "v"), (1, "q"), (1, "v")},
    "gpt2": {(0, "q"), (0, "k"), (0, "v"), (1, "q"), (1, "k"), (1, "v")},
    "bert": {(0, "q"), (0, "v"), (1, "q"), (1, "v")},
}


# ---------------------------------------------------------------------------------------------
# Live models


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_factors_match_peft_delta_weight(arch):
    model = FACTORIES[arch]()
    factors = find_lora_factors(model)
    assert set(factors) == EXPECTED_KEYS[arch]
    assert all(f.key == key for key, f in factors.items())
    assert_match_peft(factors, model)
    for f in factors.values():
        assert f.scaling == 2.0  # alpha 16 / r 8
        assert f.rank == 8
        assert f.base_weight is not None
        assert f.base_weight.shape == (f.out_features, f.in_features)


def test_llama_factors_are_the_live_parameters(llama_lora):
    factors = find_lora_factors(llama_lora)
    modules = dict(llama_lora.named_modules())
    f = factors[(1, "q")]
    assert f.module_name == "base_model.model.model.layers.1.self_attn.q_proj"
    layer = modules[f.module_name]
    assert f.lora_A is layer.lora_A["default"].weight
    assert f.lora_B is layer.lora_B["default"].weight
    assert f.base_weight is layer.base_layer.weight
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(1.0)
    assert relative_error(factor_delta(f), peft_deltas(llama_lora)[f.module_name]) < 1e-5


def test_llama_grouped_query_v_has_fewer_rows(llama_lora):
    factors = find_lora_factors(llama_lora)
    # hidden 32, 4 heads of 8, 2 key/value heads: v_proj maps 32 -> 16.
    assert (factors[(0, "q")].out_features, factors[(0, "q")].in_features) == (32, 32)
    assert (factors[(0, "v")].out_features, factors[(0, "v")].in_features) == (16, 32)
    assert factors[(0, "v")].base_weight.shape == (16, 32)
    assert_match_peft(factors, llama_lora)


def test_gpt2_c_attn_split_in_live_row_blocks(gpt2_lora):
    factors = find_lora_factors(gpt2_lora)
    layer = dict(gpt2_lora.named_modules())["base_model.model.transformer.h.0.attn.c_attn"]
    A = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    W = layer.base_layer.weight  # Conv1D: (in, 3·out)
    assert W.shape == (32, 96)
    for i, proj in enumerate("qkv"):
        f = factors[(0, proj)]
        assert f.module_name.endswith("h.0.attn.c_attn")
        assert f.lora_A is A
        assert f.lora_B.shape == (32, 8)
        assert torch.equal(f.lora_B, B[32 * i : 32 * (i + 1)])
        assert f.lora_B.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
        assert torch.equal(f.base_weight, W.T[32 * i : 32 * (i + 1)])
        assert f.base_weight.untyped_storage().data_ptr() == W.untyped_storage().data_ptr()
    # A-based analysis cannot tell q from v, but ΔW differs.
    assert not torch.allclose(factor_delta(factors[(0, "q")]), factor_delta(factors[(0, "v")]))
    with torch.no_grad():
        B[64:].mul_(3.0)  # changes v only, seen through the live view
    assert_match_peft(factors, gpt2_lora)


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


def test_rslora_scaling():
    model = tiny_llama_lora(rank=16, alpha=8, use_rslora=True)
    factors = find_lora_factors(model)
    for f in factors.values():
        assert f.rank == 16
        assert f.scaling == pytest.approx(8 / math.sqrt(16))
        assert f.scaling != pytest.approx(8 / 16)
    assert_match_peft(factors, model)


def test_multiple_adapters_one_active(llama_lora):
    llama_lora.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]))
    randomize_lora_B(llama_lora, seed=5)
    # add_adapter does not activate: the default adapter is still the one analysed.
    default = find_lora_factors(llama_lora)
    assert set(default) == EXPECTED_KEYS["llama"]
    assert {f.rank for f in default.values()} == {8}

    llama_lora.set_adapter("second")
    second = find_lora_factors(llama_lora)
    assert set(second) == {(0, "q"), (1, "q")}
    assert {f.rank for f in second.values()} == {4}
    assert {f.scaling for f in second.values()} == {0.5}
    assert_match_peft(second, llama_lora, adapter="second")

    explicit = find_lora_factors(llama_lora, adapter_name="default")
    assert {f.rank for f in explicit.values()} == {8}
    assert_match_peft(explicit, llama_lora, adapter="default")


def test_several_active_adapters_need_a_name(llama_lora):
    llama_lora.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]))
    llama_lora.base_model.set_adapter(["default", "second"])
    with pytest.raises(
        LoRAMonitorError,
        match=r"several LoRA adapters are active.*'default', 'second'.*adapter_name",
    ):
        find_lora_factors(llama_lora)
    assert {f.rank for f in find_lora_factors(llama_lora, adapter_name="second").values()} == {4}


def test_unknown_adapter_name(llama_lora):
    with pytest.raises(LoRAMonitorError, match=r"adapter 'nope' not found.*\['default'\]"):
        find_lora_factors(llama_lora, adapter_name="nope")


def test_lightning_module_holding_a_peft_model(llama_lora):
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

    factors = find_lora_factors(Module(llama_lora))
    direct = find_lora_factors(llama_lora)
    assert set(factors) == set(direct)
    for key, f in factors.items():
        assert f.module_name == "model." + direct[key].module_name
        assert f.lora_A is direct[key].lora_A


def test_bare_model_with_injected_lora():
    torch.manual_seed(0)  # the base model and then the LoRA factors
    model = tiny_llama(seed=None)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"])
    model = inject_adapter_in_model(config, model)
    randomize_lora_B(model)
    factors = find_lora_factors(model)
    assert set(factors) == {(0, "k"), (0, "o"), (1, "k"), (1, "o")}
    assert factors[(0, "k")].module_name == "model.layers.0.self_attn.k_proj"
    assert_match_peft(factors, model)


def test_colliding_names_are_qualified_by_where_paths_differ(tmp_path):
    model = tiny_bert_lora(target_modules=("query", "dense"))
    factors = find_lora_factors(model)
    assert {p for (layer, p) in factors if layer == 0} == {
        "q", "attention.dense", "intermediate.dense", "output.dense"
    }
    assert factors[(0, "intermediate.dense")].module_name.endswith("layer.0.intermediate.dense")
    assert factors[(0, "output.dense")].module_name.endswith("layer.0.output.dense")
    assert_match_peft(factors, model)
    model.save_pretrained(str(tmp_path))
    assert set(load_adapter(tmp_path).factors) == set(factors)
    assert set(select_factors(factors, ["dense"], [1])) == {
        (1, "attention.dense"), (1, "intermediate.dense"), (1, "output.dense")
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


class _ConvAndLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        block = torch.nn.ModuleDict(
            {"conv": torch.nn.Conv2d(3, 4, 3), "q_proj": torch.nn.Linear(6, 6)}
        )
        self.blocks = torch.nn.ModuleList([block])


def test_conv_lora_is_skipped(tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["conv", "q_proj"])
    model = get_peft_model(_ConvAndLinear(), config)
    with pytest.warns(UserWarning, match=r"skipped .*blocks\.0\.conv"):
        factors = find_lora_factors(model)
    assert set(factors) == {(0, "q")}
    model.save_pretrained(str(tmp_path))
    assert set(load_adapter(tmp_path).factors) == {(0, "q")}


def test_embedding_lora_is_skipped():
    model = tiny_llama_lora(target_modules=("q_proj", "embed_tokens"))
    with pytest.warns(UserWarning, match=r"skipped .*embed_tokens \(Embedding LoRA\)"):
        factors = find_lora_factors(model)
    assert set(factors) == {(0, "q"), (1, "q")}


def test_dora_factors_are_read():
    model = tiny_llama_lora(use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = find_lora_factors(model)
    assert set(factors) == EXPECTED_KEYS["llama"]


def test_no_lora_layers():
    model = tiny_gpt2(n_layer=1, n_positions=16)
    with pytest.raises(
        LoRAMonitorError, match=r"no peft LoRA layers found in GPT2LMHeadModel.*get_peft_model"
    ):
        find_lora_factors(model)


def test_merged_adapter_is_refused(llama_lora):
    llama_lora.merge_adapter()
    with pytest.raises(
        LoRAMonitorError,
        match=r"adapter 'default' is merged into the base weights of .*q_proj.*unmerge_adapter",
    ):
        find_lora_factors(llama_lora)
    llama_lora.unmerge_adapter()
    assert_match_peft(find_lora_factors(llama_lora), llama_lora)


def test_merged_and_unloaded_adapter_is_refused(llama_lora):
    llama_lora.merge_and_unload()
    with pytest.raises(LoRAMonitorError, match=r"no LoRA layers left.*merged and unloaded"):
        find_lora_factors(llama_lora)


# ---------------------------------------------------------------------------------------------
# Saved adapters


def assert_same_factors(loaded: dict, live: dict) -> None:
    assert set(loaded) == set(live)
    for key, f in loaded.items():
        g = live[key]
        assert f.module_name == g.module_name
        assert f.scaling == pytest.approx(g.scaling, rel=1e-12)
        assert torch.equal(f.lora_A, g.lora_A.detach())
        assert torch.equal(f.lora_B, g.lora_B.detach())
        assert f.base_weight is None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_load_adapter_equals_live_factors(arch, tmp_path):
    model = FACTORIES[arch]()
    model.save_pretrained(str(tmp_path))
    saved = load_adapter(tmp_path)
    assert isinstance(saved, SavedAdapter)
    assert saved.path == tmp_path
    assert saved.config["peft_type"] == "LORA"
    assert_same_factors(saved.factors, find_lora_factors(model))


def test_load_adapter_rslora_and_patterns(tmp_path):
    rs = tiny_llama_lora(rank=16, alpha=8, use_rslora=True)
    rs.save_pretrained(str(tmp_path / "rs"))
    loaded = load_adapter(tmp_path / "rs").factors
    assert {f.scaling for f in loaded.values()} == {2.0}
    assert_same_factors(loaded, find_lora_factors(rs))

    patterned = tiny_llama_lora(
        rank=8, alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 4}
    )
    patterned.save_pretrained(str(tmp_path / "pat"))
    live = find_lora_factors(patterned)
    assert (live[(0, "v")].rank, live[(0, "v")].scaling) == (4, 4.0)
    assert (live[(1, "q")].rank, live[(1, "q")].scaling) == (8, 0.5)
    assert (live[(0, "q")].rank, live[(0, "q")].scaling) == (8, 2.0)
    assert_same_factors(load_adapter(tmp_path / "pat").factors, live)


def test_load_adapter_bin_fallback(llama_lora, tmp_path):
    llama_lora.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert_same_factors(load_adapter(tmp_path).factors, find_lora_factors(llama_lora))


def test_load_adapter_accepts_a_file_inside_the_directory(saved_llama_adapter):
    model, directory = saved_llama_adapter
    saved = load_adapter(directory / "adapter_config.json")
    assert saved.path == directory
    assert_same_factors(saved.factors, find_lora_factors(model))


def test_load_adapter_missing_directory(tmp_path):
    with pytest.raises(LoRAMonitorError, match=r"adapter directory not found: .*does_not_exist"):
        load_adapter(tmp_path / "does_not_exist")


def test_load_adapter_directory_without_config(tmp_path, llama_lora):
    with pytest.raises(
        LoRAMonitorError,
        match=r"not a peft adapter directory: .*expected adapter_config.json and "
        r"adapter_model.safetensors",
    ):
        load_adapter(tmp_path)
    # peft saves a non-default adapter under its own name: point the user there.
    llama_lora.add_adapter("second", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]))
    llama_lora.save_pretrained(str(tmp_path / "both"), selected_adapters=["second"])
    with pytest.raises(LoRAMonitorError, match=r"subdirectories.*\['second'\]"):
        load_adapter(tmp_path / "both")
    assert {f.rank for f in load_adapter(tmp_path / "both" / "second").factors.values()} == {4}


def test_load_adapter_empty_safetensors(saved_llama_adapter):
    _, directory = saved_llama_adapter
    (directory / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LoRAMonitorError, match=r"adapter_model.safetensors is empty"):
        load_adapter(directory)


def test_load_adapter_corrupt_safetensors(saved_llama_adapter):
    _, directory = saved_llama_adapter
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])  # truncated
    with pytest.raises(
        LoRAMonitorError,
        match=r"cannot read adapter weights file .*adapter_model.safetensors.*corrupt",
    ):
        load_adapter(directory)
    file.write_bytes(b"\x00garbage, not a safetensors header" * 4)
    with pytest.raises(
        LoRAMonitorError, match=r"cannot read adapter weights file .*adapter_model.safetensors"
    ):
        load_adapter(directory)


def test_load_adapter_not_lora(saved_llama_adapter):
    _, directory = saved_llama_adapter
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["peft_type"] = "IA3"
    config_file.write_text(json.dumps(config))
    with pytest.raises(LoRAMonitorError, match=r"peft_type 'IA3', not 'LORA'"):
        load_adapter(directory)


def test_load_adapter_config_rank_disagrees_with_weights(saved_llama_adapter):
    _, directory = saved_llama_adapter
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 4
    config_file.write_text(json.dumps(config))
    with pytest.raises(LoRAMonitorError, match=r"rank r=4 .* has 8 rows"):
        load_adapter(directory)


# ---------------------------------------------------------------------------------------------
# Selection


def test_select_factors(llama_lora, gpt2_lora):
    factors = find_lora_factors(llama_lora)
    assert select_factors(factors, None, None) == factors
    assert set(select_factors(factors, ["q"], None)) == {(0, "q"), (1, "q")}
    assert set(select_factors(factors, ["q_proj"], None)) == {(0, "q"), (1, "q")}
    assert set(select_factors(factors, ["self_attn.v_proj"], [1])) == {(1, "v")}
    assert set(select_factors(factors, ["model.layers.0.self_attn.v_proj"], None)) == {(0, "v")}
    assert set(select_factors(factors, None, [0])) == {(0, "q"), (0, "v")}
    assert select_factors(factors, ["q"], None)[(0, "q")] is factors[(0, "q")]
    gpt2 = find_lora_factors(gpt2_lora)
    assert set(select_factors(gpt2, ["c_attn"], [1])) == {(1, "q"), (1, "k"), (1, "v")}
    assert set(select_factors(gpt2, ["q", "v"], None)) == {(0, "q"), (0, "v"), (1, "q"), (1, "v")}


def test_select_factors_errors(llama_lora):
    factors = find_lora_factors(llama_lora)
    with pytest.raises(
        LoRAMonitorError,
        match=r"target_modules \['o_proj'\] match no LoRA module.*projections \['q', 'v'\].*"
        r"layers \[0, 1\]",
    ):
        select_factors(factors, ["q", "o_proj"], None)
    with pytest.raises(
        LoRAMonitorError, match=r"layers \[7\] have no LoRA module.*layers \[0, 1\]"
    ):
        select_factors(factors, None, [0, 7])
    partial = {(0, "q"): factors[(0, "q")], (1, "v"): factors[(1, "v")]}
    with pytest.raises(LoRAMonitorError, match=r"select no module together"):
        select_factors(partial, ["q"], [1])


# ---------------------------------------------------------------------------------------------
# Reference compatibility


def test_reference_compatible_across_ranks_and_seeds(llama_lora):
    current = find_lora_factors(llama_lora)
    reference = find_lora_factors(tiny_llama_lora(rank=4, seed=1))
    for basis in ("A", "B", "delta_w_left", "delta_w_right"):
        check_reference_compatible(current, reference, basis)
    # the reference may hold more modules than the model monitors
    check_reference_compatible(select_factors(current, ["q"], [1]), reference, "A")


def test_reference_from_another_base_model(llama_lora):
    current = find_lora_factors(llama_lora)
    reference = find_lora_factors(tiny_llama_lora(hidden_size=64))
    with pytest.raises(
        LoRAMonitorError,
        match=r"reference module \(0, 'q'\) has ΔW of shape \(64, 64\) but the model's has "
        r"\(32, 32\): "
        r"the reference adapter was trained on another base model",
    ):
        check_reference_compatible(current, reference, "A")


def test_reference_missing_modules(llama_lora):
    current = find_lora_factors(llama_lora)
    reference = find_lora_factors(tiny_llama_lora(target_modules=("q_proj",)))
    with pytest.raises(
        LoRAMonitorError, match=r"no module for keys \[\(0, 'v'\), \(1, 'v'\)\].*target_modules"
    ):
        check_reference_compatible(current, reference, "B")
    with pytest.raises(LoRAMonitorError, match=r"unknown basis 'C'"):
        check_reference_compatible(current, current, "C")
