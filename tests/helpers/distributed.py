"""Several processes: an engine that writes down which modules each process analyzed, reading it
back, and running a test script under ``torchrun``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from lora_monitor.engine import LoRAMonitor


class RecordingEngine(LoRAMonitor):
    """The engine, writing which modules this rank analyzed at each step to
    ``<record_dir>/rank<R>.jsonl``."""

    record_dir: Path

    def _analyze(self, job):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(self.record_dir / f"rank{rank}.jsonl", "a") as record:
            record.write(json.dumps([job.snapshot.step, sorted(job.snapshot.factors)]) + "\n")
        return super()._analyze(job)


def analyzed(record_dir: Path, rank: int) -> dict[int, set[tuple[int, str]]]:
    """step → the modules ``rank`` analyzed at that step, as :class:`RecordingEngine` wrote them."""
    lines = (record_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return {step: {tuple(key) for key in keys} for step, keys in map(json.loads, lines)}


#: ``torchrun`` beside this Python (None where it is not installed).
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
#: The repository's root, which a script run by torchrun needs on its path for ``tests.helpers``.
ROOT = Path(__file__).resolve().parents[2]


def run_script(script: Path, *arguments: str, processes: int = 1, timeout: int = 600) -> None:
    """Run a test script, under ``torchrun --nproc_per_node <processes>`` when ``processes`` > 1
    (gloo on CPU, one thread each), the repository's root on its path; fail with its stderr."""
    launcher = [TORCHRUN, "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(script), *arguments], capture_output=True, text=True, env=environment, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
