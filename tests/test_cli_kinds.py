"""``lora-monitor truncate`` with a rank per kind: attention and MLP cut to their own ranks through
peft's ``rank_pattern``, from ``--rank attention=K,mlp=K`` or from ``--rank suggested`` where the
spectral readings of the two groups differ more than 2×; the written adapter loads in
``PeftModel.from_pretrained`` and each ΔW is its best rank-K approximation (checked against a
dense SVD)."""

from __future__ import annotations

import copy
import json
import re
import shlex

import pytest
import torch
from peft import PeftModel

from lora_monitor.cli import main
from lora_monitor.cli.commands import inspect_adapter, truncate_saved
from tests.helpers.models import lora_layers, tiny_llama_lora

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """An all-linear r = 8 adapter: one strong direction in attention, four in the MLP."""
    model = tiny_llama_lora(rank=8, seed=5, target_modules="all-linear")
    with torch.no_grad():
        for name, layer in lora_layers(model):
            kept = 1 if name.rsplit(".", 1)[-1] in ATTENTION_NAMES else 4
            layer.lora_B["default"].weight[:, kept:] *= 0.01
    directory = tmp_path_factory.mktemp("kinds") / "planted run"
    model.save_pretrained(str(directory))
    return model, directory


def _delta(layer) -> torch.Tensor:
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def _check_cut(model, directory, ranks_by_group: dict[str, int]) -> None:
    """The adapter in ``directory`` loads, and each module's ΔW is the best rank-K approximation of
    ``model``'s, K its group's rank."""
    loaded = PeftModel.from_pretrained(copy.deepcopy(model).unload(), str(directory))
    originals = dict(lora_layers(model))
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # two ranks: one of them through peft's rank_pattern
    for name, layer in lora_layers(loaded):
        group = "attention" if name.rsplit(".", 1)[-1] in ATTENTION_NAMES else "mlp"
        k = ranks_by_group[group]
        assert layer.lora_A["default"].weight.shape[0] == k, name
        U, S, Vh = torch.linalg.svd(_delta(originals[name]).detach().double())
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert torch.allclose(_delta(layer).detach().double(), best, atol=1e-5 * float(S[0])), name


def test_inspect_advises_a_rank_per_kind_and_its_command_runs_as_printed(planted, tmp_path, capsys):
    model, directory = planted
    _, recommendation = inspect_adapter(directory)
    assert recommendation.per_kind == {"attention": 1, "mlp": 4}
    assert main(["inspect", str(directory)]) == 0
    out = capsys.readouterr().out
    (advice,) = [line for line in out.splitlines() if line.startswith("What to do:")]
    (config,) = re.findall(r"LoraConfig\(r=1, rank_pattern=(\{[^}]*\}), \.\.\.\)", advice)
    assert eval(config) == {"gate_proj": 4, "up_proj": 4, "down_proj": 4}  # a dict literal of the text
    (command,) = re.findall(r"`(lora-monitor truncate [^`]+)`", advice)
    argv = shlex.split(command)[1:]
    assert argv[:4] == ["truncate", str(directory), "--rank", "attention=1,mlp=4"]
    assert main(argv) == 0
    assert "14 modules (8 at rank 1, 6 at rank 4)" in capsys.readouterr().out
    _check_cut(model, directory.parent / "planted run_attention1_mlp4", {"attention": 1, "mlp": 4})


def test_truncate_to_the_suggestion_cuts_each_kind_to_its_rank(planted, tmp_path):
    model, directory = planted
    written = truncate_saved(directory, tmp_path / "cut", "suggested")
    assert sorted(set(written.values())) == [1, 4]
    _check_cut(model, tmp_path / "cut", {"attention": 1, "mlp": 4})


def test_a_default_rank_beside_one_group(planted, tmp_path, capsys):
    model, directory = planted
    assert main(["truncate", str(directory), "--rank", "2,mlp=4", "-o", str(tmp_path / "cut")]) == 0
    _check_cut(model, tmp_path / "cut", {"attention": 2, "mlp": 4})


@pytest.mark.parametrize("rank", ["attention=0", "ffn=2", "mlp=two"])
def test_a_bad_rank_per_kind_exits_2(planted, tmp_path, capsys, rank):
    _, directory = planted
    with pytest.raises(SystemExit) as exit_info:
        main(["truncate", str(directory), "--rank", rank, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "attention=K,mlp=K" in capsys.readouterr().err


def test_a_group_without_a_rank_is_refused(planted, tmp_path, capsys):
    _, directory = planted
    assert main(["truncate", str(directory), "--rank", "mlp=4", "-o", str(tmp_path / "out")]) == 2
    assert "has no rank in {'mlp': 4}: give it attention" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
