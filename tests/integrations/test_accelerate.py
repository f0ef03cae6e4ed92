"""lora_monitor.integrations.accelerate: :class:`LoRAAcceleratorMonitor` in a real ``Accelerator``
loop, writing into the accelerator's own TensorBoard tracker, its numbers against peft's own ΔW,
and its state saved and restored by ``save_state`` / ``load_state``."""

from __future__ import annotations

import pytest
import torch

from lora_monitor.integrations.accelerate import LoRAAcceleratorMonitor
from lora_monitor.outputs.tags import RECOMMENDATION_TEXT_TAG, SUGGESTED_TAG, scalar_tag
from tests.helpers.dense import dense_updates
from tests.helpers.events import read_events
from tests.helpers.models import tiny_llama_lora

accelerate = pytest.importorskip("accelerate")

STEPS, EVERY = 4, 2


def _accelerated(root):
    accelerator = accelerate.Accelerator(cpu=True, log_with="tensorboard", project_dir=str(root))
    accelerator.init_trackers("run")
    model = tiny_llama_lora(rank=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_an_accelerator_loop_writes_into_its_tensorboard_tracker(tmp_path):
    accelerator, model, optimizer = _accelerated(tmp_path)
    tokens = torch.randint(3, 64, (STEPS, 4, 8), generator=torch.Generator().manual_seed(0))
    probe_batch = {"input_ids": tokens[0], "labels": tokens[0]}
    with LoRAAcceleratorMonitor(
        accelerator, model, every_n_steps=EVERY, probe=lambda: model(**probe_batch).loss, strict=True
    ) as monitor:
        accelerator.register_for_checkpointing(monitor)
        for step in range(1, STEPS + 1):
            accelerator.backward(model(input_ids=tokens[step - 1], labels=tokens[step - 1]).loss)
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(step)
        accelerator.save_state(str(tmp_path / "checkpoint"))
    accelerator.end_training()
    events = read_events(tmp_path / "run")
    # peft's own ΔW of the trained model against the last snapshot's norms.
    for key, (delta, _, _) in dense_updates(accelerator.unwrap_model(model)).items():
        (*_, last) = events.Scalars(scalar_tag("delta_w_norm", key))
        assert last.step == STEPS
        assert last.value == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-5)
    assert [event.step for event in events.Scalars(SUGGESTED_TAG)] == [2, 4]
    assert [event.step for event in events.Tensors(RECOMMENDATION_TEXT_TAG)] == [STEPS]
    assert monitor.engine.recommendation is not None and monitor.engine.recommendation.probe is not None

    # save_state carried the monitor's state; load_state gives it to a new monitor of a new run.
    accelerator, model, _ = _accelerated(tmp_path / "resumed")
    resumed = LoRAAcceleratorMonitor(accelerator, model, every_n_steps=EVERY, log_images=False)
    accelerator.register_for_checkpointing(resumed)
    accelerator.load_state(str(tmp_path / "checkpoint"))
    saved, restored = monitor.state_dict(), resumed.state_dict()
    assert restored["step"] == saved["step"] == STEPS and restored["last_step"] == saved["last_step"] == STEPS
    assert saved["first"] is not None and saved["initial"] is not None  # reference="first" keeps both
    for name in ("first", "previous", "initial"):
        assert (restored[name] or {}).get("step") == (saved[name] or {}).get("step")
    resumed.close(RuntimeError("the test stops here"))
