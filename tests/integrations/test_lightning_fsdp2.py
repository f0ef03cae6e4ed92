"""Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) with
``LoRASubspaceMonitor``: ``torchrun --nproc_per_node 2`` on CPU (gloo) logs what one unsharded
process logs, W₀'s numbers included, each point once and without a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_sharded import ROOT, TORCHRUN, W0_METRICS, _assert_same, _scalars  # noqa: E402

SCRIPT = Path(__file__).with_name("fsdp2_lightning.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python"),
]


def _fit(out: Path, shard: bool) -> Path:
    out.mkdir(parents=True)
    launcher = [TORCHRUN, "--nproc_per_node", "2"] if shard else [sys.executable]
    command = [*launcher, str(SCRIPT), str(out), *(["--shard"] if shard else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_model_parallel_strategy_logs_what_one_device_logs(tmp_path):
    single, sharded = _fit(tmp_path / "single", shard=False), _fit(tmp_path / "sharded", shard=True)
    got = _scalars(sharded / "run" / "version_0")
    assert all(any(tag.startswith(f"lora_monitor.{metric}/") for tag in got) for metric in W0_METRICS)
    _assert_same(_scalars(single / "run" / "version_0"), got)
    assert [json.loads((sharded / f"warnings_rank{rank}.json").read_text()) for rank in (0, 1)] == [[], []]
