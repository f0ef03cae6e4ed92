"""lora_monitor.engine.references: what each snapshot is compared with, across a resume and from a
reference adapter on disk.

Resuming from a Lightning checkpoint, the monitor compares with the same reference as an
uninterrupted run, number for number: run A trains 6 steps in one go; run B trains 3 steps,
saves a checkpoint, and a new Trainer with new monitors resumes it to step 6. Three monitors
share each Trainer ("first", "previous" and a saved adapter directory), so their checkpoint
states must not overwrite each other. A reference adapter that cannot be used is rejected at
set-up, before a step is trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel

from lora_monitor import LoRAMonitorError, LoRASubspaceMonitor
from tests.helpers.dense import dense_basis, dense_phi, dense_updates
from tests.helpers.events import read_events
from tests.helpers.lightning import CausalLMModule, CountingModule, make_trainer
from tests.helpers.models import tiny_llama_lora

EVERY = 2
STEPS = 6
INTERRUPTED_AT = 3  # off the snapshot schedule: the end-of-fit snapshot must not become a reference


class StepSeededModule(CausalLMModule):
    """Trains on a batch drawn from the global step, so a resumed run sees the batches an
    uninterrupted one does (a plain DataLoader restarts its epoch on a mid-epoch resume)."""

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(self.global_step)
        tokens = torch.randint(0, self.vocab_size, batch[0].shape, generator=generator)
        return super().training_step((tokens,), batch_idx)


class AnalysisRecorder(Callback):
    """Copies each monitor's ``latest_analysis`` at every scheduled snapshot (monitors run first)."""

    def __init__(self, monitors: dict[str, LoRASubspaceMonitor]) -> None:
        self.monitors = monitors
        self.phi: dict[str, dict[int, dict]] = {name: {} for name in monitors}

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % EVERY == 0:
            for name, monitor in self.monitors.items():
                self.phi[name][trainer.global_step] = {
                    key: analysis.phi for key, analysis in monitor.latest_analysis.items()
                }


def monitors(reference_dir: Path) -> dict[str, LoRASubspaceMonitor]:
    return {
        "first": LoRASubspaceMonitor(every_n_steps=EVERY, reference="first", log_images=False),
        "previous": LoRASubspaceMonitor(every_n_steps=EVERY, reference="previous", log_images=False),
        "directory": LoRASubspaceMonitor(every_n_steps=EVERY, reference=reference_dir, log_images=False),
    }


def train(root: Path, reference_dir: Path, max_steps: int, ckpt_path: Path | None = None):
    watched = monitors(reference_dir)
    recorder = AnalysisRecorder(watched)
    trainer = make_trainer(root, [*watched.values(), recorder], max_steps=max_steps)
    # Same seeds: the resumed model starts from the same init, then loads the checkpoint;
    # weights_only=True: the monitor's state must load without unpickling arbitrary objects.
    module = StepSeededModule(tiny_llama_lora(rank=4, randomize_B=False))
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    return trainer, watched, recorder


# StepSeededModule ignores the DataLoader's order, which is what this warning is about.
pytestmark = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_llama_lora(rank=2, seed=7).save_pretrained(str(root / "reference"))
    uninterrupted = train(root / "A", root / "reference", STEPS)
    interrupted, _, _ = train(root / "B", root / "reference", INTERRUPTED_AT)
    checkpoint = root / "B" / "interrupted.ckpt"
    interrupted.save_checkpoint(checkpoint)
    resumed = train(root / "B", root / "reference", STEPS, ckpt_path=checkpoint)
    return uninterrupted, resumed, torch.load(checkpoint, weights_only=True)


def test_resumed_run_logs_the_same_numbers(runs):
    (trainer_a, _, _), (trainer_b, _, _), _ = runs
    events_a, events_b = read_events(trainer_a.logger.log_dir), read_events(trainer_b.logger.log_dir)
    tags = [t for t in events_a.Tags()["scalars"] if t.startswith("lora_monitor.phi")]
    assert tags
    for tag in tags:
        # Three monitors write each tag; their order within a step is the callbacks' order.
        after = [(e.step, e.value) for e in events_a.Scalars(tag) if e.step > INTERRUPTED_AT]
        resumed = [(e.step, e.value) for e in events_b.Scalars(tag) if e.step > INTERRUPTED_AT]
        assert [step for step, _ in resumed] == [step for step, _ in after] == [4, 4, 4, 6, 6, 6]
        assert [value for _, value in resumed] == pytest.approx([value for _, value in after], abs=1e-6)


@pytest.mark.parametrize("name", ["first", "previous", "directory"])
def test_each_monitor_compares_with_the_same_reference_after_resume(runs, name):
    (_, _, recorder_a), (_, watched_b, recorder_b), _ = runs
    assert sorted(recorder_b.phi[name]) == [4, 6]
    for step in (4, 6):
        expected, got = recorder_a.phi[name][step], recorder_b.phi[name][step]
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    if name == "first":
        assert watched_b[name].engine.references.first.step == EVERY


def test_checkpoint_holds_one_state_per_monitor(runs):
    _, _, checkpoint = runs
    states = {key: state for key, state in checkpoint["callbacks"].items() if "LoRASubspaceMonitor" in key}
    assert len(states) == 3
    by_reference = {
        reference: next(state for key, state in states.items() if f"'reference': '{reference}" in key)
        for reference in ("first", "previous")
    }
    assert by_reference["first"]["first"]["step"] == EVERY
    assert by_reference["first"]["previous"] is None
    # The interrupted run's last snapshot (step 3, off the schedule) is not its "previous".
    assert by_reference["previous"]["previous"]["step"] == EVERY
    assert by_reference["previous"]["first"] is None
    assert all(state["last_step"] == INTERRUPTED_AT for state in states.values())
    factors = by_reference["first"]["first"]["modules"]
    assert {(m["layer"], m["projection"]) for m in factors} == {(0, "q"), (0, "v"), (1, "q"), (1, "v")}
    assert all(m["lora_A"].shape == (4, 32) for m in factors)


def save(model: PeftModel, directory: Path, **kwargs) -> Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


def without_weights(directory: Path) -> Path:
    (directory / "adapter_model.safetensors").unlink()
    return directory


def emptied(directory: Path) -> Path:
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def truncated(directory: Path) -> Path:
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return directory


@pytest.mark.parametrize(
    "make_reference, match",
    [
        (lambda d: save(tiny_llama_lora(num_layers=1), d), r"no module for keys \[\(1, 'q'\), \(1, 'v'\)\]"),
        (lambda d: save(tiny_llama_lora(num_layers=3), d), r"layers \[0, 1, 2\] but the model in layers \[0, 1\]"),
        (
            lambda d: save(tiny_llama_lora(target_modules=("q_proj", "k_proj")), d),
            r"no module for keys \[\(0, 'v'\), \(1, 'v'\)\].*target_modules",
        ),
        (lambda d: without_weights(save(tiny_llama_lora(), d)), r"no adapter_model.safetensors nor adapter_model.bin"),
        (lambda d: emptied(save(tiny_llama_lora(), d)), r"adapter_model.safetensors is empty"),
        (lambda d: truncated(save(tiny_llama_lora(), d)), r"corrupt or truncated"),
    ],
    ids=["fewer-layers", "more-layers", "other-projections", "no-weights", "empty-weights", "corrupt-weights"],
)
def test_unusable_reference_is_rejected_at_setup(tmp_path, make_reference, match):
    reference = make_reference(tmp_path / "reference")
    module = CountingModule(tiny_llama_lora())
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor(reference=reference)], max_steps=1)
    with pytest.raises(LoRAMonitorError, match=match):
        trainer.fit(module)
    assert module.steps_run == 0


@pytest.mark.parametrize("basis, matrix", [("B", "lora_B"), ("delta_w_left", "ΔW")])
def test_reference_saved_before_training_is_rejected_at_setup(tmp_path, basis, matrix):
    # peft's initialization: lora_B = 0, so B's and ΔW's singular vectors do not exist.
    untrained = save(tiny_llama_lora(randomize_B=False), tmp_path / "untrained")
    module = CountingModule(tiny_llama_lora())
    monitor = LoRASubspaceMonitor(reference=untrained, basis=basis)
    with pytest.raises(
        LoRAMonitorError,
        match=rf"cannot be compared in basis '{basis}': layer 0 projection 'q': {matrix} is exactly zero"
        r".*save it after training",
    ):
        make_trainer(tmp_path, [monitor], max_steps=1).fit(module)
    assert module.steps_run == 0


def test_reference_saved_as_bin_works(tmp_path):
    reference_model = tiny_llama_lora(rank=4, seed=1)
    directory = save(reference_model, tmp_path / "bin", safe_serialization=False)
    assert (directory / "adapter_model.bin").is_file()
    assert not (directory / "adapter_model.safetensors").exists()
    model = tiny_llama_lora(rank=4)
    monitor = LoRASubspaceMonitor(every_n_steps=1, reference=directory, log_images=False)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(CausalLMModule(model))
    current, reference = dense_updates(model), dense_updates(reference_model)
    for key, analysis in monitor.latest_analysis.items():
        expected = dense_phi(dense_basis(*reference[key], "A"), dense_basis(*current[key], "A"))
        torch.testing.assert_close(analysis.phi.double(), expected, atol=1e-5, rtol=0)


def test_reference_of_other_shapes_is_rejected_at_setup(tmp_path):
    tiny_llama_lora(hidden_size=64).save_pretrained(str(tmp_path / "wide"))
    module = CountingModule(tiny_llama_lora(hidden_size=32))
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor(reference=tmp_path / "wide")], max_steps=2)
    with pytest.raises(LoRAMonitorError, match=r"shape"):
        trainer.fit(module)
    assert module.steps_run == 0
