"""The Lightning side: :class:`LoRASubspaceMonitor`, which snapshots, analyses and logs."""

from __future__ import annotations

import contextlib
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lora_monitor.adapters import (
    LoRAFactors,
    LoRAMonitorError,
    ModuleKey,
    check_reference_compatible,
    find_lora_factors,
    load_adapter,
    select_factors,
)
from lora_monitor.background import Background
from lora_monitor.distributed import (
    all_gather_objects,
    analysis_is_spread,
    full_factors,
    gathered_lora_parameters,
    rank_share,
)
from lora_monitor.functional import BASES, Basis
from lora_monitor.loggers import log_snapshot, log_text
from lora_monitor.plots import comparison_symbols, phi_image
from lora_monitor.recommend import RankRecommendation, recommend_rank
from lora_monitor.snapshots import ModuleAnalysis, ReferenceBases, Snapshot, analyze
from lora_monitor.tags import IMAGE_TAG, RECOMMENDATION_TAG, snapshot_scalars

class AnalysisWarning(UserWarning):
    """A snapshot of a module could not be analysed; training goes on (see ``strict``)."""


@dataclass
class _Outcome:
    """What the analysis of one snapshot hands to the training thread, which reports and logs
    it: loggers (Lightning's CSVLogger among them) are not safe to call from another thread."""

    step: int
    #: None when the analysis failed.
    analyses: Optional[dict[ModuleKey, ModuleAnalysis]] = None
    scalars: dict[str, float] = field(default_factory=dict)
    image: Optional[np.ndarray] = None
    #: Warnings to give (errors with ``strict``), in the order they arose.
    problems: list[str] = field(default_factory=list)


def default_layers(layer_indices: Sequence[int], count: int = 4) -> list[int]:
    """``count`` layers spread evenly over depth, first and last included (paper: 1/32/64/96)."""
    ordered = sorted(set(layer_indices))
    positions = np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int)
    return [ordered[p] for p in dict.fromkeys(positions.tolist())]


class LoRASubspaceMonitor(Callback):
    r"""Watch the low-rank updates ΔW = s·B·A of a peft LoRA model while it trains.

    Every ``every_n_steps`` optimizer steps, and once at the end of fit, the monitor copies the
    LoRA factors of the monitored projections (only the factors, never ΔW), computes on the
    model's device the normalized subspace similarity of the LoRA paper (Hu et al. 2021, §7)

    .. math:: \phi(X, Y, i, j) = \|U_X^{i\top} U_Y^{j}\|_F^2 / \min(i, j)

    between a reference X and the current update Y, and logs it to every logger of the
    ``Trainer``.

    Args:
        every_n_steps: snapshot period, in optimizer steps (``trainer.global_step``).
        reference: what the current update is compared with: ``"first"`` — the first snapshot
            of the run; ``"previous"`` — the snapshot before; or the path of an adapter
            directory written by peft's ``save_pretrained`` (another rank or seed), whose shapes
            are checked layer by layer at setup.
        target_modules: which projections to monitor: canonical names ``"q"``, ``"k"``,
            ``"v"``, ``"o"`` (matching ``q_proj``, ``query``, GPT-2's fused ``c_attn``, ...)
            or a module's own name, as in peft's ``LoraConfig.target_modules``.
        layers: layer indices drawn in the heatmap figure; scalars are logged for every
            monitored layer. Default: four layers spread over depth, like the paper's
            1/32/64/96.
        basis: the singular vectors φ is computed in: ``"A"`` (right singular vectors of
            ``lora_A``, the paper's choice), ``"B"`` (left singular vectors of ``lora_B``),
            ``"delta_w_left"`` or ``"delta_w_right"`` (of ΔW itself).
        adapter_name: the peft adapter to monitor; default the active one.
        log_images: draw and log the heatmap figure (scalars are always logged).
        strict: raise instead of warning when a snapshot cannot be analysed (for tests and CI).
            Errors in the configuration are raised at setup either way.
        intruder_top_k: count the intruder dimensions (Shuttleworth et al. 2024) among the top
            ``intruder_top_k`` singular vectors of W₀ + ΔW. Off (None) by default: it takes two
            dense SVDs, of W₀ and of W₀ + ΔW, per module and snapshot.
        asynchronous: analyse and draw each snapshot in a worker thread (on a CUDA side stream
            when the factors are on a GPU) while training goes on, instead of inside the
            training step. The snapshot itself is still copied at its step; its scalars and
            image are logged from the training thread at a later hook, under its own step, and
            everything is logged (and :attr:`latest_analysis`, :attr:`recommendation` final)
            when fit returns. Default (None): on when the monitored factors are on a CUDA
            device, off otherwise.

    With several processes (DDP, FSDP, DeepSpeed), every rank takes each snapshot. A
    synchronous analysis is split across the ranks — each analyses every ``world_size``-th
    module and the small results are gathered on all of them — and only global rank zero draws
    and logs. An asynchronous one runs whole on every rank, in each rank's worker thread
    (collectives from a second thread could interleave with the training step's own).

    Logged, for each snapshot at step ``trainer.global_step``:

    - ``lora_monitor/phi_heatmaps`` (image, TensorBoard): one grid figure, a row per drawn
      layer and a column per projection, of φ(reference, current, i, j) with i (reference)
      on the vertical axis and j (current) on the horizontal one, colour scale 0..1; when the
      reference has the smaller rank, a zoom on i, j ≤ r_ref with the cells j > i masked.
    - ``lora_monitor/delta_w_norm/layer_<L>.<p>``: ‖ΔW‖_F of layer L, projection p.
    - ``lora_monitor/sigma_max/layer_<L>.<p>``: the top singular value of ΔW.
    - ``lora_monitor/phi_top/layer_<L>.<p>``: φ(1, 1), how well the reference's top direction
      is aligned with the current top direction.
    - ``lora_monitor/phi_mean/layer_<L>.<p>``: the mean of φ(i, i) for i up to the smaller of
      the two ranks: how much the top-i subspaces agree, on average over i.
    - ``lora_monitor/shared_directions/layer_<L>.<p>``: the number of top directions shared
      with the reference clearly above the level of random subspaces
      (:func:`lora_monitor.functional.shared_directions` gives the precise rule).
    - ``lora_monitor/energy_rank/layer_<L>.<p>``, ``effective_rank``, ``stable_rank``: of ΔW's
      spectrum: the smallest k holding 90 % of ‖ΔW‖_F², exp(entropy of σ/Σσ) (Roy & Vetterli),
      ‖ΔW‖_F²/σ₁².
    - ``lora_monitor/amplification/layer_<L>.<p>``: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F (the paper's §7.3),
      and ``delta_w_relative_norm``: ‖ΔW‖_F / ‖W₀‖_F; both need the live W₀ (not quantized).
    - ``lora_monitor/a_init_similarity/layer_<L>.<p>``: φ(A₀, A, r, r), how much of A's row space
      is still its value before the first optimizer step (from a fresh start only).
    - ``lora_monitor/intruder_dimensions/layer_<L>.<p>``: with ``intruder_top_k``.
    - ``lora_monitor/rank_recommendation`` (text, TensorBoard), at the end of fit: the suggested
      LoRA rank with its evidence (:func:`lora_monitor.recommend.recommend_rank`); the summary
      line also goes to the console (rank zero). Kept as :attr:`recommendation`.

    No ``phi_*`` scalars and no image are logged for the first snapshot of a run with
    ``reference="first"`` or ``"previous"`` (there is nothing to compare with yet).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from lora_monitor import LoRASubspaceMonitor
        >>> monitor = LoRASubspaceMonitor(every_n_steps=50, reference="first")
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=TensorBoardLogger("runs"))
        >>> # trainer.fit(module)  # module holds a peft LoRA model anywhere inside it
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        reference: Union[Literal["first", "previous"], str, os.PathLike] = "first",
        target_modules: Sequence[str] = ("q", "v"),
        layers: Optional[Sequence[int]] = None,
        basis: Basis = "A",
        adapter_name: Optional[str] = None,
        log_images: bool = True,
        strict: bool = False,
        intruder_top_k: Optional[int] = None,
        asynchronous: Optional[bool] = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise MisconfigurationException(
                f"LoRASubspaceMonitor: every_n_steps must be a positive integer, got {every_n_steps!r}"
            )
        if not isinstance(reference, (str, os.PathLike)) or str(reference) == "":
            raise MisconfigurationException(
                "LoRASubspaceMonitor: reference must be 'first', 'previous' or the path of an "
                f"adapter directory saved with save_pretrained, got {reference!r}"
            )
        if isinstance(target_modules, str):
            target_modules = (target_modules,)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise MisconfigurationException(
                "LoRASubspaceMonitor: target_modules must be a non-empty list of projection names "
                f"such as ['q', 'v'] or ['q_proj', 'gate_proj'], got {target_modules!r}"
            )
        if layers is not None and (
            not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            raise MisconfigurationException(
                f"LoRASubspaceMonitor: layers must be a non-empty list of layer indices, got {layers!r}"
            )
        if basis not in BASES:
            raise MisconfigurationException(
                f"LoRASubspaceMonitor: basis must be one of {', '.join(map(repr, BASES))}, got {basis!r}"
            )
        if intruder_top_k is not None and (
            isinstance(intruder_top_k, bool) or not isinstance(intruder_top_k, int) or intruder_top_k < 1
        ):
            raise MisconfigurationException(
                "LoRASubspaceMonitor: intruder_top_k must be None (off) or a positive number of "
                f"singular vectors to check, such as 10; got {intruder_top_k!r}"
            )
        if asynchronous is not None and not isinstance(asynchronous, bool):
            raise MisconfigurationException(
                "LoRASubspaceMonitor: asynchronous must be True, False or None (on when the LoRA "
                f"factors are on a CUDA device), got {asynchronous!r}"
            )
        self.every_n_steps = every_n_steps
        self.reference = reference if reference in ("first", "previous") else Path(reference)
        self.target_modules = tuple(target_modules)
        self.layers = list(layers) if layers is not None else None
        self.basis = basis
        self.adapter_name = adapter_name
        self.log_images = log_images
        self.strict = strict
        self.intruder_top_k = intruder_top_k
        self.asynchronous = asynchronous

        self._reference_factors: Optional[dict[ModuleKey, LoRAFactors]] = None
        self._drawn_layers: list[int] = []
        self._first: Optional[Snapshot] = None
        #: The reference factors the cached bases were computed from, and the bases.
        self._reference_bases: Optional[tuple[dict[ModuleKey, LoRAFactors], ReferenceBases]] = None
        self._previous: Optional[Snapshot] = None
        self._last_step: Optional[int] = None
        # The factors before the first optimizer step: is A still its random initialization?
        self._initial: Optional[Snapshot] = None
        #: The worker of an asynchronous monitor, from its first snapshot to the end of fit.
        self._background: Optional[Background[_Outcome]] = None
        #: The analysis of the latest snapshot, ``(layer, projection) → ModuleAnalysis``.
        self.latest_analysis: dict[ModuleKey, ModuleAnalysis] = {}
        #: The rank suggested at the end of fit from the latest analysis (None before).
        self.recommendation: Optional[RankRecommendation] = None

    @property
    def state_key(self) -> str:
        # Two monitors in one Trainer (say one against "first", one against a directory) must
        # not overwrite each other's state in the checkpoint.
        return self._generate_state_key(
            reference=str(self.reference),
            basis=self.basis,
            target_modules=self.target_modules,
            adapter_name=self.adapter_name,
        )

    # ----------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `LoRASubspaceMonitor` callback with `Trainer` that has no logger: "
                "pass e.g. `logger=TensorBoardLogger('runs')`."
            )
        monitored = self._monitored_factors(pl_module)
        layer_indices = sorted({layer for layer, _ in monitored})
        if self.layers is not None:
            select_factors(monitored, None, self.layers)  # raises if an entry matches nothing
            self._drawn_layers = list(self.layers)
        else:
            self._drawn_layers = default_layers(layer_indices)
        if isinstance(self.reference, Path):
            saved = load_adapter(self.reference)
            check_reference_compatible(monitored, saved.factors, self.basis)
            projections = {projection for _, projection in monitored}
            reference_layers = sorted({layer for layer, p in saved.factors if p in projections})
            if reference_layers != layer_indices:
                raise LoRAMonitorError(
                    f"the reference adapter {self.reference} has LoRA modules in layers "
                    f"{reference_layers} but the model in layers {layer_indices}: it was trained on a "
                    f"base model with more layers; compare adapters of the same base model (and the "
                    f"same LoraConfig(layers_to_transform=...))"
                )
            self._reference_factors = {key: saved.factors[key] for key in monitored}
            self._check_reference_analysable()
        if self.basis == "A" and any(f.module_name.endswith("c_attn") for f in monitored.values()):
            rank_zero_warn(
                "LoRASubspaceMonitor: q, k and v of a fused c_attn share one lora_A, so basis='A' "
                "cannot tell them apart; use basis='delta_w_left' or 'delta_w_right'.",
                category=AnalysisWarning,
            )

    def _check_reference_analysable(self) -> None:
        # A reference that cannot be analysed would warn at every snapshot of every module:
        # the user must fix it, so say it once, before training.
        alone = analyze(Snapshot(step=0, factors=self._reference_factors), None, self.basis)
        problems = [
            f"layer {layer} projection {projection!r}: {'; '.join(analysis.problems)}"
            for (layer, projection), analysis in sorted(alone.items())
            if analysis.problems
        ]
        if problems:
            raise LoRAMonitorError(
                f"the reference adapter {self.reference} cannot be compared in basis "
                f"{self.basis!r}: {', '.join(problems)}. An adapter saved before training has "
                f"lora_B = 0 (peft's initialization): save it after training, or use basis='A'; "
                f"NaN or Inf come from a run that diverged"
            )

    def _monitored_factors(self, pl_module: pl.LightningModule) -> dict[ModuleKey, LoRAFactors]:
        factors = find_lora_factors(pl_module, self.adapter_name)
        return select_factors(factors, self.target_modules, None)

    # ---------------------------------------------------------------------------- schedule
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step > 0 and step % self.every_n_steps == 0 and step != self._last_step
        # A snapshot waits for the one before it: a worker slower than every_n_steps steps then
        # slows training down, rather than piling snapshots up in memory.
        self._collect(trainer, wait=due)
        if due:
            self._take_snapshot(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and self._initial is None:
            self._initial = Snapshot.capture(self._monitored_factors(pl_module), 0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._take_snapshot(trainer, pl_module)
        # Every snapshot is logged when fit returns, and the recommendation reads the last one.
        self._collect(trainer, wait=True)
        if self.latest_analysis:
            with self._contained(f"step {trainer.global_step}: the rank recommendation"):
                self._recommend(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception. What was analysed is still logged,
        # but the error that stops fit must stay the one raised.
        with contextlib.suppress(LoRAMonitorError):
            self._collect(trainer, wait=True)
        self._close_background()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_background()

    def _collect(self, trainer: pl.Trainer, wait: bool) -> None:
        """Report and log the analyses the worker finished (all of them if ``wait``)."""
        if self._background is not None:
            for outcome in self._background.results(wait):
                self._publish(trainer, outcome)

    def _close_background(self) -> None:
        if self._background is not None:
            self._background.close()
            self._background = None

    # ---------------------------------------------------------------------------- analysis
    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        try:
            # Every rank gets here: sharded strategies gather the LoRA factors collectively.
            with gathered_lora_parameters(trainer, pl_module):
                snapshot = Snapshot.capture(full_factors(self._monitored_factors(pl_module)), step)
        except LoRAMonitorError as error:  # e.g. the adapter was merged or unloaded mid-run
            self._report(f"step {step}: no snapshot taken: {error}")
            return
        # What the snapshot is compared with is decided here, at its step, whether it is then
        # analysed here or in the worker: checkpoints and resume see only this thread's state.
        reference, reference_step = self._reference_for(snapshot)
        if step % self.every_n_steps == 0:
            # The end-of-fit snapshot off the schedule is compared but never becomes the
            # reference: a run stopped there and resumed must compare with what an
            # uninterrupted run compares with.
            self._remember(snapshot)
        initial = self._initial.factors if self._initial is not None else None
        work = functools.partial(
            self._analyse, snapshot, reference, reference_step, initial, trainer.is_global_zero
        )
        device = next(iter(snapshot.factors.values())).lora_A.device
        if not (self.asynchronous if self.asynchronous is not None else device.type == "cuda"):
            if analysis_is_spread(trainer):
                outcome = self._analyse_spread(trainer, snapshot, reference, reference_step, initial)
            else:
                outcome = work()
            self._publish(trainer, outcome)
            return
        if self._background is None:
            self._background = Background(device)
        tensors = [
            tensor
            for factors in (snapshot.factors, reference or {}, initial or {})
            for f in factors.values()
            for tensor in (f.lora_A, f.lora_B, f.base_weight)
            if tensor is not None
        ]
        self._background.submit(work, tensors)

    def _analyse(
        self,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
        initial: Optional[dict[ModuleKey, LoRAFactors]],
        logs: bool,
    ) -> _Outcome:
        """Analyse ``snapshot`` and, if this rank ``logs``, draw its figure: in whichever thread
        runs it.

        Reads only its arguments and what setup fixed, and writes only the cache of the
        reference's bases, which no other thread touches. Problems are collected, not reported.
        """
        outcome = self._analyse_modules(snapshot, reference, initial)
        if logs:
            self._prepare_logs(outcome, snapshot, reference, reference_step)
        return outcome

    def _analyse_spread(
        self,
        trainer: pl.Trainer,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
        initial: Optional[dict[ModuleKey, LoRAFactors]],
    ) -> _Outcome:
        """:meth:`_analyse` with the modules split across the ranks, every rank in the training
        thread (a collective). All ranks get every analysis and every problem, so they keep the
        same state, and in strict mode they all stop at once instead of waiting for each other."""
        keys = rank_share(snapshot.factors, trainer.global_rank, trainer.world_size)
        share = Snapshot(step=snapshot.step, factors={key: snapshot.factors[key] for key in keys})
        shares: list[_Outcome] = all_gather_objects(self._analyse_modules(share, reference, initial))
        outcome = _Outcome(snapshot.step, problems=[problem for s in shares for problem in s.problems])
        analysed = [s.analyses for s in shares if s.analyses is not None]
        if analysed:
            outcome.analyses = dict(sorted(item for analyses in analysed for item in analyses.items()))
            if trainer.is_global_zero:
                self._prepare_logs(outcome, snapshot, reference, reference_step)
        return outcome

    def _analyse_modules(
        self,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        initial: Optional[dict[ModuleKey, LoRAFactors]],
    ) -> _Outcome:
        """The analyses of ``snapshot``'s modules, and its problems (the analysis's own errors
        included: an analysis fault must never end a training run)."""
        step = snapshot.step
        outcome = _Outcome(step)
        try:
            outcome.analyses = analyze(
                snapshot,
                reference,
                self.basis,
                initial=initial,
                intruder_top_k=self.intruder_top_k,
                reference_bases=self._bases_of(reference, snapshot),
            )
        except Exception as error:
            outcome.problems.append(f"step {step}: the analysis failed with {type(error).__name__}: {error}")
            return outcome
        for analysis in outcome.analyses.values():
            for problem in analysis.problems:
                layer, projection = analysis.key
                outcome.problems.append(f"step {step}, layer {layer} projection {projection!r}: {problem}; skipped")
        return outcome

    def _prepare_logs(
        self,
        outcome: _Outcome,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
    ) -> None:
        """Fill ``outcome``'s scalars and image from its analyses (if it has any)."""
        if outcome.analyses is None:
            return
        step = snapshot.step
        try:
            outcome.scalars = snapshot_scalars(outcome.analyses)
            grids = {
                key: a.phi.numpy()
                for key, a in outcome.analyses.items()
                if a.phi is not None and key[0] in self._drawn_layers
            }
        except Exception as error:
            outcome.problems.append(f"step {step}: logging the analysis failed with {type(error).__name__}: {error}")
            return
        if self.log_images and reference is not None and grids:
            # A figure that cannot be drawn costs the image only: the scalars still go out.
            try:
                outcome.image = self._render(grids, snapshot, reference, reference_step)
            except Exception as error:
                outcome.problems.append(
                    f"step {step}: drawing the heatmaps failed with {type(error).__name__}: {error}"
                )

    def _publish(self, trainer: pl.Trainer, outcome: _Outcome) -> None:
        """In the training thread: keep, report and log what :meth:`_analyse` produced."""
        if outcome.analyses is not None:
            self.latest_analysis = outcome.analyses
        for problem in outcome.problems:
            self._report(problem)
        if outcome.analyses is None or not trainer.is_global_zero:
            return
        step = outcome.step
        with self._contained(f"step {step}: logging the analysis"):
            images = {IMAGE_TAG: outcome.image} if outcome.image is not None else {}
            for failure in log_snapshot(trainer.loggers, outcome.scalars, images, step):
                self._report(f"step {step}: could not log to {failure}")

    @contextmanager
    def _contained(self, what: str) -> Iterator[None]:
        """Drawing, writing and summarizing must not end a training run either (unless strict)."""
        try:
            yield
        except LoRAMonitorError:
            raise  # already reported: only strict mode raises it from here
        except Exception as error:
            self._report(f"{what} failed with {type(error).__name__}: {error}")

    def _bases_of(
        self, reference: Optional[dict[ModuleKey, LoRAFactors]], snapshot: Snapshot
    ) -> Optional[ReferenceBases]:
        # "first" and an adapter directory never change: decompose them once, not per snapshot.
        if reference is None or self.reference == "previous":
            return None
        if self._reference_bases is None or self._reference_bases[0] is not reference:
            self._reference_bases = (reference, ReferenceBases.compute(reference, snapshot.factors, self.basis))
        return self._reference_bases[1]

    def _reference_for(self, snapshot: Snapshot) -> tuple[Optional[dict[ModuleKey, LoRAFactors]], Optional[int]]:
        if self._reference_factors is not None:
            return self._reference_factors, None
        earlier = self._first if self.reference == "first" else self._previous
        if earlier is None:
            return None, None
        return earlier.factors, earlier.step

    def _remember(self, snapshot: Optional[Snapshot]) -> None:
        # Only what "first"/"previous" need is kept: the history stays bounded.
        if snapshot is None:
            return
        if self.reference == "first" and self._first is None:
            self._first = snapshot
        if self.reference == "previous":
            self._previous = snapshot

    def _report(self, message: str) -> None:
        message = f"LoRASubspaceMonitor: {message}"
        if self.strict:
            raise LoRAMonitorError(message)
        rank_zero_warn(message, category=AnalysisWarning)

    # ----------------------------------------------------------------------------- logging
    def _render(
        self,
        grids: dict[ModuleKey, np.ndarray],
        snapshot: Snapshot,
        reference: dict[ModuleKey, LoRAFactors],
        reference_step: Optional[int],
    ) -> np.ndarray:
        key = next(iter(grids))
        row, column, transpose = comparison_symbols(
            self.basis, reference[key].rank, snapshot.factors[key].rank, reference_step, snapshot.step
        )
        if transpose:
            grids = {k: g.T for k, g in grids.items()}
        layers = [layer for layer in self._drawn_layers if any(k[0] == layer for k in grids)]
        # The frame of the figure is drawn once per run; each snapshot only fills the heatmaps.
        return phi_image(grids, row_symbol=row, column_symbol=column, layers=layers)

    def _recommend(self, trainer: pl.Trainer) -> None:
        """The rank suggested by the last analysis: Markdown to the loggers, a console line."""
        self.recommendation = recommend_rank(
            self.latest_analysis, self.basis, reference_is_run=isinstance(self.reference, Path)
        )
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for failure in log_text(trainer.loggers, RECOMMENDATION_TAG, self.recommendation.to_markdown(), step):
            self._report(f"step {step}: could not log the rank recommendation to {failure}")
        rank_zero_info(f"LoRASubspaceMonitor: {self.recommendation.summary()}")

    # ------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "first": self._first.state_dict() if self._first is not None else None,
            "previous": self._previous.state_dict() if self._previous is not None else None,
            "initial": self._initial.state_dict() if self._initial is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        first, previous = state_dict.get("first"), state_dict.get("previous")
        self._first = Snapshot.from_state_dict(first) if first is not None else None
        self._previous = Snapshot.from_state_dict(previous) if previous is not None else None
        initial = state_dict.get("initial")
        self._initial = Snapshot.from_state_dict(initial) if initial is not None else None
