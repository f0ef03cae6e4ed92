"""``torchrun --nproc_per_node 2`` on CPU (gloo) with a transformers ``Trainer``: the run
finishes (no rank waits on a collective the other skips), the analysis is split across the two
processes, only the main one writes, each point once, and each process checkpoints its state."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_monitor.outputs.tags import scalar_tag
from tests.helpers.distributed import analysed
from tests.helpers.events import read_events, run_dirs, scalar_values

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.mark.slow
def test_torchrun_two_processes_write_each_point_once(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    environment.pop("TENSORBOARD_LOGGING_DIR", None)
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(TESTS / "torchrun_trainer.py"), str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    (run,) = run_dirs(tmp_path)  # the main process's run only
    values = scalar_values(read_events(run))  # asserts that no step is written twice
    keys = [(layer, p) for layer in range(2) for p in ("q", "v")]
    for key in keys:
        assert sorted(values[scalar_tag("delta_w_norm", key)]) == [2, 4]
        assert sorted(values[scalar_tag("phi_top", key)]) == [4]
    # Each process saved its own state in the checkpoint, to restore its own on resume.
    saved = sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "checkpoint-4").glob("lora_monitor_state-*.pt"))
    assert saved == ["rank0.pt", "rank1.pt"]
    # Each process analysed every other module: disjoint halves that cover all.
    shares = [analysed(tmp_path, rank) for rank in (0, 1)]
    for step in (2, 4):
        assert shares[0][step] and shares[1][step]
        assert not shares[0][step] & shares[1][step]
        assert shares[0][step] | shares[1][step] == set(keys)
