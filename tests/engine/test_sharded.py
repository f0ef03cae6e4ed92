"""The monitor under FSDP2 (``fully_shard``), FSDP (1) and DeepSpeed ZeRO-3 in a plain loop:
``torchrun --nproc_per_node 2`` on CPU (gloo), against the same training in one unsharded
process (``sharded_loop.py``).

Every per-layer scalar — ‖ΔW‖, φ, the spectra, and ‖ΔW‖/‖W₀‖ and the amplification, which read
W₀ — equals the unsharded run's within 1e-4 relative; under FSDP2 and ZeRO-3 no rank ever
gathers a W₀ (only LoRA factors are gathered). Each point is written once, and no warning is given.
Resuming from a checkpoint taken under FSDP2 reproduces the uninterrupted run. Each rank's
snapshots and references hold the modules it analyzes only (its ``rank_share``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import pytest

from lora_monitor.engine.distributed import rank_share
from tests.engine.sharded_loop import build
from tests.helpers.distributed import TORCHRUN, run_script
from tests.helpers.events import assert_same_scalars, read_events, scalar_values

SCRIPT = Path(__file__).with_name("sharded_loop.py")
#: The monitors each run writes (one against the run's first snapshot, one against an adapter).
MONITORS = ("first", "adapter")
#: Scalars that read W₀: present under sharding, never gathered.
W0_METRICS = ("delta_w_relative_norm", "delta_w_amplification")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python"),
]


def _run(out: Path, *arguments: str, shard: Optional[str]) -> Path:
    """Train with ``sharded_loop.py``: sharded (``"fsdp2"``, ``"fsdp1"``, ``"zero3"``) over 2
    processes, or in one process (None)."""
    run_script(SCRIPT, str(out), *(["--shard", shard] if shard else []), *arguments, processes=2 if shard else 1)
    return out


def scalars(log_dir: Path, steps=None) -> dict[str, dict[int, float]]:
    """tag → step → value of every scalar written (each point once), at ``steps`` only if given."""
    values = scalar_values(read_events(log_dir), prefix="")
    if steps is None:
        return values
    return {tag: {s: v for s, v in series.items() if s in steps} for tag, series in values.items()}


def assert_same(expected: dict[str, dict[int, float]], got: dict[str, dict[int, float]]) -> None:
    assert_same_scalars(got, expected, rel=1e-4, abs=1e-7)


def _warnings(out: Path) -> list[str]:
    return [message for rank in (0, 1) for message in json.loads((out / f"warnings_rank{rank}.json").read_text())]


def _assert_only_factors_gathered(out: Path, rank: int = 4) -> None:
    """Every DTensor (FSDP2) or parameter (ZeRO-3) the monitors gathered is a LoRA factor (one
    side of length r), never W₀."""
    for process in (0, 1):
        shapes = json.loads((out / f"gathered_rank{process}.json").read_text())
        assert shapes and all(rank in shape for shape in shapes), shapes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp2")
    build("llama", lora_seed=7).save_pretrained(str(root / "adapter"))
    adapter = ("--adapter", str(root / "adapter"))
    half = _run(root / "half", *adapter, "--stop-at", "3", shard="fsdp2")
    return {
        "single": _run(root / "single", *adapter, shard=None),
        "sharded": _run(root / "sharded", *adapter, shard="fsdp2"),
        "fsdp1": _run(root / "fsdp1", *adapter, shard="fsdp1"),
        # An optional dependency (see docs/deepspeed.md): its case is skipped without it.
        "zero3": _run(root / "zero3", *adapter, shard="zero3") if importlib.util.find_spec("deepspeed") else None,
        "half": half,
        "resumed": _run(root / "resumed", *adapter, "--resume", str(half), shard="fsdp2"),
    }


@pytest.mark.parametrize("monitor", MONITORS)
@pytest.mark.parametrize("run", ["sharded", "fsdp1", "zero3"])
def test_every_scalar_equals_the_unsharded_run(runs, run, monitor):
    if runs[run] is None:
        pytest.skip("deepspeed is not installed")
    expected = scalars(runs["single"] / f"tb_{monitor}")
    got = scalars(runs[run] / f"tb_{monitor}")
    for metric in ("delta_w_norm", "phi_top", "delta_w_energy_rank", *W0_METRICS):
        assert any(tag.startswith(f"lora_monitor.{metric}/") for tag in got), metric
    assert all(sorted(series) == [2, 4, 6] for tag, series in got.items() if tag.startswith("lora_monitor.delta_w"))
    assert_same(expected, got)
    assert _warnings(runs[run]) == []
    if run != "fsdp1":  # FSDP (1) gathers whole units, W₀ included, by design
        _assert_only_factors_gathered(runs[run])


def test_resume_under_fsdp2_reproduces_the_uninterrupted_run(runs):
    assert _warnings(runs["half"]) == _warnings(runs["resumed"]) == []
    for monitor in MONITORS:
        got = scalars(runs["resumed"] / f"tb_{monitor}")
        assert {step for series in got.values() for step in series} == {4, 6}
        assert_same(scalars(runs["sharded"] / f"tb_{monitor}", steps={4, 6}), got)


def test_a_fused_module_is_split_without_gathering_its_base_weight(tmp_path):
    """Phi-3's qkv_proj: q, k and v are row blocks of one sharded weight, and each rank's rows
    cut across them."""
    single = _run(tmp_path / "single", "--arch", "phi3", shard=None)
    sharded = _run(tmp_path / "sharded", "--arch", "phi3", shard="fsdp2")
    expected, got = scalars(single / "tb_first"), scalars(sharded / "tb_first")
    assert any(tag.startswith("lora_monitor.delta_w_amplification/") and tag.endswith(".q") for tag in got)
    assert_same(expected, got)
    assert _warnings(sharded) == []
    _assert_only_factors_gathered(sharded)


def test_qlora_4bit_base_weights_are_dequantized_shard_by_shard(tmp_path):
    """QLoRA with FSDP2: each rank dequantizes its own shard of the packed nf4 storage (double
    quantization, shards starting mid-row) and the W₀ numbers equal those of peft's
    dequantization of the whole unsharded weight."""
    single = _run(tmp_path / "single", "--arch", "llama4bit", shard=None)
    sharded = _run(tmp_path / "sharded", "--arch", "llama4bit", shard="fsdp2")
    expected, got = scalars(single / "tb_first"), scalars(sharded / "tb_first")
    assert all(any(tag.startswith(f"lora_monitor.{metric}/") for tag in got) for metric in W0_METRICS)
    assert_same(expected, got)
    assert _warnings(sharded) == []


@pytest.mark.parametrize("run", ["single", "sharded", "fsdp1", "zero3", "resumed"])
def test_each_rank_holds_its_share_only(runs, run):
    """What a rank keeps — its snapshots (the run's first one), the factors before step 1, the
    adapter read as the reference, and what a resumed run restored — is exactly the modules it
    analyzes; the ranks together hold every module once."""
    if runs[run] is None:
        pytest.skip("deepspeed is not installed")
    processes = 1 if run == "single" else 2
    held = [json.loads((runs[run] / f"held_rank{rank}.json").read_text()) for rank in range(processes)]
    modules = {(layer, projection) for layer in range(2) for projection in ("q", "v")}
    for monitor, kinds in {"first": {"initial", "first"}, "adapter": {"initial", "adapter"}}.items():
        for rank in range(processes):
            assert set(held[rank][monitor]) == kinds
            for kind, keys in held[rank][monitor].items():
                assert {tuple(key) for key in keys} == set(rank_share(modules, rank, processes)), (monitor, kind)
