"""Issue 23: what the probe's schedule and its kept loss(0) change in what the monitor says.

The planted-rank teacher/student cases of ``tests/end_to_end/test_planted_rank.py`` (tiny Llama,
a rank-K update planted in every q and v, LoRA r = 16 or 4, 120 steps, a snapshot every 30, a
plain loop with ``probe=``), each trained twice with the same seeds: once with the probe read at
every snapshot (the former behaviour: ``probe_budget=float("inf")``) and once with the default schedule
(readings within 0.5 % of the training time, the end always read). Printed per snapshot: the
suggestion and the probe's rank of each, from the TensorBoard scalars; and whether the final
recommendations (what the console and the report say) and the final readings' losses are equal.
Exit status 1 if a final recommendation or reading differs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_monitor.engine import MonitorOptions  # noqa: E402
from lora_monitor.outputs.tags import PROBE_RANK_TAG, SUGGESTED_TAG  # noqa: E402
from tests.end_to_end.test_planted_rank import _train_student  # noqa: E402
from tests.helpers.events import read_events, scalar_series  # noqa: E402

CASES = [(2, 16, 0), (4, 16, 0), (8, 4, 0)]


def run(planted: int, rank: int, seed: int, budget: float):
    with tempfile.TemporaryDirectory() as log_dir:
        monitor = _train_student(planted, rank=rank, seed=seed, log_dir=log_dir, probe_budget=budget)
        events = read_events(log_dir)
        probed = PROBE_RANK_TAG in events.Tags()["scalars"]
        return monitor, scalar_series(events, SUGGESTED_TAG), scalar_series(events, PROBE_RANK_TAG) if probed else {}


def main() -> int:
    torch.set_num_threads(1)  # the machine is shared: two threads oversubscribe it
    default, differ = MonitorOptions().probe_budget, []
    for planted, rank, seed in CASES:
        every, suggested_every, probe_every = run(planted, rank, seed, float("inf"))
        scheduled, suggested_now, probe_now = run(planted, rank, seed, default)
        print(f"K = {planted}, r = {rank}, seed {seed}:")
        for step in sorted(suggested_every):
            print(
                f"  step {step:4d}: suggested {suggested_every[step]:.0f} → {suggested_now.get(step, float('nan')):.0f}"
                f", probe's rank {probe_every.get(step, float('nan')):.0f} → {probe_now.get(step, float('nan')):.0f}"
            )
        a, b = every.recommendation, scheduled.recommendation
        same = (a.rank, a.low, a.high, a.weak, a.too_small) == (b.rank, b.low, b.high, b.weak, b.too_small)
        same_reading = every.latest_probe_reading.losses == scheduled.latest_probe_reading.losses
        print(f"  end of training: recommendation {a.rank} ({a.low}–{a.high}) → {b.rank} ({b.low}–{b.high}), "
              f"{'the same' if same else 'DIFFERENT'}; final probe losses {'equal' if same_reading else 'DIFFERENT'}")
        if not (same and same_reading):
            differ.append((planted, rank, seed))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
