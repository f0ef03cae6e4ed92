"""Target 2: the monitor's training overhead with default settings, ≤ 1 % of fit wall time.

Trains the real example (all-MiniLM-L6-v2 with LoRA, ``examples/train_minilm_topics.py``) with
the monitor on (default settings: every 50 steps, reference "first", images) and off, in fresh
processes, alternating on/off ``--pairs`` times, and compares the medians of the training wall
time (validation excluded, as the example's timer measures it). The CPU time per step, steadier
on a shared machine, is printed beside it. Exit status 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_minilm_topics.py"
TIMING = re.compile(r"(\d+) steps, ([\d.]+) s/step wall, ([\d.]+) CPU-s/step")


def train(steps: int, monitor: bool, logdir: str) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one training run's steps."""
    command = [sys.executable, str(EXAMPLE), "--max-steps", str(steps), "--val-every", str(steps), "--logdir", logdir]
    if not monitor:
        command.append("--no-monitor")
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = TIMING.search(output)
    if match is None:
        raise RuntimeError(f"no timing line in the example's output:\n{output}")
    done, wall, cpu = int(match[1]), float(match[2]), float(match[3])
    return wall * done, cpu * done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps a run (the example's default)")
    parser.add_argument("--pairs", type=int, default=3, help="on/off pairs, alternated")
    args = parser.parse_args()
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as logdir:
        for pair in range(args.pairs):
            for monitor in ((True, False) if pair % 2 else (False, True)):
                runs[monitor].append(train(args.steps, monitor, logdir))
                wall, cpu = runs[monitor][-1]
                print(f"  monitor {'on ' if monitor else 'off'}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    on_wall, off_wall = (statistics.median(w for w, _ in runs[m]) for m in (True, False))
    on_cpu, off_cpu = (statistics.median(c for _, c in runs[m]) for m in (True, False))
    print(f"MiniLM, {args.steps} steps, medians of {args.pairs}: on {on_wall:.1f} s, off {off_wall:.1f} s wall; "
          f"CPU on {on_cpu:.1f} s, off {off_cpu:.1f} s ({100 * (on_cpu / off_cpu - 1):+.2f} %)")
    targets = Targets()
    targets.check("monitor overhead, fit wall time", 100 * (on_wall / off_wall - 1), 1.0, " %")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
