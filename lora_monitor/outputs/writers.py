"""Where the monitor writes: one small interface, :class:`Output`, and its framework-free
implementations.

The engine hands every output the same things — a snapshot's scalars and images, a Markdown
text, a TensorBoard custom-scalars layout — and each shows what it can:

- :class:`SummaryWriterOutput`: a ``torch.utils.tensorboard.SummaryWriter`` (scalars, the
  *Images* tab, the *Text* tab, the *Custom Scalars* tab);
- :class:`WandbOutput`: the active W&B run (``wandb.log``; images as ``wandb.Image``);
- :class:`MLflowOutput`: an MLflow run (``MlflowClient.log_batch``, ``log_image``, ``log_text``).

Lightning's loggers are outputs too (``lora_monitor.integrations.lightning_loggers``), so that
this module never imports Lightning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Output(Protocol):
    """What the engine writes to. Each method may do nothing for what an output cannot show."""

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image`` is ``(H, W, 3)`` uint8."""

    def text(self, tag: str, text: str, step: int) -> None:
        """``text`` is Markdown."""

    def layout(self, layout: dict[str, Any]) -> None:
        """A TensorBoard custom-scalars layout (``SummaryWriter.add_custom_scalars``)."""

    def flush(self) -> None: ...


class SummaryWriterOutput:
    """A TensorBoard ``SummaryWriter``: given (``writer=``) or opened on ``log_dir``.

    A writer this output opened is closed by :meth:`close`; a given one is only flushed.
    """

    def __init__(self, writer: Any = None, log_dir: Optional[str | os.PathLike] = None) -> None:
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
            self._owned = True
        else:
            self._owned = False
        self.writer = writer

    @property
    def log_dir(self) -> str:
        return self.writer.log_dir

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def layout(self, layout: dict[str, Any]) -> None:
        self.writer.add_custom_scalars(layout)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()

    def __repr__(self) -> str:
        return f"SummaryWriterOutput({self.log_dir!r})"


class TrackerOutput:
    """An experiment tracker's run (W&B, MLflow): it keeps what it is sent as it comes (nothing
    to flush) and has no custom-scalars layout (TensorBoard's own)."""

    def layout(self, layout: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def __repr__(self) -> str:
        return type(self).__name__


class WandbOutput(TrackerOutput):
    """The active W&B run (``wandb.run``), as transformers' ``WandbCallback`` leaves it."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        # transformers' WandbCallback logs with W&B's own step; a step axis of our own keeps
        # the two from fighting over it.
        self.run.log({**values, "train/global_step": step})

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(image), "train/global_step": step})

    def text(self, tag: str, text: str, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Html(f"<pre>{text}</pre>"), "train/global_step": step})


class MLflowOutput(TrackerOutput):
    """An MLflow run, by id: the one transformers' ``MLflowCallback`` opened. Written through
    ``MlflowClient``, so that the last snapshot, taken after that callback has ended the run,
    still lands in it instead of opening a new one."""

    def __init__(self, run_id: str, client: Any = None) -> None:
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient()
        self.client = client
        self.run_id = run_id

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), timestamp, step) for tag, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, key=tag, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:06d}.md")


def _each(outputs: Sequence[Output], write) -> list[str]:
    failures = []
    for output in outputs:
        # Whatever an output raises, the other outputs and the training run must go on: the
        # engine turns each failure into a warning (or an error with strict=True).
        try:
            write(output)
        except Exception as error:
            failures.append(f"{output!r}: {type(error).__name__}: {error}")
    return failures


def write_snapshot(
    outputs: Sequence[Output], scalars: Mapping[str, float], images: Mapping[str, np.ndarray], step: int
) -> list[str]:
    """Give every output a snapshot's scalars and images.

    Returns:
        One message per output that failed (a full disk, a log directory that cannot be
        written, a tracking server that went away), naming it and the error; the other outputs
        still got everything.
    """

    def write(output: Output) -> None:
        if scalars:
            output.scalars(scalars, step)
        for tag, image in images.items():
            output.image(tag, image, step)
        output.flush()

    return _each(outputs, write)


def write_text(outputs: Sequence[Output], tag: str, text: str, step: int) -> list[str]:
    """Give every output a Markdown text; failures as :func:`write_snapshot`."""
    return _each(outputs, lambda output: (output.text(tag, text, step), output.flush()))


def write_layout(outputs: Sequence[Output], layout: dict[str, Any]) -> list[str]:
    """Give every output the custom-scalars layout; failures as :func:`write_snapshot`."""
    return _each(outputs, lambda output: output.layout(layout))
