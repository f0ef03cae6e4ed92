"""lora_monitor.adapters.saved: adapters written by ``save_pretrained`` read back as the live model's
factors, and every way a directory can be unusable."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from lora_monitor.adapters import LoRAMonitorError, SavedAdapter, find_lora_factors, load_adapter
from tests.helpers.models import TINY_LORA, tiny_llama_lora


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
    model = TINY_LORA[arch]()
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
    with pytest.raises(LoRAMonitorError, match=r"cannot read adapter weights file .*adapter_model.safetensors"):
        load_adapter(directory)


def _edit_config(directory, **changes) -> None:
    config_file = directory / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


def test_load_adapter_not_lora(saved_llama_adapter):
    _, directory = saved_llama_adapter
    _edit_config(directory, peft_type="IA3")
    with pytest.raises(LoRAMonitorError, match=r"peft_type 'IA3', not 'LORA'"):
        load_adapter(directory)


def test_load_adapter_config_rank_disagrees_with_weights(saved_llama_adapter):
    _, directory = saved_llama_adapter
    _edit_config(directory, r=4)
    with pytest.raises(LoRAMonitorError, match=r"rank r=4 .* has 8 rows"):
        load_adapter(directory)
