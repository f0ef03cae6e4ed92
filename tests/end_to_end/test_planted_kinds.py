"""The per-kind answer on a task whose attention and MLP need different ranks (issue 22): a tiny
random Llama teacher with a planted rank-1 update on every attention matrix and a rank-8 one on
every MLP matrix; an all-linear r = 16 student trained to match its last hidden states, a plain
loop with ``LoRAMonitor(probe=...)`` at its defaults. The monitor reads attention and the MLP
apart and advises a rank each; the adapter cut as its advice prints (peft's ``rank_pattern``)
loads in ``PeftModel.from_pretrained`` and keeps the held-out loss, while one small rank for every
module would not. The group readings are checked against a dense computation."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_monitor.cli import main
from tests.helpers.models import lora_layers, tiny_llama
from tests.helpers.teacher_student import HIDDEN, last_hidden, planted_teacher, random_tokens, train_student

STEPS, R = 250, 16
PLANTED = {"attention": 1, "mlp": 8}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _held_out_loss(model, held_out) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(last_hidden(model, t), y)) for t, y in held_out) / len(held_out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    teacher = planted_teacher(
        {name: PLANTED["attention"] for name in ATTENTION} | {name: PLANTED["mlp"] for name in MLP}
    )
    torch.manual_seed(0)
    student = get_peft_model(
        tiny_llama(hidden_size=HIDDEN, seed=0), LoraConfig(r=R, lora_alpha=R, target_modules="all-linear")
    )
    console = io.StringIO()  # what a plain loop's user reads: the monitor prints its advice
    with contextlib.redirect_stdout(console):
        monitor, data = train_student(
            student, teacher, STEPS, every_n_steps=50, log_images=False, adapter_dir=root / "adapter"
        )
    with torch.no_grad():
        held_out = [(batch, last_hidden(teacher, batch)) for batch in map(random_tokens, range(50, 54))]
    probe_tokens, probe_target = data[0]
    student.save_pretrained(str(root / "adapter"))
    said = console.getvalue().splitlines()
    return student, monitor, said, held_out, (probe_tokens, probe_target)


def test_attention_and_mlp_get_their_own_ranks(trained):
    _, monitor, said, _, _ = trained
    recommendation = monitor.recommendation
    split = recommendation.per_kind
    assert split is not None, recommendation.kinds
    # Within [K, 2K] of what each group's teacher update planted, and more than 2× apart.
    assert PLANTED["attention"] <= split["attention"] <= 2 * PLANTED["attention"], split
    assert PLANTED["mlp"] <= split["mlp"] <= 2 * PLANTED["mlp"], split
    assert not any(answer.too_small for answer in recommendation.kinds.values())
    (line,) = [s for s in said if "what to do" in s]
    assert f"--rank attention={split['attention']},mlp={split['mlp']}" in line


def _cut_as(model, ranks: dict[str, int]) -> torch.nn.Module:
    """A copy of ``model`` whose ΔW of each module is replaced by its best rank-K approximation
    (a dense SVD of s·B·A), K by the module's group (written into W₀, LoRA then removed)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            k = ranks["attention" if name.rsplit(".", 1)[-1] in ATTENTION else "mlp"]
            delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            U, S, Vh = torch.linalg.svd(delta.double())
            layer.base_layer.weight += ((U[:, :k] * S[:k]) @ Vh[:k]).to(delta.dtype)
            layer.lora_B["default"].weight.zero_()
    return model


def test_the_group_readings_agree_with_a_dense_cut(trained):
    student, monitor, _, _, (tokens, target) = trained
    reading = monitor.latest_probe_reading
    for group, other in (("attention", "mlp"), ("mlp", "attention")):
        for k, loss in reading.groups[group].losses.items():
            if k not in (0, 1, 2, 8):  # a few cuts, each a copy of the model: enough to tell
                continue
            dense = _cut_as(student, {group: k, other: R}).eval()
            with torch.no_grad():
                expected = float(torch.nn.functional.mse_loss(last_hidden(dense, tokens), target))
            assert loss == pytest.approx(expected, rel=1e-4), (group, k)


def test_the_advised_cut_loads_and_keeps_the_held_out_loss(trained, tmp_path, capsys):
    student, monitor, said, held_out, _ = trained
    (line,) = [s for s in said if "what to do" in s]
    (command,) = re.findall(r"`(lora-monitor truncate [^`]+)`", line)
    argv = shlex.split(command)[1:]
    assert main(argv) == 0, capsys.readouterr().err
    cut_dir = argv[argv.index("-o") + 1]
    base = copy.deepcopy(student).unload()
    loaded = PeftModel.from_pretrained(base, cut_dir)
    split = monitor.recommendation.per_kind
    ranks = {name.rsplit(".", 1)[-1]: layer.lora_A["default"].weight.shape[0] for name, layer in lora_layers(loaded)}
    assert ranks == {p: split["attention"] if p in ATTENTION else split["mlp"] for p in ranks}
    # The parameters the advice says: counted on the loaded adapter.
    parameters = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    assert re.search(rf"\({parameters:,} LoRA parameters".replace(",", " "), line), (parameters, line)
    full = _held_out_loss(student, held_out)
    cut = _held_out_loss(loaded, held_out)
    # The directions cut off were the training's noise: within 5 % of the whole update's loss
    # (the benchmark's planted cases lost nothing, and a teacher's rank-K update is all there is).
    assert cut <= 1.05 * full, (cut, full)
    # One small rank for every module would not do: the MLP needs its 8 directions.
    small = _held_out_loss(_cut_as(student, {"attention": split["attention"], "mlp": split["attention"]}), held_out)
    assert small > 1.5 * full, (small, full)
