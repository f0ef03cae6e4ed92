"""Target 2: the monitor's training overhead with default settings, ≤ 1 % of fit wall time.

Two fits, each with the monitor on (default settings: every 50 steps, reference "first",
images to TensorBoard, the functional probe) and off, alternating off/on and on/off pair by
pair, comparing the medians of ``trainer.fit`` wall time:

- ``minilm``: the real example (all-MiniLM-L6-v2 with LoRA on query/value,
  ``examples/minilm_topics.py``: 200 steps, validation every 50); targets: ≤ 1 % on/off and
  ≤ 1 % of the fit inside the monitor's hooks;
- ``tiny-llama``: a short fit, a random Llama of 4 layers, hidden 256, LoRA r = 16 on q/v,
  150 steps of 4 × 32 tokens (seconds of training: the monitor's fixed costs — matplotlib, the
  figures' frames, the first probe — weigh most here); target: on/off ≤ 1.05.

``--threads`` sets torch's intra-op threads of every fit (default 1: on a small machine shared
with other work, two threads a fit oversubscribe the cores and a fit slows 10–30× at random).

Every run is a fresh Python process. Run in one process, the second fit of a pair was slower
than the first in 4 pairs out of 4 (by up to 5.7 %), whichever of the two had the monitor, and
that read as monitor overhead: something a fit leaves behind (allocator state, objects the
garbage collector walks, thread pools) seems to slow the next.

A whole fit varies by a few percent between identical runs on a shared machine, more than the
target itself, so the time spent inside the monitor's hooks is also measured directly in every
monitored run and printed beside it: the same quantity without the run-to-run noise; and the
on/off ratio of each pair (run back to back) is printed too, with the fits' CPU time (every
thread of the process: a drawing or import thread counts) and its ratio, which other jobs on
the machine disturb far less than wall time, and the load average when the pair ended. Exit
status 1 when a target is missed (wall time, as the targets are set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from common import Targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from minilm_topics import TopicClassifier  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lora_monitor import LoRASubspaceMonitor  # noqa: E402

HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_train_batch_end", "on_train_end")


class HookTimer:
    """Wraps a callback's hooks on the instance and adds up the wall time spent in them, and
    apart the functional probe's readings (inside the snapshot hooks)."""

    def __init__(self, callback: LoRASubspaceMonitor) -> None:
        self.seconds = self.probe_seconds = 0.0
        for name in HOOKS:
            setattr(callback, name, self._timed(getattr(callback, name), "seconds"))
        probe_runner = callback.engine.probe_runner
        probe_runner.read = self._timed(probe_runner.read, "probe_seconds")

    def _timed(self, hook, total: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                setattr(self, total, getattr(self, total) + time.perf_counter() - start)

        return timed


class TinyLlama(pl.LightningModule):
    """Next-token training of a random 4-layer Llama (hidden 256) with LoRA r = 16 on q/v."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8
        )
        lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        self.model = get_peft_model(LlamaForCausalLM(config), lora)
        self.steps = steps

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, 1000, (4 * self.steps, 32), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=4)


#: workload → (training steps, the module, Trainer arguments of its own).
WORKLOADS = {
    "minilm": (200, lambda steps: TopicClassifier(rank=8, seed=0), dict(val_check_interval=50)),
    "tiny-llama": (150, TinyLlama, dict(limit_val_batches=0)),
}


Fit = tuple[float, float, float, float]


def fit(workload: str, monitor: bool, logdir: str) -> Fit:
    """``(fit wall seconds, its CPU seconds, seconds inside the monitor's hooks, of which the
    probe's)`` of one fresh training run."""
    steps, make, arguments = WORKLOADS[workload]
    module = make(steps)
    callbacks, timer = [], None
    if monitor:
        callback = LoRASubspaceMonitor()
        timer = HookTimer(callback)
        callbacks.append(callback)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name="monitor_on" if monitor else "monitor_off"),
        callbacks=callbacks,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="auto",
        devices=1,
        **arguments,
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall, cpu, timer.seconds if timer else 0.0, timer.probe_seconds if timer else 0.0


def fit_in_child(workload: str, monitor: bool, logdir: str, threads: int) -> Fit:
    """:func:`fit` in a new Python process (see the module docstring for why)."""
    command = [sys.executable, __file__, "--workload", workload, "--threads", str(threads), "--logdir", logdir,
               "--child", "on" if monitor else "off"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"a benchmark run failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["wall"], result["cpu"], result["inside"], result["probe"]


def compare(workload: str, pairs: int, threads: int, targets: Targets) -> None:
    """``pairs`` on/off pairs of ``workload``, alternated; prints each pair side by side (wall
    and CPU time of both fits, their ratios, the time inside the monitor's hooks, the load
    average) and the medians."""
    runs: dict[bool, list[Fit]] = {True: [], False: []}
    pair_ratios, cpu_ratios = [], []
    print(f"{workload}: fit off / on, wall and CPU time (on vs off), inside the monitor's hooks (the probe), load")
    with tempfile.TemporaryDirectory() as logdir:
        for pair in range(pairs):
            for monitor in ((True, False) if pair % 2 else (False, True)):
                runs[monitor].append(fit_in_child(workload, monitor, logdir, threads))
            (off, off_cpu, _, _), (on, on_cpu, inside, probe) = runs[False][-1], runs[True][-1]
            pair_ratios.append(on / off)
            cpu_ratios.append(on_cpu / off_cpu)
            print(
                f"  pair {pair + 1} ({'on' if pair % 2 else 'off'} first): wall {off:.2f} / {on:.2f} s "
                f"({100 * (on / off - 1):+.1f} %), CPU {off_cpu:.2f} / {on_cpu:.2f} s "
                f"({100 * (on_cpu / off_cpu - 1):+.1f} %), inside {inside:.3f} s = {100 * inside / on:.2f} % "
                f"({probe:.3f} s), load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    on = statistics.median(wall for wall, _, _, _ in runs[True])
    off = statistics.median(wall for wall, _, _, _ in runs[False])
    on_cpu = statistics.median(cpu for _, cpu, _, _ in runs[True])
    off_cpu = statistics.median(cpu for _, cpu, _, _ in runs[False])
    share = statistics.median(100 * inside / wall for wall, _, inside, _ in runs[True])
    probe_share = statistics.median(100 * probe / wall for wall, _, _, probe in runs[True])
    print(f"{workload}, {WORKLOADS[workload][0]} steps, medians of {pairs}: fit on {on:.2f} s, off {off:.2f} s "
          f"({100 * (on / off - 1):+.2f} %, ×{on / off:.3f}); CPU on {on_cpu:.2f} s, off {off_cpu:.2f} s "
          f"(×{on_cpu / off_cpu:.3f}); pair by pair: wall {', '.join(f'{100 * (r - 1):+.1f} %' for r in pair_ratios)}"
          f"; CPU {', '.join(f'{100 * (r - 1):+.1f} %' for r in cpu_ratios)}; "
          f"time inside the monitor: {share:.2f} % of the monitored fit, of which the functional probe "
          f"{probe_share:.2f} %")
    if workload == "minilm":
        targets.check("MiniLM: monitor overhead, fit wall time on vs off", 100 * (on / off - 1), 1.0, " %")
        targets.check("MiniLM: time inside the monitor's hooks, share of fit wall time", share, 1.0, " %")
    else:
        targets.check(f"{workload}: fit wall time on / off", on / off, 1.05, "×")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all", help="which fit (default: both)")
    parser.add_argument("--pairs", type=int, default=3, help="on/off pairs a workload, alternated")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads a fit (see above)")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--logdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        wall, cpu, inside, probe = fit(args.workload, args.child == "on", args.logdir)
        print(json.dumps({"wall": wall, "cpu": cpu, "inside": inside, "probe": probe}))
        return 0
    targets = Targets()
    for workload in WORKLOADS if args.workload == "all" else (args.workload,):
        compare(workload, args.pairs, args.threads, targets)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
