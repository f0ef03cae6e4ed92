"""The monitor under Lightning's data-parallel strategy on CPU: 2 processes over gloo.

Every rank trains on the same batches (``use_distributed_sampler=False``), so DDP's averaged
gradient equals the single-process one and the weights match step for step: the monitor must
log the same numbers as a single-process run, from global rank zero only, and never block.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_lora
from lightning_setup import CausalLMModule, make_trainer, read_events

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.callback import IMAGE_TAG

STEPS, EVERY = 4, 2


def _run(root: Path, **trainer_kwargs) -> Path:
    model = tiny_llama_lora(rank=4, randomize_B=False)
    monitor = LoRASubspaceMonitor(every_n_steps=EVERY, reference="first", basis="delta_w_left", strict=True)
    trainer = make_trainer(root, [monitor], max_steps=STEPS, **trainer_kwargs)
    trainer.fit(CausalLMModule(model))
    return Path(root) / "run" / "version_0"


def _logged(log_dir: Path) -> dict[str, dict[int, float]]:
    events = read_events(log_dir)
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
        if tag.startswith("lora_monitor/")
    }


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ddp_spawn_logs_what_a_single_process_logs(tmp_path):
    single = _run(tmp_path / "single")
    ddp = _run(
        tmp_path / "ddp",
        strategy="ddp_spawn",
        devices=2,
        use_distributed_sampler=False,
    )
    expected, got = _logged(single), _logged(ddp)
    assert expected and set(got) == set(expected)
    for tag, series in expected.items():
        assert sorted(got[tag]) == sorted(series), tag
        for step, value in series.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-5), (tag, step)
    # Written once: one event file (rank zero's), with the images of a single-process run.
    assert len(list(ddp.glob("events.out.tfevents.*"))) == 1
    assert [i.step for i in read_events(ddp).Images(IMAGE_TAG)] == [
        i.step for i in read_events(single).Images(IMAGE_TAG)
    ]
