"""Writing a snapshot's scalars and images to whatever loggers the ``Trainer`` has.

Every logger gets the scalars through ``log_metrics``; images go where each logger can show them:

- ``TensorBoardLogger``: ``SummaryWriter.add_image``, the *Images* tab;
- ``CSVLogger``: PNG files ``<log_dir>/images/<tag>/step_<step:06d>.png``, e.g.
  ``lightning_logs/version_0/images/lora_monitor/phi_heatmaps/step_000050.png`` next to its
  ``metrics.csv``;
- ``WandbLogger``: ``WandbLogger.log_image`` (the run's media panel);
- ``MLFlowLogger``: ``MlflowClient.log_image`` with ``key`` and ``step`` (MLflow ≥ 2.12; older
  versions get an artifact ``<tag>/step_<step:06d>.png``);
- any other logger: scalars only.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

#: Writes one ``(H, W, 3)`` uint8 image under a tag at a step.
ImageWriter = Callable[[str, np.ndarray, int], None]


def image_path(log_dir: str | Path, tag: str, step: int) -> Path:
    """Where a :class:`CSVLogger` run's image ``tag`` of ``step`` is written as a PNG file."""
    return Path(log_dir) / "images" / tag / f"step_{step:06d}.png"


def _write_png(log_dir: str, tag: str, image: np.ndarray, step: int) -> None:
    path = image_path(log_dir, tag, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="png")


def _log_mlflow_image(logger: MLFlowLogger, tag: str, image: np.ndarray, step: int) -> None:
    client = logger.experiment
    if "key" in inspect.signature(client.log_image).parameters:
        client.log_image(logger.run_id, image, key=tag, step=step)
    else:  # MLflow < 2.12 has no image series: one artifact file per step
        client.log_image(logger.run_id, image, artifact_file=f"{tag}/step_{step:06d}.png")


def image_writer(logger: Logger) -> Optional[ImageWriter]:
    """How ``logger`` shows an image, or None if it cannot."""
    if isinstance(logger, TensorBoardLogger):
        return lambda tag, image, step: logger.experiment.add_image(
            tag, image, global_step=step, dataformats="HWC"
        )
    if isinstance(logger, CSVLogger):
        return lambda tag, image, step: _write_png(logger.log_dir, tag, image, step)
    if isinstance(logger, WandbLogger):
        return lambda tag, image, step: logger.log_image(key=tag, images=[image], step=step)
    if isinstance(logger, MLFlowLogger):
        return lambda tag, image, step: _log_mlflow_image(logger, tag, image, step)
    return None


def log_snapshot(
    loggers: Sequence[Logger],
    scalars: Mapping[str, float],
    images: Mapping[str, np.ndarray],
    step: int,
) -> list[str]:
    """Give every logger what it can show: scalars to all, ``(H, W, 3)`` uint8 images to those
    that display images (see the module docstring).

    Returns:
        One message per logger that failed (a full disk, a log directory that cannot be
        written, a tracking server that went away), naming the logger and the error; the other
        loggers still got everything.
    """
    failures = []
    for logger in loggers:
        writer = image_writer(logger)
        try:
            if scalars:
                logger.log_metrics(dict(scalars), step=step)
            if writer is not None:
                for tag, image in images.items():
                    writer(tag, image, step)
        # Whatever a logger raises, the other loggers and the training run must go on: the
        # caller turns each failure into a warning (or an error with strict=True).
        except Exception as error:
            failures.append(f"{type(logger).__name__}: {type(error).__name__}: {error}")
    return failures


def log_text(loggers: Sequence[Logger], tag: str, text: str, step: int) -> list[str]:
    """Give a Markdown text to the loggers that show one: ``SummaryWriter.add_text`` for
    TensorBoard (the *Text* tab renders Markdown tables); other loggers get nothing.

    Returns:
        One message per logger that failed, as :func:`log_snapshot`.
    """
    failures = []
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        try:
            logger.experiment.add_text(tag, text, global_step=step)
        except Exception as error:  # as in log_snapshot: a logging fault never ends training
            failures.append(f"{type(logger).__name__}: {type(error).__name__}: {error}")
    return failures
