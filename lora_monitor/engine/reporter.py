"""Everything the monitor says, and to whom: :class:`Reporter`.

Its outputs (TensorBoard, loggers, W&B, MLflow), its warnings (errors in strict mode), the
console line, the custom-scalars layout, and what a snapshot writes. Only global rank zero
speaks: a reporter of another process holds no outputs and gives no warnings, so that the
rest of the engine never asks which process it is on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lora_monitor.adapters import LoRAMonitorError, ModuleKey
from lora_monitor.analysis import new_notes
from lora_monitor.analysis.rank import RankRecommendation
from lora_monitor.engine.options import MonitorOptions
from lora_monitor.engine.runner import Job, Outcome
from lora_monitor.outputs.rank_text import advice, report_markdown, summary_line
from lora_monitor.outputs.tags import (
    RECOMMENDATION_TAG,
    custom_scalars_layout,
    recommendation_scalars,
    snapshot_scalars,
)
from lora_monitor.outputs.writers import Output, SummaryWriterOutput, write_layout, write_snapshot, write_text


class AnalysisWarning(UserWarning):
    """A snapshot of a module could not be analyzed; training goes on (see ``strict``)."""


@dataclass
class OwnOutputs:
    """The outputs a monitor is given itself (``log_dir=``, ``writer=``, ``outputs=``), for
    when its front-end gives none: the ``SummaryWriter`` is opened on the first :meth:`open`,
    on the writing rank only."""

    log_dir: Optional[Union[str, os.PathLike]] = None
    writer: Any = None
    outputs: list[Output] = field(default_factory=list)

    def open(self) -> list[Output]:
        """The outputs, the ``SummaryWriter`` among them (opened once)."""
        if self.log_dir is not None or self.writer is not None:
            self.outputs.insert(0, SummaryWriterOutput(writer=self.writer, log_dir=self.log_dir))
            self.log_dir = self.writer = None
        return list(self.outputs)


class Reporter:
    """The monitor's voice.

    Args:
        options: the monitor's options (``strict``, ``log_images``, its name in messages).

    Until :meth:`bind` gives it outputs, it writes nothing and warns as global rank zero.
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        #: False on every process but global rank zero: no outputs, no warnings (errors in
        #: strict mode still are raised on every rank, so that all stop together).
        self.speaks = True
        self.outputs: list[Output] = []
        #: How the recommendation's summary line reaches the console (front-ends replace it).
        self.info: Callable[[str], None] = print
        #: The layers whose φ heatmaps are drawn.
        self.drawn_layers: list[int] = []
        #: The projections the φ heatmaps draw (None: every monitored one).
        self.drawn_projections: Optional[set[str]] = None
        #: The variants' notes (what an analysis leaves out, and why) already given: once each.
        self._notes_given: set[str] = set()
        self._layout_written = False

    def bind(self, outputs: Sequence[Output], speaks: bool) -> None:
        """Write to ``outputs`` from now on, if this process ``speaks``."""
        self.speaks = speaks
        self.outputs = list(outputs) if speaks else []

    # ------------------------------------------------------------------------ messages
    def warn(self, message: str) -> None:
        if self.speaks:
            warnings.warn(f"{self.options.owner}: {message}", AnalysisWarning, stacklevel=3)

    def report(self, message: str) -> None:
        """A problem of the analysis: an error in strict mode, else a warning."""
        if self.options.strict:
            raise LoRAMonitorError(f"{self.options.owner}: {message}")
        self.warn(message)

    @contextmanager
    def contained(self, what: str) -> Iterator[None]:
        """Drawing, writing and summarizing must not end a training run (unless strict)."""
        try:
            yield
        except LoRAMonitorError:
            raise  # already reported: only strict mode raises it from here
        except Exception as error:
            self.report(f"{what} failed with {type(error).__name__}: {error}")

    # -------------------------------------------------------------------------- writes
    def write_layout(self, keys: Sequence[ModuleKey]) -> None:
        """The custom-scalars layout, once per run."""
        if self._layout_written:
            return
        self._layout_written = True
        for failure in write_layout(self.outputs, custom_scalars_layout(sorted(keys), self.options.compares_runs)):
            self.report(f"could not write the custom-scalars layout to {failure}")

    def prepare(self, outcome: Outcome, job: Job) -> None:
        """Fill ``outcome``'s scalars and images from its analyses, in whichever thread ran
        them (reads only the options and the drawn layers). Failures become problems."""
        assert outcome.analyses is not None
        step = outcome.step
        try:
            outcome.scalars = snapshot_scalars(outcome.analyses, self.options.compares_runs)
            suggestion = outcome.recommendation  # decided once, rendered here
            if suggestion is not None:
                outcome.scalars.update(recommendation_scalars(suggestion))
            grids = {
                key: analysis.phi.numpy()
                for key, analysis in outcome.analyses.items()
                if analysis.phi is not None
                and key[0] in self.drawn_layers
                and (self.drawn_projections is None or key[1] in self.drawn_projections)
            }
        except Exception as error:
            outcome.problems.append(f"step {step}: logging the analysis failed with {type(error).__name__}: {error}")
            return
        if not self.options.log_images:
            return
        # A figure that cannot be drawn costs the image only: the scalars still go out.
        try:
            from lora_monitor.outputs.rendering import comparison_images  # matplotlib, on first use

            key = next(iter(grids), None)
            outcome.images = comparison_images(
                grids if job.reference is not None else {},
                basis=self.options.basis,
                reference_rank=job.reference[key].rank if key is not None and job.reference else 0,
                current_rank=job.snapshot.factors[key].rank if key is not None else 0,
                reference_step=job.reference_step,
                current_step=step,
                layers=self.drawn_layers,
                recommendation=suggestion,
            )
        except Exception as error:
            outcome.problems.append(f"step {step}: drawing the figures failed with {type(error).__name__}: {error}")

    def publish(self, outcome: Outcome) -> None:
        """In the training thread: report an outcome's problems and the notes not yet given,
        and write its scalars and images."""
        step = outcome.step
        for problem in outcome.problems:
            self.report(problem)
        if outcome.analyses is None:
            return
        for note in new_notes(outcome.analyses, self._notes_given):
            self.report(f"step {step}, {note}")
        with self.contained(f"step {step}: logging the analysis"):
            for failure in write_snapshot(self.outputs, outcome.scalars, outcome.images, step):
                self.report(f"step {step}: could not log to {failure}")

    def write_recommendation(self, recommendation: RankRecommendation, step: int) -> None:
        """The end-of-training report to the outputs; its summary line and what to do with it
        to the console."""
        if not self.speaks:
            return
        adapter_dir = self.options.adapter_dir
        for failure in write_text(self.outputs, RECOMMENDATION_TAG, report_markdown(recommendation, adapter_dir), step):
            self.report(f"step {step}: could not log the rank recommendation to {failure}")
        self.info(f"{self.options.owner}: {summary_line(recommendation)}")
        self.info(f"{self.options.owner}: what to do: {advice(recommendation, adapter_dir)}")

    def close(self) -> None:
        """Close the outputs the monitor opened (a writer it was given is only flushed)."""
        _close(self.outputs)


def _close(outputs: Sequence[Output]) -> None:
    for output in outputs:
        close: Optional[Callable[[], None]] = getattr(output, "close", None)
        if close is not None:
            close()
