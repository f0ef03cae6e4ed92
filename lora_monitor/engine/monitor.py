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

import torch
from typing_extensions import Unpack

from lora_monitor.adapters import LoRAFactors, LoRAMonitorError, ModuleKey
from lora_monitor.adapters.kinds import module_kind
from lora_monitor.analysis import ModuleAnalysis, Snapshot, shares_lora_A
from lora_monitor.analysis.probe import ProbeReading
from lora_monitor.analysis.rank import RankRecommendation
from lora_monitor.engine.distributed import RankContext
from lora_monitor.engine.monitored import BaseResults, Monitored, default_layers
from lora_monitor.engine.options import MonitorKwargs, MonitorOptions, spells_out_options
from lora_monitor.engine.probe_runner import ProbeRunner
from lora_monitor.engine.references import References
from lora_monitor.engine.reporter import OwnOutputs, Reporter
from lora_monitor.engine.runner import AnalysisRunner, Job, Outcome, analyze_job
from lora_monitor.outputs.writers import Output


@dataclasses.dataclass
class Progress:
    """How far the monitored run has come: the steps seen and taken, and what they concluded.

    Attributes:
        training_step: the latest training step :meth:`LoRAMonitor.step` was told of (the plain
            loop's end of training).
        snapshot_step: the step of the latest snapshot taken (saved as ``"last_step"``).
        latest: the latest analyzed snapshot's outcome: its analyses, probe and recommendation.
        recommendation: the rank suggested when training ended, the latest analysis's.
        planned_end: the step training is planned to end at, where the front-end knows it
            (not ``snapshot_step``, which the checkpoint saves as ``"last_step"``).
    """

    training_step: Optional[int] = None
    snapshot_step: Optional[int] = None
    latest: Optional[Outcome] = None
    recommendation: Optional[RankRecommendation] = None
    planned_end: Optional[int] = None


@spells_out_options
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
        every_n_steps: snapshot period, in optimizer steps (Lightning's
            ``trainer.global_step``); a last snapshot is taken when training ends.
        reference: what the current update is compared with: ``"first"`` — the first snapshot of
            the run; ``"previous"`` — the snapshot before; or the path of an adapter directory
            written by peft's ``save_pretrained`` (another rank or seed), whose shapes are
            checked layer by layer at setup.
        target_modules: which projections to monitor. Default (None, or ``"all-linear"`` as peft
            spells it): every LoRA module the adapter trains, grouped by kind (q, k, v, o, gate,
            up, down under each architecture's names), so that the probe cuts and the answer
            covers the whole adapter (the φ heatmaps draw q and v). Else canonical names
            ``"q"``, ``"k"``, ``"v"``, ``"o"`` (matching ``q_proj``, ``query``, GPT-2's fused
            ``c_attn``, ...) or a module's own name, as in peft's ``LoraConfig.target_modules``:
            ``("q", "v")`` is the paper's choice; the report then names the trained modules the
            answer does not cover.
        layers: layer indices whose φ heatmaps are drawn; scalars and the overview cover every
            monitored layer. Default: four layers spread over depth, like the paper's
            1/32/64/96.
        basis: the singular vectors φ is computed in
            (:data:`lora_monitor.functional.bases.BASES`): ``"A"`` (right singular vectors of
            ``lora_A``, the paper's choice), ``"B"`` (left singular vectors of ``lora_B``),
            ``"delta_w_left"``, ``"delta_w_right"`` (of ΔW).
        adapter_name: the peft adapter to monitor; default the active one.
        log_images: draw and log the figures (the overview and the φ heatmaps); scalars are
            always logged.
        strict: raise instead of warning when a snapshot of a module cannot be analyzed (for
            tests and CI). Errors in the configuration are raised at setup either way.
        intruder_top_k: count the intruder dimensions (Shuttleworth et al. 2024) among the top
            ``intruder_top_k`` singular vectors of W₀ + ΔW (e.g. 10). Off (None) by default: it
            takes two dense SVDs (of W₀ and of W₀ + ΔW) per module and snapshot.
        asynchronous: analyze and draw each snapshot in a worker thread (on a CUDA side stream
            on a GPU) while training goes on; the copy of the factors is still taken at its
            step, and its results are written from the training thread at a later step, under
            their own step, and all of them when training ends. Default (None): on when the
            monitored factors are on a CUDA device.
        functional_probe: read the functional probe (:mod:`lora_monitor.analysis.probe`), the
            loss on one batch with every monitored ΔW cut to k directions, at snapshots as often
            as its share of the training time allows (``docs/performance.md``; a snapshot it
            skips carries the latest reading) and always when training ends; it drives the rank
            suggestion with ΔW's spectral gaps. Off: the suggestion rests on ΔW's spectra alone.
        probe_budget: the share of training the functional probe's readings may take before
            training ends, counted in forward passes of a batch (a training step counts 3, so
            the same run is read at the same steps on any machine): a snapshot is read when the
            readings so far and the next fit in it. At the default 0.5 % the first reading comes
            after about 530 steps at r = 8, 730 at r = 16, 1000 at r = 64, and a shorter run is
            read at its end only, which is always read. ``float('inf')``: every snapshot, for
            early answers in a short run at their cost; 0: the end only.
        adapter_dir: the directory this run saves its adapter to
            (``model.save_pretrained(adapter_dir)``), named in the end-of-fit advice so that its
            ``lora-monitor truncate`` command runs as printed; default a placeholder,
            ``ADAPTER_DIR``.
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
        probe: Optional[Callable[[], Any]] = None,
        options: Optional[MonitorOptions] = None,
        **option_values: Unpack[MonitorKwargs],
    ) -> None:
        if options is None:
            options = MonitorOptions(**option_values, owner="LoRAMonitor")
        elif option_values:
            raise TypeError(
                f"LoRAMonitor: pass options= or the options one by one ({', '.join(option_values)}), "
                "not both: the ones passed one by one would be ignored"
            )
        self.options = options
        if log_dir is not None and writer is not None:
            raise ValueError(f"{options.owner}: pass log_dir= or writer=, not both")
        self._own_outputs = OwnOutputs(log_dir, writer, list(outputs))
        self.references = References(options)
        self.reporter = Reporter(options)
        self.probe_runner = ProbeRunner(self.reporter, options.functional_probe, options.probe_budget)
        self.probe_runner.loss = probe
        #: The model and what its set-up found (None before :meth:`attach`).
        self._monitored: Optional[Monitored] = None
        self.runner: Optional[AnalysisRunner] = None
        self._progress = Progress()
        if model is not None:
            self.attach(model)
            self.start(0)

    # -------------------------------------------------------------------- plain-loop API
    def step(self, step: int) -> None:
        """Call after each optimizer step with the number of optimizer steps taken so far."""
        if self._monitored is None:
            raise LoRAMonitorError(
                f"{self.options.owner}.step() before the model is known: pass it, LoRAMonitor(model, log_dir=...)"
            )
        self._progress.training_step = step
        self.after_optimizer_step(step)

    def close(self, error: Optional[BaseException] = None) -> None:
        """The end of the monitor's life, whatever ended training. Without ``error``: a plain
        loop's last steps are finished (:meth:`finish`: a final snapshot if the last step was not
        one, and the rank recommendation). With the ``error`` that stopped training: what was
        analyzed is written, and that error stays the one raised. Then the worker stops and the
        outputs the monitor opened close. Front-ends call it once, last."""
        try:
            training_step = self._progress.training_step
            if error is None and self._monitored is not None and training_step is not None:
                self.finish(training_step)
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
        if rank_context is None:
            rank_context = RankContext.for_model(model)
        if console is not None:
            self.reporter.info = console
        options = self.options
        watched, monitored = Monitored.attach(model, rank_context, options, self.references)
        self._monitored = watched
        if options.watches_all_trained:
            # The φ heatmaps keep the paper's q and v (where the adapter trains them).
            paper = {key[1] for key, f in monitored.items() if module_kind(f.projection, f.module_name) in ("q", "v")}
            self.reporter.drawn_projections = paper or None
        speaks = rank_context.is_main  # only global rank zero opens its outputs
        self.reporter.bind((outputs or self._own_outputs.open)() if speaks else [], speaks=speaks)
        self.reporter.drawn_layers = (
            list(options.layers) if options.layers is not None else default_layers([layer for layer, _ in monitored])
        )
        self.runner = AnalysisRunner(
            lambda job: analyze_job(job, options, self.references),
            lambda outcome: watched.recommend(outcome, options),
            self.reporter.prepare,
            rank_context,
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

    def start(self, step: int, planned_end: Optional[int] = None) -> None:
        """Training starts at ``step``: from a fresh start (0), keep the factors before the
        first optimizer step (``a_init_similarity``, a PiSSA-like initialization's B₀, A₀).
        ``planned_end``: the step training is planned to end at (``max_steps``), where the front-end
        knows it: a snapshot due there is the last one, its probe always read, so that its
        TensorBoard cards say what the end-of-fit recommendation says."""
        self._progress.planned_end = planned_end
        if self.references.initial is None:
            note = self.references.start(self._capture(step, base_numbers=False)[0], step)
            if note is not None:
                self.reporter.warn(note)
        self.probe_runner.start(step)

    def after_optimizer_step(self, step: int) -> None:
        """An optimizer step ended, ``step`` steps taken: write what the worker finished, and
        take a snapshot when one is due."""
        due = step > 0 and step % self.options.every_n_steps == 0 and step != self._progress.snapshot_step
        # A snapshot waits for the one before it: a worker slower than every_n_steps steps then
        # slows training down, rather than piling snapshots up in memory.
        self._collect(wait=due)
        if due:
            self._take_snapshot(step, final=step == self._progress.planned_end)

    def finish(self, step: int) -> None:
        """Training ended at ``step``: a last snapshot, every pending result written, and the
        rank recommendation."""
        progress = self._progress
        if step != progress.snapshot_step:
            self._take_snapshot(step, final=True)
        self._collect(wait=True)
        latest = progress.latest
        if latest is not None and self._monitored is not None and self.probe_runner.skipped == step:
            # The probe's schedule skipped the last snapshot, not known to be the last (a plain
            # loop; its cards carry the reading before): the recommendation rests on the probe of
            # its own step, decided again.
            latest = progress.latest = dataclasses.replace(
                latest, probe=self._read_probe(step, final=True), problems=[]
            )
            self._monitored.recommend(latest, self.options)
            for problem in latest.problems:
                self.reporter.report(problem)
        if latest is not None and latest.recommendation is not None:
            progress.recommendation = latest.recommendation  # the snapshot's, decided once
            with self.reporter.contained(f"step {step}: the rank recommendation"):
                self.reporter.write_recommendation(latest.recommendation, step)

    @property
    def recommendation(self) -> Optional[RankRecommendation]:
        """The rank suggested when training ended, from the latest analysis (None before)."""
        return self._progress.recommendation

    @property
    def latest_analysis(self) -> dict[ModuleKey, ModuleAnalysis]:
        """The analysis of the latest snapshot, ``(layer, projection) → ModuleAnalysis``."""
        latest = self._progress.latest
        return (latest.analyses or {}) if latest is not None else {}

    @property
    def latest_probe_reading(self) -> Optional[ProbeReading]:
        """The functional probe's reading the latest snapshot rests on (None: not read)."""
        latest = self._progress.latest
        return latest.probe if latest is not None else None

    @property
    def rank_context(self) -> RankContext:
        """Where the monitor runs (a single process before :meth:`attach`)."""
        return self._monitored.rank_context if self._monitored is not None else RankContext()

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
    def _capture(self, step: int, base_numbers: bool = True) -> tuple[Snapshot, BaseResults]:
        """This rank's snapshot and the W₀ numbers of its step (:meth:`Monitored.capture`)."""
        assert self._monitored is not None
        return self._monitored.capture(step, self.options, self._kept, self.reporter, base_numbers)

    def _collect(self, wait: bool) -> None:
        """Keep, report and write the outcomes the runner finished (all of them if ``wait``)."""
        if self.runner is None:
            return
        for outcome in self.runner.results(wait):
            self._publish(outcome)

    def _publish(self, outcome: Outcome) -> None:
        if outcome.analyses is not None:
            self._progress.latest = outcome
        self.reporter.publish(outcome)

    def _read_probe(self, step: int, final: bool) -> Optional[ProbeReading]:
        monitored = self._monitored
        assert monitored is not None
        return self.probe_runner.read(
            monitored.model,
            self.options.adapter_name,
            monitored.module_names,
            monitored.rank_context,
            step,
            final,
            groups=monitored.module_groups,
        )

    def _take_snapshot(self, step: int, final: bool = False) -> None:
        assert self.runner is not None
        self._progress.snapshot_step = step
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

    # ------------------------------------------------------------------------------ resume
    def state_dict(self, every_rank: bool = False) -> dict[str, Any]:
        """The references ("first", "previous", the factors before the first step) and the
        last snapshot's step. Where the ranks split the analysis each holds its share of the
        references; ``every_rank`` gathers the shares into one state (a collective: every rank
        calls it) for a front-end whose framework saves one state and restores it on every rank
        (Lightning), each rank then keeping its share again."""
        references = self.references.state_dict(every_rank and self.rank_context.spreads_analysis)
        return {"last_step": self._progress.snapshot_step, **references, "probe": self.probe_runner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._progress.snapshot_step = state_dict.get("last_step")
        self.references.load_state_dict(state_dict)
        self.probe_runner.load_state_dict(state_dict.get("probe") or {})
