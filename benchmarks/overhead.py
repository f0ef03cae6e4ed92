"""Target 2: the monitor's training overhead with default settings, ≤ 1 % of fit wall time.

Fine-tunes the real example (all-MiniLM-L6-v2 with LoRA on query/value,
``examples/minilm_topics.py``: 200 steps, validation every 50) with the monitor on (default
settings: every 50 steps, reference "first", images to TensorBoard) and off, in one process,
alternating off/on and on/off pair by pair, each run from a freshly built model and a cleared
figure cache, and compares the medians of ``trainer.fit`` wall time.

A whole fit varies by about a percent between identical runs on a shared machine, as much as
the target itself, so the time spent inside the monitor's hooks is also measured directly in
every monitored run and printed beside it: the same quantity without the run-to-run noise.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from common import Targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from minilm_topics import TopicClassifier  # noqa: E402

from lora_monitor import LoRASubspaceMonitor  # noqa: E402
from lora_monitor import plots  # noqa: E402

HOOKS = ("setup", "on_train_start", "on_train_batch_end", "on_train_end")


class HookTimer:
    """Wraps a callback's hooks on the instance and adds up the wall time spent in them."""

    def __init__(self, callback: pl.Callback) -> None:
        self.seconds = 0.0
        for name in HOOKS:
            setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, hook):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def fit(steps: int, monitor: bool, logdir: str) -> tuple[float, float]:
    """``(fit wall seconds, seconds inside the monitor's hooks)`` of one fresh training run."""
    plots._FRAMES.clear()  # every monitored run pays for drawing its figure's frame
    module = TopicClassifier(rank=8, seed=0)
    callbacks, timer = [], None
    if monitor:
        callback = LoRASubspaceMonitor()
        timer = HookTimer(callback)
        callbacks.append(callback)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name="monitor_on" if monitor else "monitor_off"),
        callbacks=callbacks,
        val_check_interval=50,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="auto",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module)
    return time.perf_counter() - start, timer.seconds if timer else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps a run (the example's default)")
    parser.add_argument("--pairs", type=int, default=3, help="on/off pairs, alternated")
    args = parser.parse_args()
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as logdir:
        for pair in range(args.pairs):
            for monitor in ((True, False) if pair % 2 else (False, True)):
                runs[monitor].append(fit(args.steps, monitor, logdir))
                wall, inside = runs[monitor][-1]
                print(f"  monitor {'on ' if monitor else 'off'}: fit {wall:.1f} s, inside the monitor {inside:.2f} s",
                      flush=True)
    on = statistics.median(wall for wall, _ in runs[True])
    off = statistics.median(wall for wall, _ in runs[False])
    share = statistics.median(100 * inside / wall for wall, inside in runs[True])
    print(f"MiniLM, {args.steps} steps, medians of {args.pairs}: fit on {on:.1f} s, off {off:.1f} s "
          f"({100 * (on / off - 1):+.2f} %); time inside the monitor: {share:.2f} % of the monitored fit")
    targets = Targets()
    targets.check("monitor overhead, fit wall time on vs off", 100 * (on / off - 1), 1.0, " %")
    targets.check("time inside the monitor's hooks, share of fit wall time", share, 1.0, " %")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
