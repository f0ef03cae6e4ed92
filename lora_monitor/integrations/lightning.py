"""The Lightning front-end: :class:`LoRASubspaceMonitor`, a ``Callback`` over the engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

try:
    import lightning.pytorch as pl
except ImportError as error:  # an extra: the core and the transformers front-end do without it
    raise ModuleNotFoundError(
        "LoRASubspaceMonitor is the PyTorch Lightning front-end and needs Lightning, which is not "
        "installed: pip install 'lora-monitor[lightning]' (or use LoRASubspaceCallback with "
        "transformers' Trainer, or LoRAMonitor in a plain loop)"
    ) from error
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lora_monitor.engine import LoRAMonitor, MonitorOptions
from lora_monitor.engine.distributed import RankContext
from lora_monitor.functional.bases import Basis
from lora_monitor.integrations.engine_results import EngineResults
from lora_monitor.integrations.lightning_loggers import logger_outputs


def _quiet_training_step(pl_module: pl.LightningModule, batch: Any) -> Any:
    """``training_step`` on the probe batch, its ``self.log`` calls dropped (the probe's loss is
    not a training metric)."""
    quiet = lambda *args, **kwargs: None  # noqa: E731
    pl_module.log = pl_module.log_dict = quiet  # type: ignore[method-assign]
    try:
        return pl_module.training_step(batch, 0)
    finally:
        del pl_module.log, pl_module.log_dict  # the class's methods again


def _planned_end(trainer: pl.Trainer) -> Optional[int]:
    """The optimizer steps the fit is planned to end at: ``max_steps``, else Lightning's own
    estimate from the epochs and the data (None where it cannot tell, e.g. an iterable dataset)."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    try:
        planned = trainer.estimated_stepping_batches
    except Exception:  # an estimate only: the monitor does without it
        return None
    return int(planned) if planned != float("inf") else None


class LoRASubspaceMonitor(EngineResults, Callback):
    r"""Watch the low-rank updates ΔW = s·B·A of a peft LoRA model while Lightning trains it.

    Every ``every_n_steps`` optimizer steps (``trainer.global_step``), and once at the end of
    fit, the monitor snapshots the LoRA factors of the monitored projections, computes the LoRA
    paper's normalized subspace similarity

    .. math:: \phi(X, Y, i, j) = \|U_X^{i\top} U_Y^{j}\|_F^2 / \min(i, j)

    between a reference X and the current update Y, with spectra, amplification and a rank
    suggestion, and logs them to every logger of the ``Trainer`` (TensorBoard, CSV, W&B,
    MLflow; images where the logger shows them). The work is the engine's,
    :class:`lora_monitor.LoRAMonitor`, whose docstring lists every tag logged and what it means.

    Args:
        every_n_steps, reference, target_modules, layers, basis, adapter_name, log_images,
        strict, intruder_top_k, asynchronous, probe_budget, adapter_dir: as
            :class:`lora_monitor.LoRAMonitor`.
        functional_probe: read the rank the task needs from the loss of ``training_step`` on
            the first batch of the fit with every monitored ΔW cut to k directions (a few
            forward passes a snapshot, without gradients, in eval mode, ``self.log`` silenced;
            not for manual optimization). ``training_step`` is then called more often than
            the optimizer steps: turn this off if it does more than compute the loss (counts
            calls, updates a torchmetrics metric).

    Under several processes (DDP, FSDP, DeepSpeed), FSDP and ZeRO-3 gather only the LoRA
    factors, a synchronous analysis is split across the ranks, and only global rank zero logs.
    The monitor's state (its references) is saved in Lightning checkpoints, so a resumed fit
    compares with what an uninterrupted one compares with.

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
        target_modules: Optional[Union[str, Sequence[str]]] = None,
        layers: Optional[Sequence[int]] = None,
        basis: Basis = "A",
        adapter_name: Optional[str] = None,
        log_images: bool = True,
        strict: bool = False,
        intruder_top_k: Optional[int] = None,
        asynchronous: Optional[bool] = None,
        functional_probe: bool = True,
        probe_budget: float = 0.005,
        adapter_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        try:
            options = MonitorOptions.of(locals(), owner=type(self).__name__)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None
        self.engine = LoRAMonitor(options=options)

    # The options, as Lightning users (and LightningCLI) read them back.
    every_n_steps = property(lambda self: self.engine.options.every_n_steps)
    reference = property(lambda self: self.engine.options.reference)
    target_modules = property(lambda self: self.engine.options.target_modules)
    layers = property(lambda self: self.engine.options.layers)
    basis = property(lambda self: self.engine.options.basis)
    adapter_name = property(lambda self: self.engine.options.adapter_name)
    log_images = property(lambda self: self.engine.options.log_images)
    strict = property(lambda self: self.engine.options.strict)
    intruder_top_k = property(lambda self: self.engine.options.intruder_top_k)
    asynchronous = property(lambda self: self.engine.options.asynchronous)
    functional_probe = property(lambda self: self.engine.options.functional_probe)
    probe_budget = property(lambda self: self.engine.options.probe_budget)

    @property
    @override
    def state_key(self) -> str:
        # Two monitors in one Trainer (say one against "first", one against a directory) must
        # not overwrite each other's state in the checkpoint.
        return self._generate_state_key(**self.engine.options.identity())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `LoRASubspaceMonitor` callback with `Trainer` that has no logger: "
                "pass e.g. `logger=TensorBoardLogger('runs')`."
            )
        # The strategy's wrapped model tells how to gather: FSDP's root, DeepSpeed's engine.
        wrapped = trainer.strategy.model or pl_module
        rank_context = RankContext.for_model(wrapped, rank=trainer.global_rank, world_size=trainer.world_size)
        outputs = lambda: logger_outputs(trainer.loggers)  # noqa: E731
        self.engine.attach(pl_module, rank_context=rank_context, outputs=outputs, console=rank_zero_info)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.start(trainer.global_step, planned_end=_planned_end(trainer))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine.wants_probe_batch:
            if pl_module.automatic_optimization:
                self.engine.capture_probe_batch(batch, lambda probe_batch: _quiet_training_step(pl_module, probe_batch))
            else:
                self.engine.refuse_probe("under manual optimization training_step steps the optimizers itself")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.engine.after_optimizer_step(trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.finish(trainer.global_step)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception: what was analyzed is still logged, and
        # the error that stops fit stays the one raised.
        self.engine.close(exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.engine.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        # Lightning saves one callback state (every rank builds it: checkpointing is called on
        # all ranks) and restores it on every rank: the ranks' shares of the references, whole.
        return self.engine.state_dict(every_rank=True)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
