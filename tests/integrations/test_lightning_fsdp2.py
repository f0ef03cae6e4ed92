"""Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in ``configure_model``) with
``LoRASubspaceMonitor``: ``torchrun --nproc_per_node 2`` on CPU (gloo) logs what one unsharded
process logs, W₀'s numbers included, each point once and without a warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.engine.test_sharded import W0_METRICS, assert_same, scalars
from tests.helpers.distributed import TORCHRUN, run_script

SCRIPT = Path(__file__).with_name("fsdp2_lightning.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python"),
]


def _fit(out: Path, shard: bool) -> Path:
    out.mkdir(parents=True)
    run_script(SCRIPT, str(out), *(["--shard"] if shard else []), processes=2 if shard else 1)
    return out


def test_model_parallel_strategy_logs_what_one_device_logs(tmp_path):
    single, sharded = _fit(tmp_path / "single", shard=False), _fit(tmp_path / "sharded", shard=True)
    got = scalars(sharded / "run" / "version_0")
    assert all(any(tag.startswith(f"lora_monitor.{metric}/") for tag in got) for metric in W0_METRICS)
    assert_same(scalars(single / "run" / "version_0"), got)
    assert [json.loads((sharded / f"warnings_rank{rank}.json").read_text()) for rank in (0, 1)] == [[], []]
