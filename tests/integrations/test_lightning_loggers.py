"""lora_monitor.integrations.lightning_loggers: every logger gets what it can show. TensorBoard
scalars and images, CSV scalars and PNG files, W&B and MLflow (when installed) their own image
APIs, any other logger the scalars."""

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
from lora_monitor.outputs.tags import heatmap_tag, is_monitor_tag, scalar_tag
from tests.helpers.events import analysis_warnings, read_events
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora

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


def test_wandb_logger_gets_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lora_monitor")
    try:
        assert fit_with(tmp_path, [logger]) == []
    finally:
        logger.experiment.finish()
    run_dir = Path(logger.experiment.dir).parent
    # One image per drawn layer (step 4; step 2 is the reference), named by wandb's own step counter.
    media = run_dir / "files" / "media" / "images" / "lora_monitor.phi_heatmaps"
    for layer in (0, 1):
        images = sorted(media.glob(f"layer_{layer:02d}_*.png"))
        assert len(images) == 1
        assert decode_png(images[0].read_bytes()).shape[-1] in (3, 4)


def test_mlflow_logger_gets_images(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    # A local file store: no server, no database migrations (MLflow 3 asks for this opt-in).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLFlowLogger(experiment_name="lora_monitor", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    assert fit_with(tmp_path, [logger]) == []
    client = logger.experiment
    history = client.get_metric_history(logger.run_id, PHI_TOP)
    assert [m.step for m in history] == [4]
    artifacts = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    # MLflow names an image series' files <key with / as ~>+step+<step>+timestamp+...
    for layer in (0, 1):
        pngs = [
            path for path in artifacts if path.endswith(".png") and f"phi_heatmaps~layer_{layer:02d}+step+4+" in path
        ]
        assert len(pngs) == 1, artifacts
