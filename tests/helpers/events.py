"""Reading back what the monitor wrote (TensorBoard event files, as TensorBoard itself reads
them) and what it said (its warnings)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_monitor.engine.reporter import AnalysisWarning
from lora_monitor.outputs.tags import is_monitor_tag


def read_events(log_dir: str | Path) -> EventAccumulator:
    """Every scalar, image and tensor (text) of a TensorBoard log directory, none sampled away."""
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalar_series(events: EventAccumulator, tag: str) -> dict[int, float]:
    """step → value of one scalar tag (a later value at the same step wins)."""
    return {event.step: event.value for event in events.Scalars(tag)}


def logged_steps(events: EventAccumulator, tag: str) -> set[int]:
    """The steps a scalar tag was written at; none where the tag was never written."""
    return {e.step for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else set()


def monitor_scalars(
    events: EventAccumulator, selected: Callable[[str], bool] = is_monitor_tag
) -> dict[str, dict[int, float]]:
    """tag → step → value of every scalar tag ``selected`` keeps (by default the monitor's)."""
    return {tag: scalar_series(events, tag) for tag in events.Tags()["scalars"] if selected(tag)}


def scalar_values(events: EventAccumulator, prefix: str = "lora_monitor") -> dict[str, dict[int, float]]:
    """tag → {step: value} of every scalar under ``prefix``; each step must appear once."""
    values: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            series = [(event.step, event.value) for event in events.Scalars(tag)]
            steps = [step for step, _ in series]
            assert len(steps) == len(set(steps)), f"{tag} written twice at a step: {steps}"
            values[tag] = dict(series)
    return values


def run_dirs(output_dir: Path) -> list[Path]:
    """The TensorBoard run directories a transformers ``Trainer`` wrote under ``<output_dir>/runs``."""
    return sorted(p for p in (output_dir / "runs").iterdir() if p.is_dir())


def analysis_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The texts of the :class:`~lora_monitor.AnalysisWarning` among ``caught`` warnings."""
    return [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]


def assert_same_scalars(
    got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], rel: float, abs: float
) -> None:
    """The same tags, each at the same steps, with values equal to ``rel`` / ``abs``."""
    import pytest

    assert got.keys() == expected.keys()
    for tag, series in expected.items():
        assert got[tag].keys() == series.keys(), tag
        for step, value in series.items():
            assert got[tag][step] == pytest.approx(value, rel=rel, abs=abs), (tag, step)
