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
    ``<record_dir>/rank<R>.jsonl`` (around the analysis its runner calls for each job)."""

    record_dir: Path

    def attach(self, model, **kwargs) -> None:
        super().attach(model, **kwargs)
        assert self.runner is not None
        analyze = self.runner.analyze

        def recorded(job):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(self.record_dir / f"rank{rank}.jsonl", "a") as record:
                record.write(json.dumps([job.snapshot.step, sorted(job.snapshot.factors)]) + "\n")
            return analyze(job)

        self.runner.analyze = recorded


def analyzed(record_dir: Path, rank: int) -> dict[int, set[tuple[int, str]]]:
    """step → the modules ``rank`` analyzed at that step, as :class:`RecordingEngine` wrote them."""
    lines = (record_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return {step: {tuple(key) for key in keys} for step, keys in map(json.loads, lines)}


#: ``torchrun`` beside this Python (None where it is not installed).
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
#: The repository's root, which a script run by torchrun needs on its path for ``tests.helpers``.
ROOT = Path(__file__).resolve().parents[2]


def run_script(script: Path, *arguments: str, processes: int = 1, timeout: int = 600) -> str:
    """Run a test script, under ``torchrun --standalone --nproc_per_node <processes>`` when
    ``processes`` > 1 (gloo on CPU, one thread each, on a free port: other runs may be going on),
    the repository's root on its path; fail with its stderr. Returns what it printed (stdout,
    then stderr)."""
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    environment.pop("TENSORBOARD_LOGGING_DIR", None)  # a Trainer writes under its output_dir
    done = subprocess.run(
        [*launcher, str(script), *arguments], capture_output=True, text=True, env=environment, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def without_deepspeed_ops() -> None:
    """Have DeepSpeed build none of its C++ ops in this process: on CPU it JIT-compiles a
    shared-memory collective at ``deepspeed.initialize`` (minutes, and a compiler) that only
    speeds up what gloo does; marked incompatible, it falls back to ``torch.distributed``, and
    the ops' compatibility is not probed either (compiler runs)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}
