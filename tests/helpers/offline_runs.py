"""Reading back what an offline W&B run and a local MLflow store hold, in the shape
:func:`tests.helpers.events.monitor_scalars` gives TensorBoard's: tag → step → value, and
tag → step → PNG bytes for images, so that each can be compared with the TensorBoard run.

W&B: wandb ≥ 0.31 no longer ships a Python reader of its run file (``run-<id>.wandb``; the
reader moved into the Go ``wandb-core``), so :func:`wandb_records` reads the file's format
itself: a 7-byte header (``":W&B"``, magic ``0xBEE1``, version 0), then LevelDB-log records in
32 KiB blocks (7-byte record header: CRC-32 of type byte + data, length, type full / first /
middle / last), each whole record a ``wandb_internal_pb2.Record``, decoded with wandb's own
protobuf class. Any other version fails loudly instead of reading nothing."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_monitor.outputs.tags import is_monitor_tag

#: MLflow's SQLite store, with SQLAlchemy ≥ 2.1, warns of a loader option it uses (its business,
#: not the monitor's): the message to filter.
MLFLOW_STORE_NOTICE = "The ``noload`` loader strategy is deprecated"

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_run_dir(wandb_dir: str | Path) -> Path:
    """The one offline run under ``<WANDB_DIR>/wandb``."""
    (run,) = sorted(Path(wandb_dir, "wandb").glob("offline-run-*"))
    return run


def wandb_records(run_dir: Path) -> Iterator[Any]:
    """Every record of the run's ``.wandb`` file, in order, as ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:_HEADER]) == (b":W&B", 0xBEE1, 0), f"unknown .wandb format: {data[:7]!r}"
    position, parts = _HEADER, []
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # too short for a record header: zero padding
            position += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if (checksum, length, kind) == (0, 0, 0):  # the zeroed rest of the last block
            break
        body = data[position + _HEADER : position + _HEADER + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad record at byte {position}"
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), kind
        position += _HEADER + length
        parts.append(body)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history(run_dir: Path) -> list[dict[tuple[str, ...], Any]]:
    """The rows of the run's history (one per ``run.log``): key path → value, e.g.
    ``("LoRA_rank/suggested.model",) → 4`` or ``("LoRA_rank/overview", "_type") → "images/separated"``."""
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {tuple(item.nested_key) or (item.key,): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def _unique(series: dict[int, Any], tag: str, step: int, value: Any) -> None:
    # A second value at a step would make "the value at that step" ambiguous: fail instead.
    assert step not in series, f"{tag} logged twice at step {step}"
    series[step] = value


def wandb_scalars(run_dir: Path, step_key: str) -> dict[str, dict[int, float]]:
    """tag → step (the value of ``step_key`` in the same row) → value, of the monitor's scalars."""
    scalars: dict[str, dict[int, float]] = {}
    for row in wandb_history(run_dir):
        for key, value in row.items():
            if len(key) == 1 and is_monitor_tag(key[0]) and isinstance(value, (int, float)):
                _unique(scalars.setdefault(key[0], {}), key[0], row[(step_key,)], float(value))
    return scalars


def wandb_images(run_dir: Path, step_key: str) -> dict[str, dict[int, bytes]]:
    """tag → step → PNG bytes of every image the run's media panel shows (``run-dir/files``)."""
    images: dict[str, dict[int, bytes]] = {}
    for row in wandb_history(run_dir):
        for key, kind in row.items():
            if len(key) != 2 or key[1] != "_type":
                continue
            tag = key[0]
            if kind == "images/separated":  # WandbLogger.log_image: a list of images
                (file,) = row[(tag, "filenames")]
            elif kind == "image-file":  # run.log({tag: wandb.Image(...)})
                file = row[(tag, "path")]
            else:
                continue
            _unique(images.setdefault(tag, {}), tag, row[(step_key,)], (run_dir / "files" / file).read_bytes())
    return images


def wandb_files(run_dir: Path, tag: str, kind: str) -> list[Path]:
    """The media files logged under ``tag`` whose W&B type is ``kind`` (e.g. ``"html-file"``)."""
    rows = wandb_history(run_dir)
    return [run_dir / "files" / row[(tag, "path")] for row in rows if row.get((tag, "_type")) == kind]


def mlflow_scalars(client: Any, run_id: str) -> dict[str, dict[int, float]]:
    """tag → step → value of the monitor's metrics in an MLflow run."""
    scalars: dict[str, dict[int, float]] = {}
    for tag in client.get_run(run_id).data.metrics:
        if is_monitor_tag(tag):
            series = scalars[tag] = {}
            for metric in client.get_metric_history(run_id, tag):
                _unique(series, tag, metric.step, metric.value)
    return scalars


def mlflow_images(client: Any, run_id: str, download_to: Path) -> dict[str, dict[int, bytes]]:
    """tag → step → PNG bytes of the run's image series (``MlflowClient.log_image(key=, step=)``),
    whose artifacts MLflow names ``images/<tag, / as ~>+step+<step>+timestamp+<ms>+<uuid>.png``
    (beside a ``+compressed.webp`` thumbnail for its UI)."""
    local = Path(client.download_artifacts(run_id, "images", str(download_to)))
    images: dict[str, dict[int, bytes]] = {}
    for path in sorted(local.glob("*.png")):
        key, rest = path.stem.split("+step+")
        tag = key.replace("~", "/")
        _unique(images.setdefault(tag, {}), tag, int(rest.split("+")[0]), path.read_bytes())
    return images


def tensorboard_images(events: EventAccumulator) -> dict[str, dict[int, bytes]]:
    """tag → step → PNG bytes of every image of a TensorBoard run."""
    images: dict[str, dict[int, bytes]] = {}
    for tag in events.Tags()["images"]:
        for event in events.Images(tag):
            _unique(images.setdefault(tag, {}), tag, event.step, event.encoded_image_string)
    return images


def tensorboard_text(events: EventAccumulator, tag: str) -> dict[int, str]:
    """step → the Markdown text of a TensorBoard text tag."""
    return {event.step: event.tensor_proto.string_val[0].decode() for event in events.Tensors(f"{tag}/text_summary")}


def assert_same_pixels(got: dict[str, dict[int, bytes]], expected: dict[str, dict[int, bytes]]) -> None:
    """The same image tags, each at the same steps, with identical pixels (PNG bytes may differ)."""
    got_steps = {tag: sorted(series) for tag, series in got.items()}
    expected_steps = {tag: sorted(series) for tag, series in expected.items()}
    assert got_steps == expected_steps, f"images at {got_steps}, expected at {expected_steps}"
    for tag, series in expected.items():
        for step, png in series.items():
            np.testing.assert_array_equal(_pixels(got[tag][step]), _pixels(png), err_msg=f"{tag}, step {step}")


def _pixels(png: bytes) -> np.ndarray:
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def offline_trackers(monkeypatch: Any, root: Path) -> str:
    """Point W&B (offline) and MLflow (SQLite) at ``root`` for the rest of a test, keep both out
    of ``~`` and quiet; the MLflow tracking URI to pass on. ``monkeypatch`` undoes all of it but
    W&B's own settings: end the test with ``wandb.finish(); wandb.teardown()``."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": root,  # <root>/wandb/offline-run-*
        "WANDB_CONFIG_DIR": root / "wandb-config",  # instead of ~/.config/wandb
        "WANDB_CACHE_DIR": root / "wandb-cache",  # instead of ~/.cache/wandb
        "WANDB_DATA_DIR": root / "wandb-data",
        "WANDB_ARTIFACT_DIR": root / "wandb-artifacts",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",  # no copy of the test's output into the run
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_X_DISABLE_STATS": "true",  # no system-metrics sampling
        "WANDB_X_DISABLE_MACHINE_INFO": "true",
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",  # else importing mlflow writes ~/.config/mlflow/telemetry.json
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, str(value))
    # mlflow is imported here, after MLFLOW_DISABLE_TELEMETRY, and by callers after this call:
    # its first import writes ~/.config/mlflow/telemetry.json unless telemetry is disabled.
    import mlflow
    import wandb

    # W&B reads the environment once per process, at its first run: forget an earlier test's
    # settings (its WANDB_DIR above all). The test ends with wandb.teardown() in turn.
    wandb.teardown()

    # mlflow.set_tracking_uri (which Lightning's MLFlowLogger and transformers' MLflowCallback
    # call) sets a process-wide URI that outlives the test and wins over the variable: start
    # from none and have monkeypatch put the earlier one back afterwards.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    return uri
