"""The monitor under DeepSpeed ZeRO-3 on CPU: ``torchrun --nproc_per_node 2`` over gloo
(DeepSpeed's CPU accelerator without oneCCL), against the same training in one unsharded
process.

- A transformers ``Trainer`` (``torchrun_trainer.py --zero3``: a stage-3 ``deepspeed=``
  config, ``use_cpu=True``) logs every scalar of the unsharded run within 1e-4 relative,
  ‖ΔW‖/‖W₀‖ and the amplification included: the LoRA factors are gathered with
  ``deepspeed.zero.GatheredParameters`` on every rank, W₀ never (its numbers are summed over
  the ranks' partitions). The functional probe says once why it does not run. The plain loop
  (``deepspeed.initialize``, ``LoRAMonitor(engine.module)``) is ``test_sharded.py``'s
  ``zero3`` case.
- Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator ("The DeepSpeed strategy is only
  supported on CUDA GPUs but `CPUAccelerator` is used."): its ZeRO-3 test is
  ``test_distributed.py``'s GPU test.
- W₀'s numbers summed over ZeRO-3 partitions (runs of the flattened weight, cut mid-row, the
  last padded) equal those of the whole W₀, for a fused module's rows too.
- Partitions that cannot be gathered are named as such, not taken for a wrong LoraConfig.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_monitor import LoRAMonitor
from lora_monitor.adapters import LoRAFactors, LoRAMonitorError, find_lora_factors, select_rows
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.device import base_weight_results
from lora_monitor.engine.distributed import full_factors, sharded_base_results, without_partitions
from lora_monitor.outputs.tags import scalar_tag
from tests.engine.sharded_loop import build
from tests.engine.test_sharded import W0_METRICS, assert_same
from tests.helpers.distributed import TORCHRUN, analyzed, run_script
from tests.helpers.events import monitor_scalars, read_events, run_dirs

TRAINER = Path(__file__).with_name("torchrun_trainer.py")
PROBE_NOTE = "the functional probe does not run under DeepSpeed ZeRO-3 (its forward is collective)"

two_ranks = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")


@pytest.mark.slow
@two_ranks
def test_trainer_under_zero3_logs_what_an_unsharded_trainer_logs(tmp_path):
    pytest.importorskip("deepspeed")
    run_script(TRAINER, str(tmp_path / "single"))
    said = run_script(TRAINER, str(tmp_path / "zero3"), "--zero3", processes=2)
    (single,), (zero3,) = run_dirs(tmp_path / "single"), run_dirs(tmp_path / "zero3")  # rank zero writes
    # The per-module scalars (the rank suggestion's differ: the unsharded run reads the probe).
    per_module = lambda tag: tag.startswith("lora_monitor.")  # noqa: E731
    expected, got = monitor_scalars(read_events(single), per_module), monitor_scalars(read_events(zero3), per_module)
    for metric in ("delta_w_norm", "phi_top", *W0_METRICS):
        assert any(tag.startswith(f"lora_monitor.{metric}/") for tag in got), metric
    assert sorted(got[scalar_tag("delta_w_norm", (0, "q"))]) == [2, 4]
    assert_same(expected, got)
    # The probe's forward would gather parameters from both ranks: said once, not the advice for
    # DoRA-like updates that partitioned factors used to get.
    assert said.count(PROBE_NOTE) == 1 and "none of the monitored modules" not in said
    shares = [analyzed(tmp_path / "zero3", rank) for rank in (0, 1)]
    assert all(shares[0][step] and shares[1][step] and not shares[0][step] & shares[1][step] for step in (2, 4))


def _partition(model: torch.nn.Module) -> None:
    """Make the LoRA factors look as ZeRO-3 leaves them outside a gather: empty data, with
    DeepSpeed's attributes (no deepspeed needed)."""
    for index, (name, parameter) in enumerate(model.named_parameters()):
        if "lora_" in name:
            parameter.ds_id, parameter.ds_shape = index, parameter.shape
            parameter.ds_status = SimpleNamespace(name="NOT_AVAILABLE")
            parameter.data = torch.empty(0)


def test_partitioned_factors_are_named_as_zero3_partitions_not_a_wrong_config():
    model = build()
    _partition(model)
    with pytest.raises(LoRAMonitorError, match="DeepSpeed ZeRO-3 partitions") as raised:
        find_lora_factors(model)
    message = str(raised.value)
    assert "layers.0.self_attn.q_proj" in message and "GatheredParameters" in message
    assert "target Linear modules" not in message


def test_partitions_that_cannot_be_gathered_stop_the_setup_with_the_reason():
    """Parameters that look partitioned but that DeepSpeed cannot gather (or no deepspeed)."""
    model = build()
    _partition(model)
    with pytest.raises(LoRAMonitorError, match="ZeRO-3") as raised:
        LoRAMonitor(model, every_n_steps=2, log_images=False)
    assert "lora_A" in str(raised.value) and "target Linear modules" not in str(raised.value)


def _partitioned_weight(W0: torch.Tensor, rank: int, world_size: int) -> torch.nn.Parameter:
    """W₀ as ZeRO-3 partitions it (``_partition_param``): empty data, and this rank's run of
    the flattened weight in ``ds_tensor``, the last run padded to the others' length."""
    size = -(-W0.numel() // world_size)
    run = W0.reshape(-1)[rank * size : (rank + 1) * size]
    weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    weight.ds_id, weight.ds_shape, weight.ds_numel = 0, W0.shape, W0.numel()
    weight.ds_status = SimpleNamespace(name="NOT_AVAILABLE")
    weight.ds_tensor = torch.cat([run, torch.full((size - run.numel(),), 7.0)])  # padding must not count
    weight.ds_process_group = torch.distributed.group.WORLD
    return weight


def _partition_worker(rank: int, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        generator = torch.Generator().manual_seed(0)  # the same whole tensors on both ranks
        # 9 × 5 = 45 entries: runs of 23 and 22 (+1 padding), the cut in the middle of row 4.
        W0, A, B = (torch.randn(*shape, generator=generator) for shape in ((9, 5), (3, 5), (9, 3)))
        weight = _partitioned_weight(W0, rank, 2)
        # A whole module, a fused module's block of rows (across the cut), and per-head rows.
        for rows in (None, slice(3, 6), torch.tensor([0, 4, 8])):
            factors = LoRAFactors("layers.0.q_proj", 0, "q", A, B, 2.0, base_weight=weight, rows=rows)
            whole = LoRAFactors("layers.0.q_proj", 0, "q", A, select_rows(B, rows), 2.0, select_rows(W0, rows))
            gathered = full_factors({(0, "q"): factors})
            got = sharded_base_results(gathered)
            expected = base_weight_results({(0, "q"): whole})[(0, "q")]
            assert got[(0, "q")].keys() == expected.keys()
            for name, value in expected.items():
                torch.testing.assert_close(got[(0, "q")][name], value, rtol=1e-5, atol=1e-6, msg=f"{name}, {rows}")
            # The snapshot keeps W₀'s shape only: the analysis takes the summed numbers and says
            # what it cannot compute without W₀'s values.
            snapshot = Snapshot.capture(without_partitions(gathered), step=1)
            (analysis,) = analyze(snapshot, intruder_top_k=2, base_results=got).values()
            assert analysis.delta_w_amplification == pytest.approx(float(expected["delta_w_amplification"]), 1e-5)
            assert analysis.intruder_dimensions is None and any("intruder" in note for note in analysis.notes)
        torch.distributed.barrier()  # both ranks done before either tears gloo down
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_base_weight_numbers_summed_over_zero3_partitions_equal_the_whole_weights():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_partition_worker, args=(port,), nprocs=2, join=True)
