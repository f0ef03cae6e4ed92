"""The functional probe in a plain loop: each loss it reads is the loss of the model with every
monitored ΔW replaced by its best rank-k approximation (merged, dense SVD), and reading it changes
nothing in training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lora_monitor import AnalysisWarning, LoRAMonitor, LoRAMonitorError
from lora_monitor.adapters import plain_lora_layers
from lora_monitor.adapters.truncation import LiveTruncation
from lora_monitor.analysis.probe import ProbeReading, read_probe
from lora_monitor.engine import probe_runner
from tests.helpers.models import lora_layers, tiny_llama_lora

VOCAB = 64


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(seed))


def _train(model, steps, monitor=None) -> list[float]:
    """Train on one batch (so that the update lowers its loss), a step at a time."""
    tokens = _batch(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(1, steps + 1):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        if monitor is not None:
            monitor.step(step)
    return losses


def _dense_truncated_loss(model, tokens, k) -> float:
    """The loss with every LoRA update merged as its best rank-k approximation (dense SVD)."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora_layers(dense):
            U, S, Vh = torch.linalg.svd(layer.get_delta_weight("default").double(), full_matrices=False)
            layer.get_base_layer().weight += ((U[:, :k] * S[:k]) @ Vh[:k]).to(layer.get_base_layer().weight.dtype)
        dense.eval()
        with dense.disable_adapter():
            return float(dense(input_ids=tokens, labels=tokens).loss)


def test_each_probe_loss_is_the_dense_truncated_model_s():
    model = tiny_llama_lora(rank=8)
    tokens = _batch(1)
    probe = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731
    monitor = LoRAMonitor(model, every_n_steps=3, probe=probe, strict=True)
    with monitor:
        _train(model, 6, monitor)
    reading = monitor.latest_probe_reading
    assert reading is not None and reading.r == 8 and reading.rank is not None
    assert {0, 8} <= set(reading.losses) and len(reading.losses) > 3
    for k, loss in reading.losses.items():
        assert loss == pytest.approx(_dense_truncated_loss(model, tokens, k), rel=1e-5), k
    assert monitor.recommendation.rank == reading.rank


def test_reading_the_probe_changes_nothing_in_training():
    """Same seeds, with and without the probe: the same losses and factors, bit for bit, the
    model back in training mode and the random generator where it was."""
    with_probe, without = tiny_llama_lora(rank=4, seed=3), tiny_llama_lora(rank=4, seed=3)
    tokens = _batch(2)
    monitor = LoRAMonitor(
        with_probe,
        every_n_steps=2,
        probe_budget=float("inf"),  # read at every snapshot, mid-training
        probe=lambda: with_probe(input_ids=tokens, labels=tokens).loss,
    )
    plain = LoRAMonitor(without, every_n_steps=2, functional_probe=False)
    torch.manual_seed(0)
    losses = _train(with_probe, 4, monitor)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    assert _train(without, 4, plain) == losses
    assert torch.equal(torch.random.get_rng_state(), state)
    assert with_probe.training and monitor.latest_probe_reading is not None and plain.latest_probe_reading is None
    for (name, a), (_, b) in zip(with_probe.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), name


def test_a_probe_that_fails_is_said_once_and_left_off():
    model = tiny_llama_lora(rank=4)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("the batch went away")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LoRAMonitor(model, every_n_steps=1, probe=broken) as monitor:
            _train(model, 3, monitor)
    said = [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning) and "probe" in str(w.message)]
    assert len(said) == 1 and "the batch went away" in said[0] and "not read again" in said[0]
    assert len(calls) == 1 and monitor.latest_probe_reading is None and monitor.latest_analysis


def test_in_strict_mode_a_failing_probe_stops_training():
    model = tiny_llama_lora(rank=4)
    with pytest.raises(LoRAMonitorError, match="the functional probe failed"):
        with LoRAMonitor(model, every_n_steps=1, probe=lambda: None, strict=True) as monitor:
            _train(model, 2, monitor)


def _uncached_reading(model, loss) -> ProbeReading:
    """The whole probe, every loss measured (``loss(0)`` too): what the monitor's reading must equal."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), LiveTruncation(plain_lora_layers(model, None)) as truncation:

            def loss_at(k: int) -> float:
                truncation.cut(k)
                return float(loss())

            return read_probe(loss_at, truncation.rank)
    finally:
        model.train(training)


def _readings(model, steps: int, foreach: bool = False) -> list[tuple[ProbeReading, ProbeReading, int]]:
    """Train what requires a gradient in ``model``, reading its probe after every step as the
    monitor does (``loss(0)`` kept while it can be) and uncached: (monitor's reading, uncached,
    forward passes the monitor's took)."""
    tokens = _batch(1)
    calls: list[int] = []

    def loss():
        calls.append(1)
        return model(input_ids=tokens, labels=tokens).loss

    monitor = LoRAMonitor(model, every_n_steps=1000, probe=loss, strict=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=foreach)
    out = []
    for step in range(1, steps + 1):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        calls.clear()
        reading = monitor.probe_runner.read(
            model, None, monitor._monitored.module_names, monitor.rank_context, step, final=True
        )
        forwards = len(calls)
        assert reading is not None
        out.append((reading, _uncached_reading(model, loss), forwards))
    return out


def test_the_kept_loss_with_no_update_gives_the_uncached_probe_s_readings():
    readings = _readings(tiny_llama_lora(rank=8), steps=4)
    for cached, full, _ in readings:
        assert cached.losses == full.losses
        assert (cached.rank, cached.low, cached.high) == (full.rank, full.low, full.high)
    # Measured once, kept after: one forward pass fewer a reading.
    assert [forwards for *_, forwards in readings[1:]] == [len(full.losses) - 1 for _, full, _ in readings[1:]]


@pytest.mark.parametrize("foreach", [False, True])  # the fused update bumps the version counters too
def test_a_trained_non_lora_parameter_has_the_loss_with_no_update_measured_again(foreach):
    model = tiny_llama_lora(rank=8)
    model.base_model.model.lm_head.weight.requires_grad_(True)  # a trained head
    readings = _readings(model, steps=3, foreach=foreach)
    assert len({cached.losses[0] for cached, _, _ in readings}) == len(readings)  # the head moved it
    for cached, full, _ in readings:
        assert cached.losses == full.losses and cached.rank == full.rank


def test_a_frozen_weight_written_in_place_has_the_loss_with_no_update_measured_again():
    model = tiny_llama_lora(rank=8)
    tokens = _batch(1)
    monitor = LoRAMonitor(model, every_n_steps=1000, probe=lambda: model(input_ids=tokens, labels=tokens).loss)

    def read(step):
        return monitor.probe_runner.read(
            model, None, monitor._monitored.module_names, monitor.rank_context, step, final=True
        )

    first = read(1)
    with torch.no_grad():
        model.base_model.model.model.norm.weight.mul_(2.0)
    second = read(2)
    assert first is not None and second is not None and first.losses[0] != second.losses[0]
    assert second.losses == _uncached_reading(model, lambda: model(input_ids=tokens, labels=tokens).loss).losses


def test_the_schedule_reads_within_its_budget_and_always_at_the_end():
    # Counted in forward passes (a training step is 3 of them), never in seconds: the same run
    # is read at the same steps on any machine, so two runs compare card by card.
    probe = LoRAMonitor(functional_probe=True).probe_runner
    probe.start(0)
    # The first reading, priced at the most it can take: 11 passes at r = 16 (loss(0), loss(16)
    # and the grid 1, 2, 3, 4, 5, 6, 8, 10, 12), read once 11 ≤ 0.5 % of 3 passes a step.
    probe.price = probe_runner.reading_price({"q": 16, "v": 16}, {})
    assert probe.price == 11 and not probe.due(733) and probe.due(734) and probe.due(10, final=True)
    # Attention and MLP read apart too: each group's loss(0) and grid besides.
    assert probe_runner.reading_price({"q": 16, "up": 8}, {"q": "attention", "up": "mlp"}) == 11 + 10 + 7
    probe.latest, probe._spent, probe._cost = ProbeReading(8), 5, 5
    assert not probe.due(100) and probe.due(100, final=True)  # 10 passes > 0.5 % of 300
    assert not probe.due(666) and probe.due(667)  # 10 passes ≤ 0.5 % of 3 × 667
    probe._start_step = None  # a monitor that never started: every snapshot is read
    assert probe.due(1)


def test_the_budget_is_the_user_s():
    def first_reading(budget: float, step: int) -> bool:
        probe = LoRAMonitor(functional_probe=True, probe_budget=budget).probe_runner
        probe.start(0)
        probe.price = 11  # r = 16
        return probe.due(step)

    # 5 %: the first reading once 11 passes ≤ 5 % of 3 passes a step, at step 74 instead of 734.
    assert not first_reading(0.05, 73) and first_reading(0.05, 74)
    # 0: the end only; infinite: every snapshot, the first step included.
    assert not first_reading(0.0, 10**9) and first_reading(float("inf"), 1)
    probe = LoRAMonitor(functional_probe=True, probe_budget=0.0).probe_runner
    probe.start(0)
    assert probe.due(1, final=True)


def test_a_short_run_is_probed_at_its_end_only_the_end_s_reading_the_whole_probe_s():
    model = tiny_llama_lora(rank=8)
    tokens = _batch(1)
    loss = lambda: model(input_ids=tokens, labels=tokens).loss  # noqa: E731
    with LoRAMonitor(model, every_n_steps=2, probe=loss, log_images=False) as monitor:
        _train(model, 6, monitor)
        # No reading fits in 0.5 % of 6 steps: the snapshots before the end carry none.
        assert monitor.latest_probe_reading is None and monitor.probe_runner.skipped == 6
    assert monitor.latest_probe_reading is not None and monitor.recommendation is not None
    full = _uncached_reading(model, loss)
    assert (
        monitor.latest_probe_reading.losses == full.losses
        and monitor.recommendation.probe == monitor.latest_probe_reading
    )
