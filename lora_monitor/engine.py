"""The monitor itself, framework-free: :class:`LoRAMonitor`.

It owns everything a front-end does not: the options, the schedule, the references, the
snapshots and their analysis (spread over ranks, or in a worker thread), the figures, the rank
suggestion, what is written to the outputs and the state saved for resume. Front-ends
(``lora_monitor.integrations``: Lightning, transformers) only tell it when steps end and where
it runs; a plain training loop calls :meth:`LoRAMonitor.step` itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

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
from lora_monitor.config import MonitorOptions, Reference
from lora_monitor.distributed import Process, all_gather_objects, full_factors, rank_share
from lora_monitor.functional import Basis
from lora_monitor.outputs import Output, SummaryWriterOutput, write_layout, write_snapshot, write_text
from lora_monitor.plots import comparison_symbols
from lora_monitor.rendering import snapshot_images
from lora_monitor.recommend import RankRecommendation, recommend_rank
from lora_monitor.snapshots import (
    ModuleAnalysis,
    ReferenceBases,
    Snapshot,
    analyze,
    missing_initial_note,
    new_notes,
    shares_lora_A,
    with_base_weights,
)
from lora_monitor.tags import (
    RECOMMENDATION_TAG,
    custom_scalars_layout,
    recommendation_scalars,
    snapshot_scalars,
)

class AnalysisWarning(UserWarning):
    """A snapshot of a module could not be analysed; training goes on (see ``strict``)."""


@dataclass
class _Outcome:
    """What the analysis of one snapshot hands to the calling thread, which reports and writes
    it: outputs (Lightning's CSVLogger among them) are not safe to call from another thread."""

    step: int
    #: None when the analysis failed.
    analyses: Optional[dict[ModuleKey, ModuleAnalysis]] = None
    scalars: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    #: Warnings to give (errors with ``strict``), in the order they arose.
    problems: list[str] = field(default_factory=list)


def default_layers(layer_indices: Sequence[int], count: int = 4) -> list[int]:
    """``count`` layers spread evenly over depth, first and last included (paper: 1/32/64/96)."""
    ordered = sorted(set(layer_indices))
    positions = np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int)
    return [ordered[p] for p in dict.fromkeys(positions.tolist())]


class LoRAMonitor:
    r"""Watch the low-rank updates ΔW = s·B·A of a peft LoRA model while it trains, anywhere.

    Every ``every_n_steps`` optimizer steps, and once when training ends, the monitor copies
    the LoRA factors of the monitored projections (only the factors, never ΔW), computes on the
    model's device the normalized subspace similarity of the LoRA paper (Hu et al. 2021, §7)

    .. math:: \phi(X, Y, i, j) = \|U_X^{i\top} U_Y^{j}\|_F^2 / \min(i, j)

    between a reference X and the current update Y, with spectra, amplification and a rank
    suggestion, and writes them to its outputs (TensorBoard by default). This is the engine the
    Lightning callback (:class:`~lora_monitor.LoRASubspaceMonitor`) and the transformers
    callback (:class:`~lora_monitor.LoRASubspaceCallback`) run; in a plain PyTorch loop, use it
    directly:

    Example::

        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lora_monitor import LoRAMonitor
        >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        >>> with LoRAMonitor(model, log_dir="runs/plain", every_n_steps=2) as monitor:
        ...     for step in range(1, 5):
        ...         tokens = torch.randint(0, 64, (4, 8))
        ...         model(input_ids=tokens, labels=tokens).loss.backward()
        ...         optimizer.step(); optimizer.zero_grad()
        ...         monitor.step(step)
        LoRAMonitor: ... LoRA rank ...
        >>> sorted(monitor.latest_analysis)
        [(0, 'q'), (0, 'v'), (1, 'q'), (1, 'v')]

    Args:
        model: the model holding peft LoRA layers (a ``PeftModel``, or any module holding one);
            given here, the monitor is set up at once and takes its step-0 state now. Front-ends
            pass it later, to :meth:`attach`.
        log_dir: write a TensorBoard run there (a ``SummaryWriter`` the monitor opens and
            closes).
        writer: an existing ``SummaryWriter`` to write into (flushed, not closed, by the monitor).
        outputs: other :class:`~lora_monitor.outputs.Output` s to write to.
        every_n_steps: snapshot period, in optimizer steps.
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
            training step. The snapshot itself is still copied at its step; its results are
            written from the calling thread at a later step, under its own step, and everything
            is written (and :attr:`latest_analysis`, :attr:`recommendation` final) when training
            ends. Default (None): on when the monitored factors are on a CUDA device.

    With several processes (DDP, FSDP, DeepSpeed, ``torchrun``), every rank takes each
    snapshot. A synchronous analysis is split across the ranks — each analyses every
    ``world_size``-th module and the small results are gathered on all of them — and only global
    rank zero draws and writes. An asynchronous one runs whole on every rank, in each rank's
    worker thread (collectives from a second thread could interleave with the training step's).

    Written, for each snapshot at step ``step``: the tags of :mod:`lora_monitor.tags`, each
    named by the matrix it describes (``delta_w_*``: ΔW, merged minus pretrained weight;
    ``a_init_similarity``: A; ``phi_*``, ``shared_directions``: the singular vectors of
    ``basis``). In the two groups TensorBoard opens first, at most 24 cards whatever the depth:

    - ``LoRA_rank/suggested.<p>``, ``LoRA_rank/suggested.model``: the rank suggested by this
      snapshot (:func:`lora_monitor.recommend.recommend_rank`) per projection and for the
      model, so that it can be watched as it forms; 0 where no rank is supported.
    - ``LoRA_rank/weak_evidence``: 1 when that suggestion's evidence is weak, else 0.
    - ``LoRA_rank/overview`` (image): every layer at once, per projection the rank each layer
      supports against r and the suggestion (:func:`lora_monitor.plots.overview_figure`).
    - ``LoRA_summary/median_<metric>.<p>``: the median over layers of the per-layer metrics of
      :func:`lora_monitor.tags.summary_metrics` (``shared_directions``,
      ``delta_w_energy_rank``, ``phi_top``, ``delta_w_relative_norm``, ``a_init_similarity``,
      as many as fit).
    - ``LoRA_rank/recommendation`` (text), when training ends: the suggested LoRA rank with its
      evidence; the summary line also goes to the console (rank zero). Kept as
      :attr:`recommendation`.

    Per module, ``lora_monitor.<metric>/layer_<L>.<p>`` (layer L, projection p):

    - ``delta_w_norm``: ‖ΔW‖_F; ``delta_w_sigma_max``: σ₁, the top singular value of ΔW.
    - ``phi_top``: φ(1, 1), how well the reference's top direction is aligned with the current
      top direction; ``phi_mean``: the mean of φ(i, i) for i up to the smaller of the two ranks.
    - ``shared_directions``: the number of top directions shared with the reference clearly
      above the level of random subspaces (:func:`lora_monitor.functional.shared_directions`
      gives the precise rule).
    - ``delta_w_energy_rank``, ``delta_w_effective_rank``, ``delta_w_stable_rank``: of ΔW's
      spectrum: the smallest k holding 90 % of ‖ΔW‖_F², exp(entropy of σ/Σσ) (Roy & Vetterli),
      ‖ΔW‖_F²/σ₁².
    - ``delta_w_amplification``: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F (the paper's §7.3), and
      ``delta_w_relative_norm``: ‖ΔW‖_F / ‖W₀‖_F; both need the live W₀.
    - ``a_init_similarity``: φ(A₀, A, r, r), how much of A's row space is still its value before
      the first optimizer step (from a fresh start only).
    - ``intruder_dimensions``: with ``intruder_top_k``, the top singular vectors of W₀ + ΔW far
      from every singular vector of W₀.
    - DoRA modules only: ``dora_magnitude_norm``, ‖(D − I)·W₀‖_F, the part of ΔW that rescales
      W₀'s rows (D = diag(m / ‖row of W₀ + s·B·A‖)); ``dora_direction_norm``, ‖D·s·B·A‖_F, the
      low-rank directional term (the one φ reads); ``dora_scale_std``, the standard deviation
      of D's diagonal over rows (0 when every row is rescaled alike). AdaLoRA modules only:
      ``adalora_kept_rank``, the number of triplets rank allocation keeps (non-zero E).
    - ``lora_monitor.phi_heatmaps/layer_<L>`` (image), for each drawn layer (``layers``): φ(reference,
      current, i, j) per projection, i (reference) on the vertical axis and j (current) on the
      horizontal one, colour scale 0..1; when the reference has the smaller rank, a zoom on
      i, j ≤ r_ref with the cells j > i masked.

    Once per run, a custom-scalars layout (TensorBoard → Custom Scalars) draws every per-layer
    metric as one chart per projection, the layers as its lines. No ``phi_*`` or
    ``shared_directions`` scalars and no heatmap are written for the first snapshot of a run
    with ``reference="first"`` or ``"previous"`` (there is nothing to compare with yet); the
    overview is written at every snapshot (drawn again only when what it shows changed).

    Resume: :meth:`state_dict` / :meth:`load_state_dict` hold the references ("first",
    "previous"), the factors before the first step and the last snapshot's step.
    """

    def __init__(
        self,
        model: Optional[torch.nn.Module] = None,
        *,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        writer: Any = None,
        outputs: Sequence[Output] = (),
        every_n_steps: int = 50,
        reference: Reference = "first",
        target_modules: Sequence[str] = ("q", "v"),
        layers: Optional[Sequence[int]] = None,
        basis: Basis = "A",
        adapter_name: Optional[str] = None,
        log_images: bool = True,
        strict: bool = False,
        intruder_top_k: Optional[int] = None,
        asynchronous: Optional[bool] = None,
        options: Optional[MonitorOptions] = None,
    ) -> None:
        if options is None:
            options = MonitorOptions.of(locals(), owner="LoRAMonitor")
        self.options = options
        if log_dir is not None and writer is not None:
            raise ValueError(f"{options.owner}: pass log_dir= or writer=, not both")
        self.outputs: list[Output] = list(outputs)
        if log_dir is not None or writer is not None:
            self.outputs.insert(0, SummaryWriterOutput(writer=writer, log_dir=log_dir))
        #: How the recommendation's summary line reaches the console (front-ends replace it).
        self.info: Callable[[str], None] = print
        self.process = Process()

        self._model: Optional[torch.nn.Module] = None
        self._reference_factors: Optional[dict[ModuleKey, LoRAFactors]] = None
        self._drawn_layers: list[int] = []
        self._first: Optional[Snapshot] = None
        #: The reference factors the cached bases were computed from, and the bases.
        self._reference_bases: Optional[tuple[dict[ModuleKey, LoRAFactors], ReferenceBases]] = None
        self._previous: Optional[Snapshot] = None
        self._last_step: Optional[int] = None
        #: The latest step :meth:`step` was told of (the plain loop's end of training).
        self._seen_step: Optional[int] = None
        # The factors before the first optimizer step: is A still its random initialization?
        self._initial: Optional[Snapshot] = None
        #: The variants' notes (what an analysis leaves out, and why) already reported: once each.
        self._notes_given: set[str] = set()
        #: The worker of an asynchronous monitor, from its first snapshot to the end of training.
        self._background: Optional[Background[_Outcome]] = None
        self._layout_written = False
        #: The analysis of the latest snapshot, ``(layer, projection) → ModuleAnalysis``.
        self.latest_analysis: dict[ModuleKey, ModuleAnalysis] = {}
        #: The rank suggested when training ended, from the latest analysis (None before).
        self.recommendation: Optional[RankRecommendation] = None
        if model is not None:
            self.attach(model)
            self.start(0)

    # -------------------------------------------------------------------- plain-loop API
    def step(self, step: int) -> None:
        """Call after each optimizer step with the number of optimizer steps taken so far."""
        if self._model is None:
            raise LoRAMonitorError(
                f"{self.options.owner}.step() before the model is known: pass it, "
                f"LoRAMonitor(model, log_dir=...)"
            )
        self._seen_step = step
        self.on_step(step)

    def close(self) -> None:
        """Take the final snapshot (if the last step was not one), write everything still
        pending and the rank recommendation, and close the outputs the monitor opened."""
        try:
            if self._model is not None and self._seen_step is not None:
                self.finish(self._seen_step)
        finally:
            self.close_worker()
            self._close_outputs()

    def __enter__(self) -> LoRAMonitor:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.close()
            return
        # The error that stops training must stay the one raised; what was analysed is written.
        try:
            with contextlib.suppress(LoRAMonitorError):
                self.abort()
        finally:
            self._close_outputs()

    def _close_outputs(self) -> None:
        for output in self.outputs:
            close = getattr(output, "close", None)
            if close is not None:
                close()

    # ------------------------------------------------------------------ front-end hooks
    def attach(
        self,
        model: torch.nn.Module,
        *,
        process: Optional[Process] = None,
        outputs: Optional[Sequence[Output]] = None,
    ) -> None:
        """Set up on ``model``: find its LoRA factors, check the reference, choose the drawn
        layers. Configuration errors (:class:`LoRAMonitorError`) are raised here, before any
        training step. ``process`` says where the monitor runs (default: torch's process
        group); ``outputs``, when given, replace the outputs the monitor writes to."""
        self.process = process if process is not None else Process.from_torch_distributed()
        if outputs is not None:
            self.outputs = list(outputs)
        self._model = model
        options = self.options
        monitored = self._monitored_factors()
        layer_indices = sorted({layer for layer, _ in monitored})
        if options.layers is not None:
            select_factors(monitored, None, options.layers)  # raises if an entry matches nothing
            self._drawn_layers = list(options.layers)
        else:
            self._drawn_layers = default_layers(layer_indices)
        if options.compares_runs:
            saved = load_adapter(options.reference)
            check_reference_compatible(monitored, saved.factors, options.basis)
            projections = {projection for _, projection in monitored}
            reference_layers = sorted({layer for layer, p in saved.factors if p in projections})
            if reference_layers != layer_indices:
                raise LoRAMonitorError(
                    f"the reference adapter {options.reference} has LoRA modules in layers "
                    f"{reference_layers} but the model in layers {layer_indices}: it was trained on a "
                    f"base model with more layers; compare adapters of the same base model (and the "
                    f"same LoraConfig(layers_to_transform=...))"
                )
            # A DoRA reference's D needs W₀: the same base model's, so the monitored model's.
            self._reference_factors = with_base_weights({key: saved.factors[key] for key in monitored}, monitored)
            self._check_reference_analysable()
        if options.basis == "A" and shares_lora_A(monitored):
            self._warn(
                "q, k and v of a fused q|k|v module (c_attn, qkv_proj, query_key_value) share one "
                "lora_A, so basis='A' cannot tell them apart; use basis='delta_w_left' or "
                "'delta_w_right'."
            )
        if self.process.is_main and not self._layout_written:
            self._layout_written = True
            for failure in write_layout(self.outputs, custom_scalars_layout(sorted(monitored))):
                self._report(f"could not write the custom-scalars layout to {failure}")

    def start(self, step: int) -> None:
        """Training starts at ``step``: from a fresh start (0), keep the factors before the
        first optimizer step (``a_init_similarity``)."""
        if step == 0 and self._initial is None:
            self._initial = Snapshot.capture(self._monitored_factors(), 0)
        elif self._initial is None:
            note = missing_initial_note(self._monitored_factors(), step)
            if note is not None:
                self._warn(note)

    def on_step(self, step: int) -> None:
        """An optimizer step ended, ``step`` steps taken: write what the worker finished, and
        take a snapshot when one is due."""
        due = step > 0 and step % self.options.every_n_steps == 0 and step != self._last_step
        # A snapshot waits for the one before it: a worker slower than every_n_steps steps then
        # slows training down, rather than piling snapshots up in memory.
        self._collect(wait=due)
        if due:
            self._take_snapshot(step)

    def finish(self, step: int) -> None:
        """Training ended at ``step``: a last snapshot, every pending result written, and the
        rank recommendation."""
        if step != self._last_step:
            self._take_snapshot(step)
        self._collect(wait=True)
        if self.latest_analysis:
            with self._contained(f"step {step}: the rank recommendation"):
                self._recommend(step)

    def abort(self) -> None:
        """Training stopped with an error: write what was analysed, then stop the worker."""
        try:
            self._collect(wait=True)
        finally:
            self.close_worker()

    def close_worker(self) -> None:
        if self._background is not None:
            self._background.close()
            self._background = None

    # ----------------------------------------------------------------------------- set-up
    def _check_reference_analysable(self) -> None:
        # A reference that cannot be analysed would warn at every snapshot of every module:
        # the user must fix it, so say it once, before training.
        alone = analyze(Snapshot(step=0, factors=self._reference_factors), None, self.options.basis)
        problems = [
            f"layer {layer} projection {projection!r}: {'; '.join(analysis.problems)}"
            for (layer, projection), analysis in sorted(alone.items())
            if analysis.problems
        ]
        if problems:
            raise LoRAMonitorError(
                f"the reference adapter {self.options.reference} cannot be compared in basis "
                f"{self.options.basis!r}: {', '.join(problems)}. An adapter saved before training has "
                f"lora_B = 0 (peft's initialization): save it after training, or use basis='A'; "
                f"NaN or Inf come from a run that diverged"
            )

    def _monitored_factors(self) -> dict[ModuleKey, LoRAFactors]:
        factors = find_lora_factors(self._model, self.options.adapter_name)
        return select_factors(factors, self.options.target_modules, None)

    def _collect(self, wait: bool) -> None:
        """Report and write the analyses the worker finished (all of them if ``wait``)."""
        if self._background is not None:
            for outcome in self._background.results(wait):
                self._publish(outcome)

    # ---------------------------------------------------------------------------- analysis
    def _take_snapshot(self, step: int) -> None:
        self._last_step = step
        try:
            # Every rank gets here: sharded strategies gather the LoRA factors collectively.
            with self.process.gathered():
                snapshot = Snapshot.capture(full_factors(self._monitored_factors()), step)
        except LoRAMonitorError as error:  # e.g. the adapter was merged or unloaded mid-run
            self._report(f"step {step}: no snapshot taken: {error}")
            return
        # What the snapshot is compared with is decided here, at its step, whether it is then
        # analysed here or in the worker: checkpoints and resume see only this thread's state.
        reference, reference_step = self._reference_for(snapshot)
        if step % self.options.every_n_steps == 0:
            # The end-of-training snapshot off the schedule is compared but never becomes the
            # reference: a run stopped there and resumed must compare with what an
            # uninterrupted run compares with.
            self._remember(snapshot)
        initial = self._initial.factors if self._initial is not None else None
        writes = self.process.is_main
        work = functools.partial(self._analyse, snapshot, reference, reference_step, initial, writes)
        device = next(iter(snapshot.factors.values())).lora_A.device
        asynchronous = self.options.asynchronous
        if not (asynchronous if asynchronous is not None else device.type == "cuda"):
            if self.process.spreads_analysis:
                outcome = self._analyse_spread(snapshot, reference, reference_step, initial)
            else:
                outcome = work()
            self._publish(outcome)
            return
        if self._background is None:
            self._background = Background(device)
        tensors = [
            tensor
            for factors in (snapshot.factors, reference or {}, initial or {})
            for f in factors.values()
            for tensor in (f.lora_A, f.lora_B, f.base_weight, f.magnitude, f.lora_E)
            if tensor is not None
        ]
        self._background.submit(work, tensors)

    def _analyse(
        self,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
        initial: Optional[dict[ModuleKey, LoRAFactors]],
        writes: bool,
    ) -> _Outcome:
        """Analyse ``snapshot`` and, if this rank ``writes``, draw its figures: in whichever
        thread runs it.

        Reads only its arguments and what setup fixed, and writes only the cache of the
        reference's bases, which no other thread touches. Problems are collected, not reported.
        """
        outcome = self._analyse_modules(snapshot, reference, initial)
        if writes:
            self._prepare_writes(outcome, snapshot, reference, reference_step)
        return outcome

    def _analyse_spread(
        self,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
        initial: Optional[dict[ModuleKey, LoRAFactors]],
    ) -> _Outcome:
        """:meth:`_analyse` with the modules split across the ranks, every rank in the training
        thread (a collective). All ranks get every analysis and every problem, so they keep the
        same state, and in strict mode they all stop at once instead of waiting for each other."""
        keys = rank_share(snapshot.factors, self.process.rank, self.process.world_size)
        share = Snapshot(step=snapshot.step, factors={key: snapshot.factors[key] for key in keys})
        shares: list[_Outcome] = all_gather_objects(self._analyse_modules(share, reference, initial))
        outcome = _Outcome(snapshot.step, problems=[problem for s in shares for problem in s.problems])
        analysed = [s.analyses for s in shares if s.analyses is not None]
        if analysed:
            outcome.analyses = dict(sorted(item for analyses in analysed for item in analyses.items()))
            if self.process.is_main:
                self._prepare_writes(outcome, snapshot, reference, reference_step)
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
                self.options.basis,
                initial=initial,
                intruder_top_k=self.options.intruder_top_k,
                reference_bases=self._bases_of(reference, snapshot),
            )
        except Exception as error:
            outcome.problems.append(f"step {step}: the analysis failed with {type(error).__name__}: {error}")
            return outcome
        for analysis in outcome.analyses.values():
            for problem in analysis.problems:
                layer, projection = analysis.key
                outcome.problems.append(f"step {step}, layer {layer} projection {projection!r}: {problem}; skipped")
        outcome.problems.extend(f"step {step}, {note}" for note in new_notes(outcome.analyses, self._notes_given))
        return outcome

    def _prepare_writes(
        self,
        outcome: _Outcome,
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
    ) -> None:
        """Fill ``outcome``'s scalars and images from its analyses (if it has any)."""
        if outcome.analyses is None:
            return
        step = snapshot.step
        try:
            outcome.scalars = snapshot_scalars(outcome.analyses)
            suggestion = recommend_rank(
                outcome.analyses, self.options.basis, reference_is_run=self.options.compares_runs
            )
            outcome.scalars.update(recommendation_scalars(suggestion))
            grids = {
                key: a.phi.numpy()
                for key, a in outcome.analyses.items()
                if a.phi is not None and key[0] in self._drawn_layers
            }
        except Exception as error:
            outcome.problems.append(f"step {step}: logging the analysis failed with {type(error).__name__}: {error}")
            return
        if self.options.log_images:
            # A figure that cannot be drawn costs the image only: the scalars still go out.
            try:
                outcome.images = self._render(grids if reference is not None else {}, snapshot, reference, reference_step, suggestion)
            except Exception as error:
                outcome.problems.append(
                    f"step {step}: drawing the figures failed with {type(error).__name__}: {error}"
                )

    def _publish(self, outcome: _Outcome) -> None:
        """In the calling thread: keep, report and write what :meth:`_analyse` produced."""
        if outcome.analyses is not None:
            self.latest_analysis = outcome.analyses
        for problem in outcome.problems:
            self._report(problem)
        if outcome.analyses is None or not self.process.is_main:
            return
        step = outcome.step
        with self._contained(f"step {step}: logging the analysis"):
            for failure in write_snapshot(self.outputs, outcome.scalars, outcome.images, step):
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
        if reference is None or self.options.reference == "previous":
            return None
        if self._reference_bases is None or self._reference_bases[0] is not reference:
            initial = self._initial.factors if self._initial is not None else None
            bases = ReferenceBases.compute(reference, snapshot.factors, self.options.basis, initial)
            self._reference_bases = (reference, bases)
        return self._reference_bases[1]

    def _reference_for(self, snapshot: Snapshot) -> tuple[Optional[dict[ModuleKey, LoRAFactors]], Optional[int]]:
        if self._reference_factors is not None:
            return self._reference_factors, None
        earlier = self._first if self.options.reference == "first" else self._previous
        if earlier is None:
            return None, None
        return earlier.factors, earlier.step

    def _remember(self, snapshot: Snapshot) -> None:
        # Only what "first"/"previous" need is kept: the history stays bounded.
        if self.options.reference == "first" and self._first is None:
            self._first = snapshot
        if self.options.reference == "previous":
            self._previous = snapshot

    def _warn(self, message: str) -> None:
        if self.process.is_main:
            warnings.warn(f"{self.options.owner}: {message}", AnalysisWarning, stacklevel=3)

    def _report(self, message: str) -> None:
        if self.options.strict:
            raise LoRAMonitorError(f"{self.options.owner}: {message}")
        self._warn(message)

    # ----------------------------------------------------------------------------- figures
    def _render(
        self,
        grids: dict[ModuleKey, np.ndarray],
        snapshot: Snapshot,
        reference: Optional[dict[ModuleKey, LoRAFactors]],
        reference_step: Optional[int],
        suggestion: RankRecommendation,
    ) -> dict[str, np.ndarray]:
        """The heatmaps of the drawn layers (with a reference) and the overview of all layers."""
        row = column = ""
        if grids:
            key = next(iter(grids))
            row, column, transpose = comparison_symbols(
                self.options.basis, reference[key].rank, snapshot.factors[key].rank, reference_step, snapshot.step
            )
            if transpose:
                grids = {k: g.T for k, g in grids.items()}
        layers = [layer for layer in self._drawn_layers if any(k[0] == layer for k in grids)]
        return snapshot_images(grids, layers=layers, row_symbol=row, column_symbol=column, recommendation=suggestion)

    def _recommend(self, step: int) -> None:
        """The rank suggested by the last analysis: Markdown to the outputs, a console line."""
        self.recommendation = recommend_rank(
            self.latest_analysis, self.options.basis, reference_is_run=self.options.compares_runs
        )
        if not self.process.is_main:
            return
        for failure in write_text(self.outputs, RECOMMENDATION_TAG, self.recommendation.to_markdown(), step):
            self._report(f"step {step}: could not log the rank recommendation to {failure}")
        self.info(f"{self.options.owner}: {self.recommendation.summary()}")

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


__all__ = ["AnalysisWarning", "LoRAMonitor", "MonitorOptions", "default_layers"]
