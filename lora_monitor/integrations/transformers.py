"""The transformers front-end: :class:`LoRASubspaceCallback`, a ``TrainerCallback`` over the
engine, for ``Trainer`` and TRL's ``SFTTrainer`` (also under ``torchrun`` / ``accelerate``)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from typing_extensions import Unpack, override

from lora_monitor.engine import AnalysisWarning, LoRAMonitor, MonitorKwargs, MonitorOptions, spells_out_options
from lora_monitor.engine.distributed import RankContext
from lora_monitor.integrations.engine_results import EngineResults
from lora_monitor.outputs.writers import MLflowOutput, Output, SummaryWriterOutput, WandbOutput

#: The checkpoint file of a monitor's state, inside each ``checkpoint-N`` directory.
STATE_FILE = "lora_monitor_state-{key}.pt"


def _output_dir(args: TrainingArguments) -> Path:
    assert args.output_dir is not None  # TrainingArguments fills in its default
    return Path(args.output_dir)


def tensorboard_run_dir(args: TrainingArguments, since: float) -> Path:
    """The directory transformers' ``TensorBoardCallback`` writes ``train/loss`` into:
    ``TENSORBOARD_LOGGING_DIR``, else the ``<output_dir>/runs/<date>_<host>`` it opened at this
    run's ``on_train_begin`` (the newest one made after ``since``), else a new one named so."""
    configured = os.getenv("TENSORBOARD_LOGGING_DIR")
    if configured:
        return Path(os.path.expanduser(configured))
    runs = _output_dir(args) / "runs"
    # TensorBoardCallback names its directory by the second it started; it has just made it.
    fresh = [p for p in runs.glob("*") if p.is_dir() and p.stat().st_mtime >= since - 1]
    if fresh:
        return max(fresh, key=lambda p: p.stat().st_mtime)
    from transformers.integrations.integration_utils import default_logdir

    return _output_dir(args) / default_logdir()


def _report_to_outputs(args: TrainingArguments) -> list[Output]:
    """The other ``report_to`` integrations that have a run open: W&B and MLflow."""
    report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
    outputs: list[Output] = []
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            outputs.append(WandbOutput(wandb.run))
    if "mlflow" in report_to:
        import mlflow

        run = mlflow.active_run()
        if run is not None:
            outputs.append(MLflowOutput(run.info.run_id))
    return outputs


@spells_out_options
class LoRASubspaceCallback(EngineResults, TrainerCallback):
    r"""Watch the low-rank updates ΔW of a peft LoRA model while a transformers ``Trainer`` (or
    TRL's ``SFTTrainer``, which wraps the model with peft itself) trains it.

    Every ``every_n_steps`` optimizer steps (``state.global_step``), and once when training
    ends, the callback snapshots the LoRA factors, computes the LoRA paper's subspace
    similarity φ against its reference, spectra, amplification and a rank suggestion, and
    writes them into the same TensorBoard run as the Trainer's own ``train/loss`` (where
    ``TensorBoardCallback`` writes: ``TENSORBOARD_LOGGING_DIR`` or
    ``<output_dir>/runs/<date>_<host>``), and to the W&B and MLflow runs of ``report_to`` when
    they are open. The work is the engine's, :class:`lora_monitor.LoRAMonitor`, whose docstring
    lists every tag written and what it means.

    Args:
        every_n_steps, reference, target_modules, layers, basis, adapter_name, log_images,
        strict, intruder_top_k, asynchronous, probe_budget, adapter_dir: as
            :class:`lora_monitor.LoRAMonitor`.
        functional_probe: read the rank the task needs from the model's own loss on the first
            batch it trains on with every monitored ΔW cut to k directions (a few forward
            passes a snapshot, without gradients; the batch must hold ``labels``).
        probe: the loss to probe instead, a callable of no argument (e.g. a ``Trainer`` whose
            ``compute_loss`` is not the model's own loss: ``lambda: trainer.compute_loss(model,
            probe_batch)``), called in eval mode without gradients.
        log_dir: write the TensorBoard run there instead.

    Only the main process writes. Under ``torchrun`` / ``accelerate`` every process snapshots
    at the same steps, the analysis is split across them, and FSDP and DeepSpeed ZeRO-3
    gather only the LoRA factors. The callback's state is saved in every ``checkpoint-N``
    directory (``lora_monitor_state-<key>.pt``, per process under several):
    ``trainer.train(resume_from_checkpoint=...)``
    compares with the reference an uninterrupted run compares with.

    Example::

        >>> from transformers import Trainer, TrainingArguments
        >>> from lora_monitor import LoRASubspaceCallback
        >>> callback = LoRASubspaceCallback(every_n_steps=50, reference="first")
        >>> args = TrainingArguments(output_dir="out", report_to=["tensorboard"])
        >>> # Trainer(model=peft_model, args=args, train_dataset=..., callbacks=[callback]).train()
    """

    def __init__(
        self,
        *,
        probe: Optional[Callable[[], Any]] = None,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        **options: Unpack[MonitorKwargs],
    ) -> None:
        self.engine = LoRAMonitor(options=MonitorOptions(**options, owner=type(self).__name__), probe=probe)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._created = time.time()

    def state_file(self, args: TrainingArguments) -> str:
        """This callback's file in a checkpoint directory: one per monitor (several keep apart)
        and, with several processes, one per process (as the Trainer's ``rng_state_<i>.pth``)."""
        summary = json.dumps(self.engine.options.identity(), sort_keys=True, default=str)
        key = hashlib.sha1(summary.encode()).hexdigest()[:10]
        if args.world_size > 1:
            key += f"-rank{args.process_index}"
        return STATE_FILE.format(key=key)

    # ------------------------------------------------------------------------------ events
    @override
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is None:
            raise ValueError("LoRASubspaceCallback: the Trainer passed no model to on_train_begin")
        # The model the Trainer hands over is FSDP's wrapped root, or one ZeRO-3 partitions.
        rank_context = RankContext.for_model(model, rank=args.process_index, world_size=args.world_size)

        def outputs() -> list[Output]:  # on the main process only: the Trainer's run, report_to's runs
            directory = self.log_dir or tensorboard_run_dir(args, self._created)
            return [SummaryWriterOutput(log_dir=directory), *_report_to_outputs(args)]

        self.engine.attach(model, rank_context=rank_context, outputs=outputs)
        if state.global_step > 0:
            self._resume(args, state)
        self.engine.start(state.global_step, planned_end=state.max_steps or None)
        if self.engine.wants_probe_batch:
            self._capture_first_batch(model)

    def _capture_first_batch(self, model: torch.nn.Module) -> None:
        """The functional probe's batch: the inputs of the model's first training forward
        (what the Trainer's ``compute_loss`` passes it); its loss is the model's own."""

        def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if module.training and kwargs:
                self.engine.capture_probe_batch(kwargs, lambda batch: model(**batch))
                handle.remove()

        handle = model.register_forward_pre_hook(capture, with_kwargs=True)

    @override
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.engine.after_optimizer_step(state.global_step)

    @override
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        # Every process saves its own state: each restores its own, whatever the file system.
        checkpoint = _output_dir(args) / f"checkpoint-{state.global_step}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        torch.save(self.engine.state_dict(), checkpoint / self.state_file(args))

    @override
    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        try:
            self.engine.finish(state.global_step)
        finally:
            self.engine.close()  # and the TensorBoard writer it opened

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """Load the state saved in the checkpoint training resumes from (found by its step)."""
        candidates = [_output_dir(args) / f"checkpoint-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        name = self.state_file(args)
        for directory in candidates:
            file = directory / name
            if file.is_file():
                self.engine.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
                return
        if state.is_world_process_zero:
            warnings.warn(
                f"LoRASubspaceCallback: training resumes at step {state.global_step} but no "
                f"{name} was found in {', '.join(map(str, candidates))}: the "
                f"reference {str(self.engine.options.reference)!r} starts again from this run's "
                f"next snapshot, and a_init_similarity is not logged (the factors before step 1 "
                f"are unknown)",
                AnalysisWarning,
                stacklevel=2,
            )
