"""lora_monitor.integrations.lightning_loggers: every logger gets what it can show. TensorBoard
scalars and images, CSV scalars and PNG files, W&B (offline) and MLflow (a SQLite store) their own
image APIs, read back from disk and compared with TensorBoard's, any other logger the scalars."""

from __future__ import annotations

import csv
import io
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import matplotlib.image
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.integrations.lightning_loggers import image_path
from lora_monitor.outputs.tags import OVERVIEW_TAG, SUGGESTED_TAG, heatmap_tag, is_monitor_tag, scalar_tag
from tests.helpers.events import analysis_warnings, assert_same_scalars, monitor_scalars, read_events
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora
from tests.helpers.offline_runs import (
    MLFLOW_STORE_NOTICE,
    assert_same_pixels,
    mlflow_images,
    mlflow_scalars,
    offline_trackers,
    tensorboard_images,
    wandb_images,
    wandb_run_dir,
    wandb_scalars,
)

PHI_TOP = scalar_tag("phi_top", (0, "q"))


class RecordingLogger(Logger):
    """A minimal third-party logger: it shows scalars, not images."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        monitored = {tag: value for tag, value in metrics.items() if is_monitor_tag(tag)}
        if monitored:
            self.metrics.setdefault(step, {}).update(monitored)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def fit_with(root: Path, loggers: list[Logger]) -> list[str]:
    """Train 4 steps with a snapshot every 2 (an image at step 4); the AnalysisWarning texts."""
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(root, [monitor], max_steps=4, logger=loggers).fit(CausalLMModule(tiny_llama_lora(rank=4)))
    return analysis_warnings(caught)


def decode_png(data: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(data), format="png")


@pytest.fixture(scope="module")
def several(tmp_path_factory):
    root = tmp_path_factory.mktemp("several")
    tensorboard = TensorBoardLogger(str(root), name="tb", version=0)
    csv_logger = CSVLogger(str(root), name="csv", version=0)
    blocked = CSVLogger(str(root), name="blocked", version=0)
    # A regular file where the images directory should go: every PNG write fails.
    Path(blocked.log_dir).mkdir(parents=True)
    Path(blocked.log_dir, "images").write_text("not a directory")
    recording = RecordingLogger()
    messages = fit_with(root, [tensorboard, csv_logger, blocked, recording])
    return read_events(tensorboard.log_dir), csv_logger, blocked, recording, messages


def csv_column(logger: CSVLogger, column: str) -> dict[int, float]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as file:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(file) if row.get(column)}


def test_csv_logger_gets_scalars_and_png_files(several):
    events, csv_logger, _, _, _ = several
    assert csv_column(csv_logger, PHI_TOP) == pytest.approx({e.step: e.value for e in events.Scalars(PHI_TOP)})
    path = image_path(csv_logger.log_dir, heatmap_tag(0), 4)
    assert path == Path(csv_logger.log_dir) / "images" / "lora_monitor.phi_heatmaps" / "layer_00" / "step_000004.png"
    assert sorted(path.parent.iterdir()) == [path]  # step 2 is the reference: no image
    (tensorboard_image,) = events.Images(heatmap_tag(0))
    # The same pixels as the TensorBoard image.
    np.testing.assert_array_equal(decode_png(path.read_bytes()), decode_png(tensorboard_image.encoded_image_string))


def test_logger_without_images_gets_the_scalars(several):
    events, _, _, recording, _ = several
    assert sorted(recording.metrics) == [2, 4]
    assert recording.metrics[4][PHI_TOP] == pytest.approx(events.Scalars(PHI_TOP)[0].value)
    logged = {tag for tag in events.Tags()["scalars"] if is_monitor_tag(tag)}
    assert set(recording.metrics[4]) == logged


def test_a_logger_that_cannot_write_warns_and_the_others_still_log(several):
    events, _, blocked, _, messages = several
    # One warning per snapshot with images: the overview at step 2, heatmaps and overview at 4.
    assert len(messages) == 2
    assert "step 2: could not log to CSVLogger" in messages[0]
    assert "step 4: could not log to CSVLogger" in messages[1]
    assert all(os.path.join(blocked.log_dir, "images") in message for message in messages)
    # Its scalars went through before the image failed; the TensorBoard run is complete.
    assert 4 in csv_column(blocked, PHI_TOP)
    assert [image.step for image in events.Images(heatmap_tag(0))] == [4]


def test_tensorboard_log_dir_that_cannot_be_created_fails_before_training(tmp_path):
    # chmod does not stop root: a regular file as the parent makes the directory impossible.
    (tmp_path / "file").write_text("")
    logger = TensorBoardLogger(str(tmp_path / "file" / "runs"))
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor()], max_steps=2, logger=logger)
    start = time.monotonic()
    with pytest.raises(OSError, match=str(tmp_path / "file" / "runs")):
        trainer.fit(CausalLMModule(tiny_llama_lora()))
    assert trainer.global_step == 0
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run logging to TensorBoard, W&B (offline) and MLflow (a SQLite store) at once, each read
    back from disk: logger → (tag → step → value of the monitor's scalars, tag → step → PNG), and
    the AnalysisWarning texts."""
    import wandb
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as monkeypatch, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MLFLOW_STORE_NOTICE)
        uri = offline_trackers(monkeypatch, root)
        from mlflow import MlflowClient  # imported after offline_trackers: see there

        tensorboard = TensorBoardLogger(str(root), name="tb", version=0)
        wandb_logger = WandbLogger(save_dir=str(root), offline=True, project="lora_monitor")
        mlflow_logger = MLFlowLogger(
            experiment_name="lora_monitor", tracking_uri=uri, artifact_location=str(root / "mlflow-artifacts")
        )
        try:
            messages = fit_with(root, [tensorboard, wandb_logger, mlflow_logger])
        finally:
            # Lightning leaves the W&B run open: finishing writes the rest of its file (and
            # unsets wandb.run); teardown drops W&B's settings, which point at root.
            wandb.finish()
            wandb.teardown()
        events = read_events(tensorboard.log_dir)
        wandb_run = wandb_run_dir(root)
        client = MlflowClient(uri)
        run_id = mlflow_logger.run_id
        return {
            "tensorboard": (monitor_scalars(events), tensorboard_images(events)),
            # WandbLogger writes Lightning's step beside W&B's own counter (_step), which the
            # monitor's images and Lightning's own metrics both advance.
            "wandb": (wandb_scalars(wandb_run, "trainer/global_step"), wandb_images(wandb_run, "trainer/global_step")),
            "mlflow": (mlflow_scalars(client, run_id), mlflow_images(client, run_id, root / "mlflow-download")),
            "messages": messages,
        }


def test_wandb_and_mlflow_loggers_take_everything_without_a_warning(tracked):
    assert tracked["messages"] == []


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_logger_has_every_monitor_scalar_tensorboard_has(tracked, logger):
    expected, _ = tracked["tensorboard"]
    # What is compared: the suggestion and φ (from step 4 on, step 2 being the reference).
    assert expected[SUGGESTED_TAG].keys() == {2, 4}
    assert expected[PHI_TOP].keys() == {4}
    scalars, _ = tracked[logger]
    # The same tags at the same steps, the same values (TensorBoard keeps float32).
    assert_same_scalars(scalars, expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_logger_shows_every_image_tensorboard_shows(tracked, logger):
    _, expected = tracked["tensorboard"]
    # The overview at both snapshots, the heatmaps at step 4 only (step 2 is the reference).
    steps = {heatmap_tag(0): [4], heatmap_tag(1): [4], OVERVIEW_TAG: [2, 4]}
    assert {tag: sorted(series) for tag, series in expected.items()} == steps
    _, images = tracked[logger]
    assert_same_pixels(images, expected)
