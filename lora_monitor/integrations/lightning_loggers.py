"""Lightning's loggers as outputs of the monitor: whatever loggers the ``Trainer`` has.

Every logger gets the scalars through ``log_metrics``; images go where each logger can show them:

- ``TensorBoardLogger``: an image summary, as ``SummaryWriter.add_image`` writes, the *Images* tab;
- ``CSVLogger``: PNG files ``<log_dir>/images/<tag>/step_<step:06d>.png``, e.g.
  ``lightning_logs/version_0/images/lora_monitor.phi_heatmaps/layer_00/step_000050.png`` next to its
  ``metrics.csv``;
- ``WandbLogger``: ``WandbLogger.log_image`` (the run's media panel);
- ``MLFlowLogger``: ``MlflowClient.log_image`` with ``key`` and ``step`` (MLflow ≥ 2.12; older
  versions get an artifact ``<tag>/step_<step:06d>.png``);
- any other logger: scalars only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lora_monitor.outputs.writers import add_png_image, png_bytes

#: Writes one ``(H, W, 3)`` uint8 image under a tag at a step.
ImageWriter = Callable[[str, np.ndarray, int], None]


def image_path(log_dir: str | Path, tag: str, step: int) -> Path:
    """Where a :class:`CSVLogger` run's image ``tag`` of ``step`` is written as a PNG file."""
    return Path(log_dir) / "images" / tag / f"step_{step:06d}.png"


def _write_png(log_dir: str, tag: str, image: np.ndarray, step: int) -> None:
    path = image_path(log_dir, tag, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))


def _log_mlflow_image(logger: MLFlowLogger, tag: str, image: np.ndarray, step: int) -> None:
    client = logger.experiment
    if "key" in inspect.signature(client.log_image).parameters:
        client.log_image(logger.run_id, image, key=tag, step=step)
    else:  # MLflow < 2.12 has no image series: one artifact file per step
        client.log_image(logger.run_id, image, artifact_file=f"{tag}/step_{step:06d}.png")


def image_writer(logger: Logger) -> Optional[ImageWriter]:
    """How ``logger`` shows an image, or None if it cannot."""
    if isinstance(logger, TensorBoardLogger):
        return lambda tag, image, step: add_png_image(logger.experiment, tag, image, step)
    if isinstance(logger, CSVLogger):
        return lambda tag, image, step: _write_png(logger.log_dir, tag, image, step)
    if isinstance(logger, WandbLogger):
        return lambda tag, image, step: logger.log_image(key=tag, images=[image], step=step)
    if isinstance(logger, MLFlowLogger):
        return lambda tag, image, step: _log_mlflow_image(logger, tag, image, step)
    return None


class LoggerOutput:
    """A Lightning logger as an :class:`~lora_monitor.outputs.Output`: scalars through
    ``log_metrics``, images where the logger shows them (see the module docstring), Markdown
    text and the custom-scalars layout on TensorBoard only."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self._image = image_writer(logger)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(values), step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self._image is not None:
            self._image(tag, image, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_text(tag, text, global_step=step)

    def layout(self, layout: dict[str, Any]) -> None:
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_custom_scalars(layout)

    def flush(self) -> None:
        pass  # Lightning flushes its loggers itself

    def __repr__(self) -> str:
        return type(self.logger).__name__


def logger_outputs(loggers: Sequence[Logger]) -> list[LoggerOutput]:
    return [LoggerOutput(logger) for logger in loggers]
