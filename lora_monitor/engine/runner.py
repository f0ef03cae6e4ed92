"""Where a snapshot's analysis runs: :class:`AnalysisRunner`, one ``submit`` and ``results``.

Three ways, one interface: in the training thread; split across the ranks when several
processes train together (each analyses every ``world_size``-th module,
:meth:`AnalysisRunner.share`, and its snapshots hold that share only; the small results are
gathered on all); or in a worker thread (on a CUDA side stream on a GPU) while training goes
on. The caller submits a :class:`Job` at its step and collects :class:`Outcome` s, in order.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey
from lora_monitor.analysis import ModuleAnalysis, Snapshot, analyze
from lora_monitor.analysis.probe import ProbeReading
from lora_monitor.analysis.rank import RankRecommendation
from lora_monitor.analysis.snapshot import shapes_only
from lora_monitor.engine.background import Background
from lora_monitor.engine.distributed import RankContext, all_gather_objects, rank_share
from lora_monitor.engine.options import MonitorOptions
from lora_monitor.engine.references import References

Factors = dict[ModuleKey, LoRAFactors]


@dataclass(frozen=True)
class Job:
    """One snapshot to analyze, with what it is compared with (decided at its step) and the
    W₀ numbers of modules whose W₀ is sharded (summed over the ranks at its step)."""

    snapshot: Snapshot
    reference: Optional[Factors]
    reference_step: Optional[int]
    initial: Optional[Factors]
    base_results: dict[ModuleKey, dict[str, Tensor]] = field(default_factory=dict)
    #: The functional probe read at the snapshot's step (None: not read).
    probe: Optional[ProbeReading] = None


@dataclass
class Outcome:
    """What the analysis of one snapshot hands to the training thread, which reports and writes
    it: outputs (Lightning's CSVLogger among them) are not safe to call from another thread."""

    step: int
    #: None when the analysis failed.
    analyses: Optional[dict[ModuleKey, ModuleAnalysis]] = None
    probe: Optional[ProbeReading] = None
    #: The rank this snapshot suggests, decided once, on every rank (:data:`Recommend`); what
    #: is written renders it, and the end of training reuses it.
    recommendation: Optional[RankRecommendation] = None
    scalars: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    #: Warnings to give (errors with ``strict``), in the order they arose.
    problems: list[str] = field(default_factory=list)


def analyze_job(job: Job, options: MonitorOptions, references: References) -> Outcome:
    """The analyses of ``job``'s modules, and its problems (the analysis's own errors
    included: an analysis fault must never end a training run). Runs in whichever thread
    analyses; writes only the reference bases' cache."""
    step = job.snapshot.step
    outcome = Outcome(step, probe=job.probe)
    try:
        outcome.analyses = analyze(
            job.snapshot,
            job.reference,
            options.basis,
            initial=job.initial,
            intruder_top_k=options.intruder_top_k,
            reference_bases=references.bases_of(job.reference, job.snapshot),
            base_results=job.base_results,
        )
    except Exception as error:
        outcome.problems.append(f"step {step}: the analysis failed with {type(error).__name__}: {error}")
        return outcome
    for analysis in outcome.analyses.values():
        for problem in analysis.problems:
            layer, projection = analysis.key
            outcome.problems.append(f"step {step}, layer {layer} projection {projection!r}: {problem}; skipped")
    return outcome


#: Analyses a job's snapshot (or the part of it given): an outcome with analyses and problems.
Analyze = Callable[[Job], Outcome]
#: Decides an outcome's recommendation from its analyses and probe (on every rank, after the
#: analyses of a spread snapshot are gathered); it must collect its problems, never raise.
Recommend = Callable[[Outcome], None]
#: Fills an outcome's scalars and images from its analyses (on the process that writes).
Prepare = Callable[[Outcome, Job], None]


class AnalysisRunner:
    """Runs ``analyze`` then ``prepare`` for each submitted job, where it belongs.

    Args:
        analyze: the analysis of a job; it must collect its problems, never raise.
        recommend: decides the recommendation of an analyzed outcome.
        prepare: what is written for an outcome (scalars, figures); called only where
            ``writes``.
        rank_context: where the monitor runs; several ranks in one process group split a
            synchronous analysis.
        asynchronous: run in a worker thread; None: when the factors are on a CUDA device.
        writes: whether this process writes (global rank zero).
    """

    def __init__(
        self,
        analyze: Analyze,
        recommend: Recommend,
        prepare: Prepare,
        rank_context: RankContext,
        asynchronous: Optional[bool],
        writes: bool,
    ) -> None:
        self.analyze, self.recommend, self.prepare, self.rank_context = analyze, recommend, prepare, rank_context
        self.asynchronous, self.writes = asynchronous, writes
        self._done: deque[Outcome] = deque()
        #: The worker of an asynchronous runner, from its first job to :meth:`close`.
        self.background: Optional[Background[Outcome]] = None

    def share(self, factors: Factors) -> Optional[list[ModuleKey]]:
        """The modules of ``factors`` this rank analyzes where the analysis of a snapshot of
        them is spread over the ranks (every ``world_size``-th, :func:`rank_share`), so that
        its snapshot and references need hold no other; None where it analyzes them all."""
        if not factors or not self.rank_context.spreads_analysis or self._asynchronous(factors):
            return None
        return rank_share(factors, self.rank_context.rank, self.rank_context.world_size)

    def submit(self, job: Job) -> None:
        """Analyze ``job`` now (synchronous: every rank must call it, a collective when split,
        ``job.snapshot`` then holding this rank's :meth:`share`) or hand it to the worker."""
        if not self._asynchronous(job.snapshot.factors):
            self._done.append(self._spread(job) if self.rank_context.spreads_analysis else self._whole(job))
            return
        device = next(iter(job.snapshot.factors.values())).lora_A.device
        if self.background is None:
            self.background = Background(device)
        tensors = [
            tensor
            for factors in (job.snapshot.factors, job.reference or {}, job.initial or {})
            for f in factors.values()
            for tensor in (f.lora_A, f.lora_B, f.base_weight, f.magnitude, f.lora_E)
            if tensor is not None
        ]
        self.background.submit(lambda: self._whole(job), tensors)

    def results(self, wait: bool) -> Iterator[Outcome]:
        """The outcomes in submission order: all of them (``wait``), or those ready."""
        while self._done:
            yield self._done.popleft()
        if self.background is not None:
            yield from self.background.results(wait)

    def close(self) -> None:
        """Stop the worker (waiting for what runs); outcomes not collected are lost."""
        if self.background is not None:
            self.background.close()
            self.background = None

    def _whole(self, job: Job) -> Outcome:
        """The whole analysis, and what is written, in whichever thread runs it."""
        outcome = self.analyze(job)
        if outcome.analyses is not None:
            self.recommend(outcome)
            if self.writes:
                self.prepare(outcome, job)
        return outcome

    def _asynchronous(self, factors: Factors) -> bool:
        """Whether a snapshot of ``factors`` is analyzed in the worker: as asked, or where
        they are on a CUDA device."""
        if self.asynchronous is not None:
            return self.asynchronous
        if not factors:  # a share of no module (more ranks than modules): spread, not in a worker
            return False
        device: torch.device = next(iter(factors.values())).lora_A.device
        return device.type == "cuda"

    def _spread(self, job: Job) -> Outcome:
        """The analysis with the modules split across the ranks, every rank in the training
        thread (a collective), each analyzing the snapshot it holds: its :meth:`share`. All
        ranks get every analysis and every problem, so they keep the same state, and in strict
        mode they all stop at once instead of waiting for each other."""
        snapshot = job.snapshot
        own = (self.analyze(job), shapes_only(snapshot.factors), shapes_only(job.reference or {}))
        shares: list[tuple[Outcome, Factors, Factors]] = all_gather_objects(own)
        outcome = Outcome(snapshot.step, probe=job.probe, problems=[p for s, _, _ in shares for p in s.problems])
        analyzed = [s.analyses for s, _, _ in shares if s.analyses is not None]
        if analyzed:
            outcome.analyses = dict(sorted(item for analyses in analyzed for item in analyses.items()))
            self.recommend(outcome)
            if self.writes:
                # What is written describes every module, the other ranks' too: their shapes.
                described = dataclasses.replace(
                    job,
                    snapshot=Snapshot(snapshot.step, {k: f for _, shapes, _ in shares for k, f in shapes.items()}),
                    reference=None
                    if job.reference is None
                    else {k: f for _, _, shapes in shares for k, f in shapes.items()},
                )
                self.prepare(outcome, described)
        return outcome
