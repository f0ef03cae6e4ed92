"""An all-linear adapter at the monitor's defaults (issue 22): a tiny random Llama of 8 layers,
LoRA on q, k, v, o, gate, up and down, trained by a real Lightning ``Trainer`` with
``LoRASubspaceMonitor`` at its defaults. Read back from the TensorBoard event files: every module
peft trained is analyzed and logged (its ΔW norm against merged-minus-pretrained weights), the
first screen stays within 24 cards (as many at any depth: 80 layers in
``tests/outputs/test_tags_kinds.py``); the functional probe cut every module (its loss with no
update is the frozen model's, checked with peft's ``disable_adapter``) and read attention and the
MLP apart (each group's loss with no update checked by zeroing that group's B by hand)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader, TensorDataset

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.outputs.tags import MAX_SUMMARY_CARDS, RECOMMENDATION_TEXT_TAG, scalar_tag
from tests.helpers.events import read_events, scalar_series
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora

LAYERS, STEPS = 8, 6
#: The projection the monitor names each Llama module by: its own name, q/k/v/o canonical.
CANONICAL = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class RepeatingModule(CausalLMModule):
    """Trains on one batch of random tokens again and again: the update learns it, so that it
    lowers the probe's loss (the probe batch is the fit's first batch) and the probe reads a rank."""

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, self.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens.repeat(8, 1)), batch_size=8, shuffle=False)


def trained_by_peft(model) -> dict[tuple[int, str], str]:
    """Every LoRA module peft made, found by peft's own layer class: (layer, projection) → path.
    Independent of lora_monitor's module discovery, so that a module it drops is caught."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            found[(layer, CANONICAL.get(parts[-1], parts[-1]))] = name
    return found


def probe_loss(model, tokens, zeroed=()) -> float:
    """The probe batch's loss with the LoRA B of the modules ``zeroed`` set to zero (a copy)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in zeroed:
                module.lora_B["default"].weight.zero_()
        return float(model(input_ids=tokens, labels=tokens).loss)


def test_an_all_linear_adapter_is_watched_whole_at_the_defaults(tmp_path):
    model = tiny_llama_lora(num_layers=LAYERS, hidden_size=16, rank=4, target_modules="all-linear", randomize_B=False)
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    trained = trained_by_peft(model)
    assert len(trained) == LAYERS * 7
    monitor = LoRASubspaceMonitor(every_n_steps=3)  # the defaults: target_modules=None
    trainer = make_trainer(tmp_path, [monitor], max_steps=STEPS)
    trainer.fit(RepeatingModule(model, lr=3e-2))
    events = read_events(Path(trainer.logger.log_dir))
    tags = events.Tags()
    scalars = set(tags["scalars"])

    # Every module peft trained is analyzed and logged, and nothing else.
    logged = {key for key in trained if scalar_tag("delta_w_norm", key) in scalars}
    assert logged == set(trained), sorted(set(trained) - logged)[:10]
    assert set(monitor.engine.latest_analysis) == set(trained)
    merged = copy.deepcopy(model).merge_and_unload()
    for key, name in trained.items():
        path = name.removeprefix("base_model.model.") + ".weight"
        weight = dict(merged.named_parameters())[path]
        expected = float(torch.linalg.matrix_norm(weight - pretrained[f"{name}.base_layer.weight"]))
        assert scalar_series(events, scalar_tag("delta_w_norm", key))[STEPS] == pytest.approx(expected, rel=1e-3)

    # The first screen: the two groups TensorBoard opens, within their budget.
    opened = {
        t for kind in ("scalars", "images") for t in tags[kind] if t.split("/")[0] in ("LoRA_rank", "LoRA_summary")
    }
    assert len(opened) <= MAX_SUMMARY_CARDS, sorted(opened)
    for p in ("q", "k", "v", "o", "gate_proj", "up_proj", "down_proj"):
        assert f"LoRA_summary/max_delta_w_gap_rank.{p}" in opened
    assert {"LoRA_rank/suggested_kind.attention", "LoRA_rank/suggested_kind.mlp"} <= opened
    # The φ heatmaps keep the paper's q and v.
    assert monitor.engine.reporter.drawn_projections == {"q", "v"}

    # The probe cut every module: with no update its loss is the frozen model's.
    reading = monitor.engine.latest_probe_reading
    assert reading is not None and reading.rank is not None, reading
    (tokens,) = monitor.engine.probe_runner.batch
    assert reading.losses[0] == pytest.approx(probe_loss(model, tokens, zeroed=trained.values()), rel=1e-5)
    with model.disable_adapter(), torch.no_grad():
        model.eval()
        assert reading.losses[0] == pytest.approx(float(model(input_ids=tokens, labels=tokens).loss), rel=1e-5)
    # Each group read apart: its loss with no update has that group's ΔW removed, the other's kept.
    assert set(reading.groups) == {"attention", "mlp"}
    attention = {name for name in trained.values() if name.rsplit(".", 1)[-1] in ATTENTION}
    mlp = set(trained.values()) - attention
    assert reading.groups["attention"].losses[0] == pytest.approx(probe_loss(model, tokens, attention), rel=1e-5)
    assert reading.groups["mlp"].losses[0] == pytest.approx(probe_loss(model, tokens, mlp), rel=1e-5)
    recommendation = monitor.engine.recommendation
    assert recommendation is not None and recommendation.not_covered == ()
    assert set(recommendation.kinds) == {"attention", "mlp"}


def test_a_narrowed_target_modules_says_what_it_leaves_out(tmp_path, caplog):
    model = tiny_llama_lora(num_layers=2, hidden_size=16, rank=4, target_modules="all-linear")
    monitor = LoRASubspaceMonitor(every_n_steps=2, target_modules=("q", "v"))  # today's behaviour
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    with caplog.at_level("INFO"):
        trainer.fit(CausalLMModule(model))
    events = read_events(Path(trainer.logger.log_dir))
    scalars = set(events.Tags()["scalars"])
    assert {t.rsplit(".", 1)[-1] for t in scalars if t.startswith("lora_monitor.delta_w_norm/")} == {"q", "v"}
    recommendation = monitor.engine.recommendation
    assert recommendation.not_covered == ("k", "o", "gate_proj", "up_proj", "down_proj")
    # Said in the console and in TensorBoard's Text tab.
    said = "\n".join(record.getMessage() for record in caplog.records)
    assert "not covered: the adapter also trains k, o, gate_proj, up_proj, down_proj" in said
    (text,) = events.Tensors(RECOMMENDATION_TEXT_TAG)
    markdown = text.tensor_proto.string_val[0].decode()
    assert "Modules not covered: the adapter also trains k, o, gate_proj, up_proj, down_proj" in markdown
