"""Writing a snapshot's scalars and images to whatever loggers the ``Trainer`` has.

TensorBoard is the first-class target (scalars and images); any other Lightning logger gets
the scalars through ``log_metrics``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger


def log_snapshot(
    loggers: Sequence[Logger],
    scalars: Mapping[str, float],
    images: Mapping[str, np.ndarray],
    step: int,
) -> None:
    """Give every logger what it can show: scalars to all, ``(H, W, 3)`` uint8 images to TensorBoard."""
    for logger in loggers:
        if scalars:
            logger.log_metrics(dict(scalars), step=step)
        if isinstance(logger, TensorBoardLogger):
            for tag, image in images.items():
                logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
