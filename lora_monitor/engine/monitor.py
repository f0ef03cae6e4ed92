"""The monitor itself, framework-free: :class:`LoRAMonitor`, the lifecycle of a monitored run.

It decides when snapshots are taken and ties the pieces together: :class:`References` (what
each snapshot is compared with), :class:`AnalysisRunner` (where the analysis runs) and
:class:`Reporter` (what is said and written). A plain training loop calls
:meth:`LoRAMonitor.step` itself.

The front-end contract: a front-end (``lora_monitor.integrations``) maps its framework's hooks
onto these methods and uses nothing else of the engine —

- :meth:`~LoRAMonitor.attach` ``(model, rank_context=, outputs=, console=)`` at set-up: the model,
  where it runs (:meth:`RankContext.for_model <lora_monitor.engine.distributed.RankContext.for_model>`
  from the strategy's wrapped model, the framework's rank and world size), a factory of its
  outputs (called on the writing process only) and its console;
- :meth:`~LoRAMonitor.start` ``(step)`` when training starts (0, or the step it resumes at);
- :attr:`~LoRAMonitor.wants_probe_batch`, :meth:`~LoRAMonitor.capture_probe_batch`
  ``(batch, evaluate)`` or :meth:`~LoRAMonitor.refuse_probe` ``(reason)``: the functional
  probe's batch and how the framework computes its loss;
- :meth:`~LoRAMonitor.after_optimizer_step` ``(step)`` after each optimizer step;
- :meth:`~LoRAMonitor.finish` ``(step)`` when training ends; :meth:`~LoRAMonitor.close`
  ``(error=None)`` once, last, also after an error;
- :meth:`~LoRAMonitor.state_dict` / :meth:`~LoRAMonitor.load_state_dict` for resume, and
  ``options``, ``latest_analysis``, ``recommendation`` to read back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, LoRAMonitorError, ModuleKey, find_lora_factors, select_factors
from lora_monitor.adapters.kinds import TrainedModule, groups_of, module_kind, trained_modules, uncovered_projections
from lora_monitor.analysis import ModuleAnalysis, Snapshot, analyze, shares_lora_A
from lora_monitor.analysis.device import base_weight_results
from lora_monitor.analysis.probe import ProbeReading
from lora_monitor.analysis.rank import RankRecommendation, recommend_rank
from lora_monitor.engine.distributed import RankContext, ShardedBaseSums, all_gather_objects, capture_kept
from lora_monitor.engine.options import MonitorOptions, Reference
from lora_monitor.engine.probe_runner import ProbeRunner
from lora_monitor.engine.references import References
from lora_monitor.engine.reporter import Reporter
from lora_monitor.engine.runner import AnalysisRunner, Job, Outcome
from lora_monitor.functional.bases import Basis
from lora_monitor.outputs.writers import Output, SummaryWriterOutput


def default_layers(layer_indices: Sequence[int], count: int = 4) -> list[int]:
    """``count`` layers spread evenly over depth, first and last included (paper: 1/32/64/96)."""
    ordered = sorted(set(layer_indices))
    positions = np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int)
    return [ordered[p] for p in dict.fromkeys(positions.tolist())]


class LoRAMonitor:
    r"""Watch the low-rank updates ΔW of a peft LoRA model while it trains, anywhere.

    Every ``every_n_steps`` optimizer steps, and once when training ends, the monitor copies
    the LoRA factors of the monitored projections (never ΔW), computes on the model's device
    the normalized subspace similarity of the LoRA paper (Hu et al. 2021, §7)

    .. math:: \phi(X, Y, i, j) = \|U_X^{i\top} U_Y^{j}\|_F^2 / \min(i, j)

    between a reference X and the current update Y, with spectra, amplification and a rank
    suggestion, and writes them to its outputs (TensorBoard by default). Every tag and what it
    means: :mod:`lora_monitor.outputs.tags`. The Lightning callback
    (:class:`~lora_monitor.LoRASubspaceMonitor`) and the transformers callback
    (:class:`~lora_monitor.LoRASubspaceCallback`) run this engine; in a plain PyTorch loop, use
    it directly:

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
            given here, the monitor is set up at once and takes its step-0 state now.
            Front-ends pass it later, to :meth:`attach`.
        log_dir: write a TensorBoard run there (a ``SummaryWriter`` the monitor opens and
            closes, on global rank zero only).
        writer: an existing ``SummaryWriter`` to write into (flushed, not closed).
        outputs: other :class:`~lora_monitor.outputs.writers.Output` s to write to.
        every_n_steps: snapshot period, in optimizer steps.
        reference: what the current update is compared with: ``"first"`` — the first snapshot
            of the run; ``"previous"`` — the snapshot before; or the path of an adapter
            directory written by peft's ``save_pretrained`` (another rank or seed), whose shapes
            are checked layer by layer at setup.
        target_modules: which projections to monitor. Default (None, or ``"all-linear"`` as
            peft spells it): every LoRA module the adapter trains, so that the probe cuts and
            the answer covers the whole adapter (the φ heatmaps draw q and v). Else canonical
            names ``"q"``, ``"k"``, ``"v"``, ``"o"`` (matching ``q_proj``, ``query``, GPT-2's
            fused ``c_attn``, ...) or a module's own name, as in peft's
            ``LoraConfig.target_modules``: ``("q", "v")`` is the paper's choice; the report
            then names the trained modules the answer does not cover.
        layers: layer indices drawn as heatmaps; scalars are logged for every monitored
            layer. Default: four layers spread over depth, like the paper's 1/32/64/96.
        basis: the singular vectors φ is computed in
            (:data:`lora_monitor.functional.bases.BASES`): ``"A"`` (right singular vectors of
            ``lora_A``, the paper's choice), ``"B"``, ``"delta_w_left"``, ``"delta_w_right"``.
        adapter_name: the peft adapter to monitor; default the active one.
        log_images: draw and log the figures (scalars are always logged).
        strict: raise instead of warning when a snapshot cannot be analyzed (for tests and
            CI). Errors in the configuration are raised at setup either way.
        intruder_top_k: count the intruder dimensions (Shuttleworth et al. 2024) among the top
            ``intruder_top_k`` singular vectors of W₀ + ΔW. Off (None) by default: it takes two
            dense SVDs per module and snapshot.
        asynchronous: analyze and draw each snapshot in a worker thread (on a CUDA side stream
            on a GPU) while training goes on; its results are written at a later step, under
            their own step, and all of them when training ends. Default (None): on when the
            monitored factors are on a CUDA device.
        functional_probe: read the functional probe at every snapshot
            (:mod:`lora_monitor.analysis.probe`), the loss on one batch with every monitored
            ΔW cut to k directions; it drives the rank suggestion with ΔW's spectral gaps.
        adapter_dir: the directory this run saves its adapter to
            (``model.save_pretrained(adapter_dir)``), named in the end-of-fit advice so that its
            ``lora-monitor truncate`` command runs as printed; default a placeholder.
        probe: the plain loop's probe: a callable of no argument returning the loss on a fixed
            batch (a tensor, a number, or an output with ``.loss``), called in eval mode
            without gradients, e.g. ``lambda: model(**probe_batch).loss``. The front-ends
            supply their own.

    With several processes (DDP, FSDP, DeepSpeed, ``torchrun``), every rank takes each
    snapshot, a synchronous analysis is split across the ranks, and only global rank zero
    draws and writes. Resume: :meth:`state_dict` / :meth:`load_state_dict`.
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
        target_modules: Optional[Union[str, Sequence[str]]] = None,
        layers: Optional[Sequence[int]] = None,
        basis: Basis = "A",
        adapter_name: Optional[str] = None,
        log_images: bool = True,
        strict: bool = False,
        intruder_top_k: Optional[int] = None,
        asynchronous: Optional[bool] = None,
        functional_probe: bool = True,
        adapter_dir: Optional[Union[str, os.PathLike]] = None,
        probe: Optional[Callable[[], Any]] = None,
        options: Optional[MonitorOptions] = None,
    ) -> None:
        if options is None:
            options = MonitorOptions.of(locals(), owner="LoRAMonitor")
        self.options = options
        if log_dir is not None and writer is not None:
            raise ValueError(f"{options.owner}: pass log_dir= or writer=, not both")
        self._log_dir, self._writer, self._outputs = log_dir, writer, list(outputs)
        self.rank_context = RankContext()
        self.references = References(options)
        self.reporter = Reporter(options)
        self.probe_runner = ProbeRunner(self.reporter, options.functional_probe)
        self.probe_runner.loss = probe
        #: The paths of the monitored LoRA modules (what the probe cuts).
        self._module_names: set[str] = set()
        #: Each monitored module's group (attention, MLP), by key and by path (the probe's).
        self._groups: dict[ModuleKey, str] = {}
        self._module_groups: dict[str, str] = {}
        #: The monitored modules with their shapes, and the trained projections left out.
        self._trained: list[TrainedModule] = []
        self._not_covered: list[str] = []
        self.runner: Optional[AnalysisRunner] = None
        self._model: Optional[torch.nn.Module] = None
        #: The step of the latest snapshot taken (saved as ``"last_step"``).
        self._snapshot_step: Optional[int] = None
        #: The latest training step :meth:`step` was told of (the plain loop's end of training).
        self._training_step: Optional[int] = None
        #: The latest analyzed snapshot's outcome: its analyses, probe and recommendation.
        self._latest: Optional[Outcome] = None
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
                f"{self.options.owner}.step() before the model is known: pass it, LoRAMonitor(model, log_dir=...)"
            )
        self._training_step = step
        self.after_optimizer_step(step)

    def close(self, error: Optional[BaseException] = None) -> None:
        """The end of the monitor's life, whatever ended training. Without ``error``: a plain
        loop's last steps are finished (:meth:`finish`: a final snapshot if the last step was not
        one, and the rank recommendation). With the ``error`` that stopped training: what was
        analyzed is written, and that error stays the one raised. Then the worker stops and the
        outputs the monitor opened close. Front-ends call it once, last."""
        try:
            if error is None and self._model is not None and self._training_step is not None:
                self.finish(self._training_step)
            elif error is not None:
                with contextlib.suppress(LoRAMonitorError):
                    self._collect(wait=True)
        finally:
            if self.runner is not None:
                self.runner.close()
            self.reporter.close()

    def __enter__(self) -> LoRAMonitor:
        return self

    def __exit__(self, kind: Any, error: Optional[BaseException], traceback: Any) -> None:
        self.close(error)

    # ------------------------------------------------------------------ front-end hooks
    def attach(
        self,
        model: torch.nn.Module,
        *,
        rank_context: Optional[RankContext] = None,
        outputs: Optional[Callable[[], Sequence[Output]]] = None,
        console: Optional[Callable[[str], None]] = None,
    ) -> None:
        """Set up on ``model``: find its LoRA factors, check the reference, choose the drawn
        layers. Configuration errors (:class:`LoRAMonitorError`) are raised here, before any
        training step.

        Args:
            model: what holds the LoRA layers.
            rank_context: where the monitor runs (:meth:`RankContext.for_model`; default: found from
                ``model`` and torch's process group).
            outputs: makes the outputs to write to, replacing the monitor's own; called only on
                the process that writes (global rank zero), so that no other opens a file.
            console: where the end-of-fit lines and the once-said notes go (default ``print``;
                Lightning's ``rank_zero_info``).
        """
        self.rank_context = rank_context if rank_context is not None else RankContext.for_model(model)
        if console is not None:
            self.reporter.info = console
        self._model = model
        options = self.options
        # FSDP (1) holds flat shards outside its gather: the factors are read and checked in it.
        with self.rank_context.gathered():
            trained = find_lora_factors(model, options.adapter_name)
            monitored = select_factors(trained, options.target_modules, None)
            if options.layers is not None:
                select_factors(monitored, None, options.layers)  # raises if an entry matches nothing
            self.references.load(monitored)
            self._trained = trained_modules(monitored)
        self._module_names = {f.module_name for f in monitored.values()}
        self._groups = groups_of(monitored)
        self._module_groups = {monitored[key].module_name: group for key, group in self._groups.items()}
        self._not_covered = uncovered_projections(trained, monitored)
        if options.watches_all_trained:
            # The φ heatmaps keep the paper's q and v (where the adapter trains them).
            paper = {key[1] for key, f in monitored.items() if module_kind(f.projection, f.module_name) in ("q", "v")}
            self.reporter.drawn_projections = paper or None
        self.reporter.bind(self._outputs_of_rank(outputs), speaks=self.rank_context.is_main)
        self.reporter.drawn_layers = (
            list(options.layers) if options.layers is not None else default_layers([layer for layer, _ in monitored])
        )
        self.runner = AnalysisRunner(
            self._analyze,
            self._recommend,
            self.reporter.prepare,
            self.rank_context,
            options.asynchronous,
            writes=self.reporter.speaks,
        )
        if options.basis == "A" and shares_lora_A(monitored):
            self.reporter.warn(
                "q, k and v of a fused q|k|v module (c_attn, qkv_proj, query_key_value) share one "
                "lora_A, so basis='A' cannot tell them apart; use basis='delta_w_left' or "
                "'delta_w_right'."
            )
        self.reporter.write_layout(list(monitored))
        if options.log_images and self.reporter.speaks:
            # matplotlib's import (a few hundred ms) off the first snapshot's path: a short fit
            # would pay it in full; the import lock makes the drawing thread wait if it is early.
            threading.Thread(
                target=importlib.import_module, args=("lora_monitor.outputs.rendering",), daemon=True
            ).start()

    def start(self, step: int) -> None:
        """Training starts at ``step``: from a fresh start (0), keep the factors before the
        first optimizer step (``a_init_similarity``, a PiSSA-like initialization's B₀, A₀)."""
        if self.references.initial is None:
            note = self.references.start(self._capture(step, base_numbers=False)[0], step)
            if note is not None:
                self.reporter.warn(note)
        self.probe_runner.start(step)

    def after_optimizer_step(self, step: int) -> None:
        """An optimizer step ended, ``step`` steps taken: write what the worker finished, and
        take a snapshot when one is due."""
        due = step > 0 and step % self.options.every_n_steps == 0 and step != self._snapshot_step
        # A snapshot waits for the one before it: a worker slower than every_n_steps steps then
        # slows training down, rather than piling snapshots up in memory.
        self._collect(wait=due)
        if due:
            self._take_snapshot(step)

    def finish(self, step: int) -> None:
        """Training ended at ``step``: a last snapshot, every pending result written, and the
        rank recommendation."""
        if step != self._snapshot_step:
            self._take_snapshot(step, final=True)
        self._collect(wait=True)
        latest = self._latest
        if latest is not None and self.probe_runner.skipped == step:
            # The probe's schedule skipped the last snapshot (its cards carry the reading before):
            # the recommendation rests on the probe of its own step, decided again.
            latest = self._latest = dataclasses.replace(latest, probe=self._read_probe(step, final=True), problems=[])
            self._recommend(latest)
            for problem in latest.problems:
                self.reporter.report(problem)
        if latest is not None and latest.recommendation is not None:
            self.recommendation = latest.recommendation  # the snapshot's, decided once
            with self.reporter.contained(f"step {step}: the rank recommendation"):
                self.reporter.write_recommendation(self.recommendation, step)

    @property
    def latest_analysis(self) -> dict[ModuleKey, ModuleAnalysis]:
        """The analysis of the latest snapshot, ``(layer, projection) → ModuleAnalysis``."""
        return (self._latest.analyses or {}) if self._latest is not None else {}

    @property
    def latest_probe_reading(self) -> Optional[ProbeReading]:
        """The functional probe's reading the latest snapshot rests on (None: not read)."""
        return self._latest.probe if self._latest is not None else None

    # ------------------------------------------------------------- the probe's batch
    @property
    def wants_probe_batch(self) -> bool:
        """Whether the front-end should hand over a batch for the functional probe
        (:meth:`capture_probe_batch`): the probe is on, and has no loss or batch yet."""
        return self.probe_runner.wants_batch

    def capture_probe_batch(self, batch: Any, evaluate: Callable[[Any], Any]) -> None:
        """The probe's fixed batch, and how the front-end's framework computes its loss
        (``evaluate(batch)``, returning a loss, a mapping with ``"loss"`` or an output with
        ``.loss``); the batch is kept in the monitor's state, so a resumed run probes it too."""
        self.probe_runner.capture(batch, evaluate)

    def refuse_probe(self, reason: str) -> None:
        """The front-end cannot give the probe a loss (``reason`` is said once): the suggestion
        rests on ΔW's spectra alone."""
        self.probe_runner.disable(reason)

    # ------------------------------------------------------------------------- internals
    def _outputs_of_rank(self, outputs: Optional[Callable[[], Sequence[Output]]]) -> list[Output]:
        """What this process writes to: nothing off global rank zero; there, the front-end's
        ``outputs``, or the monitor's own (its ``SummaryWriter`` opened once)."""
        if not self.rank_context.is_main:
            return []
        if outputs is not None:
            return list(outputs())
        if self._log_dir is not None or self._writer is not None:
            self._outputs.insert(0, SummaryWriterOutput(writer=self._writer, log_dir=self._log_dir))
            self._log_dir = self._writer = None
        return list(self._outputs)

    def _monitored_factors(self) -> dict[ModuleKey, LoRAFactors]:
        assert self._model is not None
        factors = find_lora_factors(self._model, self.options.adapter_name)
        return select_factors(factors, self.options.target_modules, None)

    def _capture(self, step: int, base_numbers: bool = True) -> tuple[Snapshot, dict[ModuleKey, dict[str, Tensor]]]:
        """A snapshot of the monitored factors this rank keeps (:meth:`_kept`: its share where
        the ranks split the analysis), taken on every rank (sharded strategies gather the LoRA
        factors collectively, and copies are made while they are whole), and the W₀ numbers
        that can only be taken now, of every module: a sharded or
        partitioned W₀'s are summed over the ranks (a collective), and FSDP (1) frees the W₀ it
        gathers (they are computed inside its gather, and no reference to it is kept)."""
        results: dict[ModuleKey, dict[str, Tensor]] = {}
        # Read-only: products of the live parameters must record no autograd graph.
        with self.rank_context.gathered(), torch.no_grad():
            live = self._monitored_factors()
            sums = ShardedBaseSums() if base_numbers else None
            snapshot = capture_kept(live, self._kept(live), step, sums)  # every rank: collectives
            if sums is not None:
                with self.reporter.contained(f"step {step}: the W₀ numbers of sharded modules"):
                    results = sums.results()  # every rank: a collective
            if self.rank_context.keeps_base_weight:
                return snapshot, results
            if base_numbers:
                with self.reporter.contained(f"step {step}: the W₀ numbers"):
                    results |= base_weight_results(snapshot.factors)
            return snapshot.without_base_weights(), results

    def _collect(self, wait: bool) -> None:
        """Keep, report and write the outcomes the runner finished (all of them if ``wait``)."""
        if self.runner is None:
            return
        for outcome in self.runner.results(wait):
            self._publish(outcome)

    def _publish(self, outcome: Outcome) -> None:
        if outcome.analyses is not None:
            self._latest = outcome
        self.reporter.publish(outcome)

    def _recommend(self, outcome: Outcome) -> None:
        """The rank an analyzed outcome suggests (:func:`recommend_rank`), decided once per
        snapshot, on every rank; a failure is one of its problems."""
        assert outcome.analyses is not None
        try:
            outcome.recommendation = recommend_rank(
                outcome.analyses,
                probe=outcome.probe,
                reference_is_run=self.options.compares_runs,
                basis=self.options.basis,
                groups=self._groups,
                trained=self._trained,
                not_covered=self._not_covered,
            )
        except Exception as error:
            outcome.problems.append(
                f"step {outcome.step}: the rank recommendation failed with {type(error).__name__}: {error}"
            )

    def _read_probe(self, step: int, final: bool) -> Optional[ProbeReading]:
        assert self._model is not None
        return self.probe_runner.read(
            self._model,
            self.options.adapter_name,
            self._module_names,
            self.rank_context,
            step,
            final,
            groups=self._module_groups,
        )

    def _take_snapshot(self, step: int, final: bool = False) -> None:
        assert self.runner is not None
        self._snapshot_step = step
        try:
            snapshot, base_results = self._capture(step)
        except LoRAMonitorError as error:  # e.g. the adapter was merged or unloaded mid-run
            self.reporter.report(f"step {step}: no snapshot taken: {error}")
            return
        # What the snapshot is compared with is decided here, at its step, whether it is then
        # analyzed here or in the worker: checkpoints and resume see only this thread's state.
        reference, reference_step = self.references.for_snapshot()
        if step % self.options.every_n_steps == 0:
            # The end-of-training snapshot off the schedule is compared but never becomes the
            # reference: a run stopped there and resumed must compare with what an
            # uninterrupted run compares with.
            self.references.remember(snapshot)
        probe = self._read_probe(step, final)
        self.runner.submit(
            Job(snapshot, reference, reference_step, self.references.initial_factors, base_results, probe)
        )
        self._collect(wait=False)  # a synchronous analysis is done: published at its own step

    def _kept(self, live: dict[ModuleKey, LoRAFactors]) -> list[ModuleKey]:
        """The ``live`` modules this rank copies into its snapshots: its share where the ranks
        split the analysis (the references then drop the others), every module otherwise."""
        assert self.runner is not None
        share = self.runner.share(live)
        if share is None:
            return list(live)
        self.references.keep_only(share)
        return share

    def _analyze(self, job: Job) -> Outcome:
        """The analyses of ``job``'s modules, and its problems (the analysis's own errors
        included: an analysis fault must never end a training run). Runs in whichever thread
        analyses; writes only the reference bases' cache."""
        step = job.snapshot.step
        outcome = Outcome(step, probe=job.probe)
        try:
            outcome.analyses = analyze(
                job.snapshot,
                job.reference,
                self.options.basis,
                initial=job.initial,
                intruder_top_k=self.options.intruder_top_k,
                reference_bases=self.references.bases_of(job.reference, job.snapshot),
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

    # ------------------------------------------------------------------------------ resume
    def state_dict(self, every_rank: bool = False) -> dict[str, Any]:
        """The references ("first", "previous", the factors before the first step) and the
        last snapshot's step. Where the ranks split the analysis each holds its share of the
        references; ``every_rank`` gathers the shares into one state (a collective: every rank
        calls it) for a front-end whose framework saves one state and restores it on every rank
        (Lightning), each rank then keeping its share again."""
        state = {
            "last_step": self._snapshot_step,
            **self.references.state_dict(),
            "probe": self.probe_runner.state_dict(),
        }
        if every_rank and self.rank_context.spreads_analysis:
            names = ("first", "previous", "initial")
            shares = all_gather_objects({name: state[name] for name in names})
            for name in names:
                parts = [share[name] for share in shares if share[name] is not None]
                if parts:
                    state[name] = {"step": parts[0]["step"], "modules": [m for part in parts for m in part["modules"]]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshot_step = state_dict.get("last_step")
        self.references.load_state_dict(state_dict)
        self.probe_runner.load_state_dict(state_dict.get("probe") or {})
