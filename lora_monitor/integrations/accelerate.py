"""The accelerate front-end: :class:`LoRAAcceleratorMonitor`, the engine in an ``Accelerator`` loop."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from typing_extensions import Unpack

from lora_monitor.engine import LoRAMonitor, MonitorKwargs, MonitorOptions, spells_out_options
from lora_monitor.engine.distributed import RankContext
from lora_monitor.integrations.engine_results import EngineResults
from lora_monitor.outputs.writers import MLflowOutput, Output, SummaryWriterOutput, WandbOutput


def tracker_outputs(accelerator: Any) -> list[Output]:
    """The accelerator's trackers the monitor can write to: TensorBoard, W&B, MLflow."""
    writers = {"tensorboard": SummaryWriterOutput, "wandb": WandbOutput}
    outputs: list[Output] = [writers[t.name](t.tracker) for t in accelerator.trackers if t.name in writers]
    outputs += [MLflowOutput(t.tracker.info.run_id) for t in accelerator.trackers if t.name == "mlflow"]
    return outputs


@spells_out_options
class LoRAAcceleratorMonitor(EngineResults):
    """Watch the LoRA updates of a model an ``accelerate.Accelerator`` trains: the engine
    (:class:`lora_monitor.LoRAMonitor`, whose docstring lists every tag), placed by the
    accelerator — its processes, its FSDP or DeepSpeed wrapping — and writing into its trackers
    (``log_with=``: TensorBoard, W&B, MLflow; or ``log_dir=``). Only the main process writes.
    ``accelerator.register_for_checkpointing(monitor)`` saves its state with ``save_state``.

    Args:
        accelerator: the ``Accelerator``, its trackers initialized (``init_trackers``).
        model: the prepared model (what ``accelerator.prepare`` returned).
        every_n_steps, reference, target_modules, layers, basis, adapter_name, log_images,
        strict, intruder_top_k, asynchronous, functional_probe, probe_budget, adapter_dir, probe,
        log_dir:
            as :class:`lora_monitor.LoRAMonitor`.

    Example (``tests/integrations/test_accelerate.py`` runs it)::

        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        with LoRAAcceleratorMonitor(accelerator, model, every_n_steps=50) as monitor:
            for step, batch in enumerate(loader, 1):
                ...; optimizer.step(); optimizer.zero_grad(); monitor.step(step)
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        *,
        probe: Optional[Callable[[], Any]] = None,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        **options: Unpack[MonitorKwargs],
    ) -> None:
        owner = type(self).__name__
        self.engine = LoRAMonitor(options=MonitorOptions(**options, owner=owner), probe=probe, log_dir=log_dir)
        ranks = RankContext.for_model(model, rank=accelerator.process_index, world_size=accelerator.num_processes)
        outputs = None if log_dir is not None else (lambda: tracker_outputs(accelerator))
        self.engine.attach(
            accelerator.unwrap_model(model), rank_context=ranks, outputs=outputs, console=accelerator.print
        )
        self.engine.start(0)
        self._step = 0

    def step(self, step: int) -> None:
        """Call after each optimizer step with the number of optimizer steps taken so far."""
        self._step = step
        self.engine.after_optimizer_step(step)

    def close(self, error: Optional[BaseException] = None) -> None:
        """Finish (a last snapshot, the rank recommendation) unless training failed, then close."""
        try:
            if error is None:
                self.engine.finish(self._step)
        finally:
            self.engine.close(error)

    def __enter__(self) -> LoRAAcceleratorMonitor:
        return self

    def __exit__(self, kind: Any, error: Optional[BaseException], traceback: Any) -> None:
        self.close(error)

    def state_dict(self) -> dict[str, Any]:  # accelerate's save_state / load_state
        return {"step": self._step, **self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = state.get("step", 0)
        self.engine.load_state_dict(state)
