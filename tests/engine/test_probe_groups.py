"""The functional probe of an adapter with attention and MLP modules reads each group apart, and
the schedule counts those forward passes against its budget (issue 22): every call of the
probe's loss is counted here, and over a run the readings before the end stay within the budget,
which they would overrun if the groups' passes went uncounted."""

from __future__ import annotations

import torch

from lora_monitor import LoRAMonitor
from lora_monitor.engine import MonitorOptions
from lora_monitor.engine.probe_runner import PASSES_PER_STEP
from tests.helpers.models import tiny_llama_lora

STEPS, EVERY = 3000, 100


def test_group_readings_are_counted_in_the_probe_budget():
    model = tiny_llama_lora(rank=4, target_modules="all-linear", hidden_size=16)
    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a target the whole update nearly reaches: the update lowers the loss
        target = model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        target = target + 1e-3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    calls = 0

    def probe() -> torch.Tensor:
        nonlocal calls
        calls += 1
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        return torch.nn.functional.mse_loss(hidden, target)

    monitor = LoRAMonitor(model, every_n_steps=EVERY, log_images=False, probe=probe)
    for step in range(1, STEPS):
        monitor.step(step)
    before_end = calls
    monitor.close()  # the end of training: always read
    reading = monitor.latest_probe_reading
    assert reading is not None and reading.rank is not None
    assert set(reading.groups) == {"attention", "mlp"}
    # The end's reading, pass by pass: the joint reading's (its loss(0) may be the frozen model's,
    # kept), and each group's but its whole-update loss (the joint reading's loss(r)).
    joint = len(reading.losses)
    groups = sum(len(g.losses) - 1 for g in reading.groups.values())
    assert calls - before_end in (joint + groups, joint - 1 + groups) and groups > 0
    # Before the end: within the budget, give or take one reading. Were the groups' passes not
    # counted, the schedule would read (joint + groups) / joint ≈ 2–3× as often as it may.
    reading_cost = joint + groups
    assert before_end <= MonitorOptions().probe_budget * PASSES_PER_STEP * STEPS + reading_cost, (
        before_end,
        reading_cost,
    )
    assert reading_cost > 1.5 * joint
