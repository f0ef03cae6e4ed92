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

import io
import os
import time
from collections import OrderedDict
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
        add_png_image(self.writer, tag, image, step)

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


#: PNGs already encoded, by their pixels: a settled run logs the same overview at every snapshot.
_PNGS: OrderedDict[tuple[tuple[int, ...], bytes], bytes] = OrderedDict()
_PNG_CACHE_SIZE = 16


def png_bytes(image: np.ndarray) -> bytes:
    """``image`` (``(H, W, 3)`` uint8) as PNG, at zlib level 3: a third of the time of the level
    6 ``SummaryWriter.add_image`` uses, for files 3 % larger; an image encoded before (the
    overview, unchanged between snapshots) is not encoded again."""
    from PIL import Image  # matplotlib's own dependency: there whenever images are drawn

    pixels = np.ascontiguousarray(image)
    key = (pixels.shape, pixels.tobytes())
    encoded = _PNGS.get(key)
    if encoded is None:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
        encoded = _PNGS[key] = buffer.getvalue()
        if len(_PNGS) > _PNG_CACHE_SIZE:
            _PNGS.popitem(last=False)
    _PNGS.move_to_end(key)
    return encoded


def add_png_image(writer: Any, tag: str, image: np.ndarray, step: int) -> None:
    """``writer.add_image(tag, image, step, dataformats="HWC")`` with the PNG of :func:`png_bytes`:
    the same image summary, written through the writer's own file writer (``torch.utils.tensorboard``'s
    ``_get_file_writer``, as ``add_image`` does); a writer without one gets ``add_image``."""
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width, channels = image.shape
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png_bytes(image))
    file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)


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
