"""lora_monitor.integrations.transformers: the transformers front-end with real clients.
``Trainer`` and TRL's ``SFTTrainer`` on a tiny Llama with the real MiniLM tokenizer, the
TensorBoard run read back, resume from ``checkpoint-N``, numbers checked against merged weights,
W&B and MLflow (offline) compared with TensorBoard, and a run with Lightning made unimportable."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch

from lora_monitor import AnalysisWarning, LoRASubspaceCallback
from lora_monitor.outputs.tags import (
    OVERVIEW_TAG,
    PROBE_RANK_TAG,
    RECOMMENDATION_TAG,
    SCALAR_NAMES,
    SUGGESTED_TAG,
    heatmap_tag,
    scalar_tag,
)
from tests.helpers.data import TEXTS, TokenDataset, minilm_tokenizer, trainer_arguments
from tests.helpers.events import assert_same_scalars, monitor_scalars, read_events, run_dirs, scalar_values
from tests.helpers.models import add_lora, tiny_llama
from tests.helpers.offline_runs import (
    MLFLOW_STORE_NOTICE,
    assert_same_pixels,
    mlflow_images,
    mlflow_scalars,
    offline_trackers,
    tensorboard_images,
    tensorboard_text,
    wandb_files,
    wandb_images,
    wandb_run_dir,
    wandb_scalars,
)

pytest.importorskip("transformers")
from peft import LoraConfig  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

EVERY = 2


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def lora_model(tokenizer, lora_seed: int = 0):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return add_lora(tiny_llama(len(tokenizer)), config, seed=1000 + lora_seed)


def test_trainer_writes_into_the_run_of_train_loss(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = lora_model(tokenizer)
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer.weight" in name}
    callback = LoRASubspaceCallback(every_n_steps=EVERY)
    trainer = Trainer(
        model=model,
        args=trainer_arguments(tmp_path, max_steps=6),
        train_dataset=TokenDataset(tokenizer),
        callbacks=[callback],
    )
    trainer.train()

    (run,) = run_dirs(tmp_path)  # one run directory: the Trainer's and the monitor's
    events = read_events(run)
    tags = events.Tags()
    assert "train/loss" in tags["scalars"]
    keys = [(layer, p) for layer in range(2) for p in ("q", "v")]
    per_layer = {scalar_tag(name, key) for name in SCALAR_NAMES for key in keys}
    values = scalar_values(events)
    assert per_layer <= set(values)
    assert sorted(values[scalar_tag("delta_w_norm", (0, "q"))]) == [2, 4, 6]
    assert sorted(values[scalar_tag("phi_top", (0, "q"))]) == [4, 6]
    assert sorted(tags["images"]) == sorted([heatmap_tag(0), heatmap_tag(1), OVERVIEW_TAG])
    assert RECOMMENDATION_TAG in {tag.rsplit("/text_summary", 1)[0] for tag in tags["tensors"]}

    # ‖ΔW‖_F at the last step against the update the model really applies: merged − pretrained.
    merged = copy.deepcopy(model).merge_and_unload()
    for layer in range(2):
        for short, module in (("q", "q_proj"), ("v", "v_proj")):
            name = f"model.layers.{layer}.self_attn.{module}.weight"
            pretrained_weight = pretrained[
                f"base_model.model.model.layers.{layer}.self_attn.{module}.base_layer.weight"
            ]
            dense = torch.linalg.matrix_norm(merged.get_parameter(name).double() - pretrained_weight.double())
            logged = values[scalar_tag("delta_w_norm", (layer, short))][6]
            assert logged == pytest.approx(float(dense), rel=1e-5)


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` (a crash, or a job's time limit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train_with_checkpoints(tokenizer, output_dir, lora_seed, stop_at=None, resume=None):
    """Six steps planned (the learning-rate schedule depends on it), checkpoints every 3; the
    probe read at every snapshot (its state, the latest reading and the passes spent, resumes too)."""
    callback = LoRASubspaceCallback(every_n_steps=EVERY, log_images=False, probe_budget=float("inf"))
    trainer = Trainer(
        model=lora_model(tokenizer, lora_seed=lora_seed),
        args=trainer_arguments(output_dir, max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=TokenDataset(tokenizer),
        callbacks=[callback] + ([StopAt(stop_at)] if stop_at else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return callback


def test_resume_from_a_checkpoint_gives_the_uninterrupted_figures(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    whole = tmp_path / "whole"
    _train_with_checkpoints(tokenizer, whole, lora_seed=0)
    interrupted = tmp_path / "interrupted"
    _train_with_checkpoints(tokenizer, interrupted, lora_seed=0, stop_at=3)
    assert (interrupted / "checkpoint-3").is_dir()
    # A model object whose LoRA initialization differs: only the restored state (the factors
    # before step 1, the first snapshot) can give the uninterrupted run's numbers.
    _train_with_checkpoints(tokenizer, interrupted, lora_seed=7, resume=str(interrupted / "checkpoint-3"))

    (whole_run,) = run_dirs(whole)
    events = read_events(whole_run)
    expected = scalar_values(events) | scalar_values(events, "LoRA_rank")
    resumed: dict[str, dict[int, float]] = {}
    for run in run_dirs(interrupted):
        events = read_events(run)
        for tag, series in (scalar_values(events) | scalar_values(events, "LoRA_rank")).items():
            resumed.setdefault(tag, {}).update({step: v for step, v in series.items() if step > 3})
    compared = [scalar_tag(name, key) for name in SCALAR_NAMES for key in [(0, "q"), (1, "v")]]
    # The probe reads the batch the uninterrupted run captured (restored from the checkpoint),
    # not the first batch after resuming.
    assert set(resumed[PROBE_RANK_TAG]) == {4, 6}
    compared.append(PROBE_RANK_TAG)
    for tag in compared:
        assert sorted(resumed[tag]) == [4, 6], tag
        for step in (4, 6):
            assert resumed[tag][step] == pytest.approx(expected[tag][step], rel=1e-4, abs=1e-6), (tag, step)


def test_the_functional_probe_reads_the_model_s_loss_and_changes_no_training(tokenizer, tmp_path, monkeypatch):
    """With the probe (the default) and without: the same ``train/loss``, bit for bit; with it,
    a reading at every snapshot whose whole-update loss is the model's own loss on the first
    batch it trained on, the model in eval mode."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    runs = {}
    for probe in (True, False):
        callback = LoRASubspaceCallback(
            every_n_steps=EVERY, log_images=False, functional_probe=probe, probe_budget=float("inf")
        )  # read at every snapshot of this short run
        model = lora_model(tokenizer)
        first: list[dict] = []

        def record(module, args, kwargs, first=first):
            if not first:
                first.append(kwargs)

        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        Trainer(
            model=model,
            args=trainer_arguments(tmp_path / str(probe), max_steps=6),
            train_dataset=TokenDataset(tokenizer),
            callbacks=[callback],
        ).train()
        hook.remove()
        (run,) = run_dirs(tmp_path / str(probe))
        runs[probe] = (model, first[0], callback, read_events(run))
    (model, batch, callback, events), (_, _, plain, plain_events) = runs[True], runs[False]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (e.step, e.value) for e in plain_events.Scalars("train/loss")
    ]
    assert sorted(scalar_values(events, "LoRA_rank")[PROBE_RANK_TAG]) == [2, 4, 6]
    assert plain.recommendation.probe is None
    reading = callback.recommendation.probe
    model.eval()
    with torch.no_grad():
        assert reading.losses[4] == pytest.approx(float(model(**batch).loss), rel=1e-5)
    assert reading.losses[0] > reading.losses[4]


def test_a_probe_given_to_the_callback_replaces_the_model_s_loss(tokenizer, tmp_path, monkeypatch):
    """A ``Trainer`` whose ``compute_loss`` is not the model's own loss gives its own probe."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = lora_model(tokenizer)
    dataset = TokenDataset(tokenizer)
    ids = dataset.input_ids[:4]
    calls = []

    def probe():
        calls.append(1)
        return 2 * model(input_ids=ids, labels=ids).loss  # a loss the model alone does not give

    callback = LoRASubspaceCallback(every_n_steps=EVERY, log_images=False, probe=probe)
    Trainer(
        model=model, args=trainer_arguments(tmp_path, max_steps=4), train_dataset=dataset, callbacks=[callback]
    ).train()
    reading = callback.recommendation.probe
    assert reading is not None and calls and callback.engine.probe_runner.batch is None  # nothing captured
    model.eval()
    with torch.no_grad():
        assert reading.losses[4] == pytest.approx(2 * float(model(input_ids=ids, labels=ids).loss), rel=1e-5)


def test_resume_without_saved_state_says_so(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _train_with_checkpoints(tokenizer, tmp_path, lora_seed=0, stop_at=3)
    for file in (tmp_path / "checkpoint-3").glob("lora_monitor_state-*.pt"):
        os.remove(file)
    with pytest.warns(AnalysisWarning, match=r"resumes at step 3 but no lora_monitor_state-.*\.pt was found"):
        _train_with_checkpoints(tokenizer, tmp_path, lora_seed=0, resume=str(tmp_path / "checkpoint-3"))


def test_sft_trainer_wrapping_the_model_itself(tokenizer, tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = tokenizer.sep_token  # BERT's tokenizer has no EOS; SFTTrainer appends one
    log_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    callback = LoRASubspaceCallback(every_n_steps=EVERY)
    config = trainer_arguments(tmp_path / "out", 4, trl.SFTConfig, max_length=16, dataset_text_field="text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TRL's notes on the tokenizer's special tokens
        trainer = trl.SFTTrainer(
            model=tiny_llama(len(tokenizer)),
            args=config,
            train_dataset=Dataset.from_dict({"text": TEXTS}),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            callbacks=[callback],
        )
        trainer.train()
    events = read_events(log_dir)
    assert "train/loss" in events.Tags()["scalars"]
    values = scalar_values(events)
    assert sorted(values[scalar_tag("delta_w_norm", (1, "v"))]) == [2, 4]
    assert sorted(callback.latest_analysis) == [(0, "q"), (0, "v"), (1, "q"), (1, "v")]


@pytest.mark.filterwarnings(f"ignore:{MLFLOW_STORE_NOTICE}")
def test_report_to_wandb_and_mlflow_get_what_tensorboard_gets(tokenizer, tmp_path, monkeypatch):
    import wandb

    uri = offline_trackers(monkeypatch, tmp_path)
    from mlflow import MlflowClient  # imported after offline_trackers: see there

    monkeypatch.setenv("WANDB_PROJECT", "lora_monitor")
    monkeypatch.chdir(tmp_path)  # MLflowCallback's experiment keeps its artifacts (the images) in ./mlruns
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer = Trainer(
        model=lora_model(tokenizer),
        args=trainer_arguments(tmp_path / "out", max_steps=4, report_to=["tensorboard", "wandb", "mlflow"]),
        train_dataset=TokenDataset(tokenizer),
        # strict: an output that fails raises instead of warning.
        callbacks=[LoRASubspaceCallback(every_n_steps=EVERY, strict=True)],
    )
    try:
        trainer.train()
    finally:
        # WandbCallback leaves the run open: finishing writes the rest of its file (and unsets
        # wandb.run); teardown drops W&B's settings, which point at tmp_path.
        wandb.finish()
        wandb.teardown()

    (tensorboard_run,) = run_dirs(tmp_path / "out")
    events = read_events(tensorboard_run)
    expected = monitor_scalars(events)
    # What is compared: the suggestion, and φ from step 4 on (step 2 is the reference); step 4
    # is written when training ends, after MLflowCallback has ended its run.
    assert expected[SUGGESTED_TAG].keys() == {2, 4}
    assert expected[scalar_tag("phi_top", (1, "v"))].keys() == {4}
    expected_images = tensorboard_images(events)
    assert {tag: sorted(series) for tag, series in expected_images.items()} == {
        heatmap_tag(0): [4],
        heatmap_tag(1): [4],
        OVERVIEW_TAG: [2, 4],
    }
    (recommendation,) = tensorboard_text(events, RECOMMENDATION_TAG).values()

    # W&B: its history rows carry the Trainer's step as train/global_step, the step axis
    # WandbCallback defines; images in the run's media.
    run_dir = wandb_run_dir(tmp_path)
    assert_same_scalars(wandb_scalars(run_dir, "train/global_step"), expected, rel=1e-6, abs=1e-6)
    assert_same_pixels(wandb_images(run_dir, "train/global_step"), expected_images)
    (html,) = wandb_files(run_dir, RECOMMENDATION_TAG, "html-file")
    assert f"<pre>{recommendation}</pre>" in html.read_text()

    # MLflow: the run MLflowCallback opened holds the metrics at their steps, the images as an
    # image series, the recommendation as a Markdown artifact.
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_id = run.info.run_id
    assert_same_scalars(mlflow_scalars(client, run_id), expected, rel=1e-6, abs=1e-6)
    assert_same_pixels(mlflow_images(client, run_id, tmp_path / "mlflow-download"), expected_images)
    text = client.download_artifacts(run_id, f"{RECOMMENDATION_TAG}/step_000004.md", str(tmp_path))
    assert Path(text).read_text() == recommendation


#: Run in a fresh interpreter where importing Lightning fails, as if it were not installed.
WITHOUT_LIGHTNING = """
import json, sys
for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
    sys.modules[name] = None  # `import lightning` now raises ImportError
sys.path.insert(0, {root!r})
from peft import LoraConfig
from transformers import Trainer
from lora_monitor import LoRASubspaceCallback
from tests.helpers.data import TokenDataset, minilm_tokenizer, trainer_arguments
from tests.helpers.events import read_events
from tests.helpers.models import add_lora, tiny_llama

tokenizer = minilm_tokenizer()
model = add_lora(tiny_llama(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
args = trainer_arguments({output!r}, max_steps=4)
Trainer(model=model, args=args, train_dataset=TokenDataset(tokenizer),
        callbacks=[LoRASubspaceCallback(every_n_steps=2, log_dir={log_dir!r}, strict=True)]).train()
try:
    import lora_monitor
    lora_monitor.LoRASubspaceMonitor
    message = None
except ModuleNotFoundError as error:
    message = str(error)
loaded = sorted(
    m for m, module in sys.modules.items() if m.split(".")[0] in ("lightning", "pytorch_lightning") and module
)
print(json.dumps({{"tags": read_events({log_dir!r}).Tags()["scalars"], "lightning": loaded, "message": message}}))
"""


def test_the_transformers_front_end_runs_without_lightning(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = WITHOUT_LIGHTNING.format(
        root=str(Path(__file__).resolve().parents[2]), output=str(tmp_path / "out"), log_dir=str(tmp_path / "tb")
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lightning"] == []
    assert scalar_tag("delta_w_norm", (0, "q")) in result["tags"]
    assert "LoRA_rank/suggested.model" in result["tags"]
    assert "pip install 'lora-monitor[lightning]'" in result["message"]


def test_the_last_snapshot_says_what_the_end_of_training_says(tokenizer, tmp_path, monkeypatch):
    """At the default probe budget a short run is probed at its end only; the Trainer's
    ``max_steps`` falling on a snapshot's step, that snapshot is the end's: its cards carry the
    reading the recommendation rests on."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    callback = LoRASubspaceCallback(every_n_steps=EVERY, log_images=False)
    Trainer(
        model=lora_model(tokenizer),
        args=trainer_arguments(tmp_path, max_steps=6),
        train_dataset=TokenDataset(tokenizer),
        callbacks=[callback],
    ).train()
    (run,) = run_dirs(tmp_path)
    rank_scalars = scalar_values(read_events(run), "LoRA_rank")
    recommendation = callback.recommendation
    assert recommendation.probe is not None and recommendation.probe.rank is not None
    assert rank_scalars[PROBE_RANK_TAG] == {6: recommendation.probe.rank}  # read there only
    assert rank_scalars[SUGGESTED_TAG][6] == recommendation.rank
