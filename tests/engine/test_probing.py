"""The functional probe in a plain loop: each loss it reads is the loss of the model with every
monitored ΔW replaced by its best rank-k approximation (merged, dense SVD), and reading it changes
nothing in training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lora_monitor import AnalysisWarning, LoRAMonitor, LoRAMonitorError
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
    reading = monitor.latest_probe
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
    monitor = LoRAMonitor(with_probe, every_n_steps=2, probe=lambda: with_probe(input_ids=tokens, labels=tokens).loss)
    plain = LoRAMonitor(without, every_n_steps=2, functional_probe=False)
    torch.manual_seed(0)
    losses = _train(with_probe, 4, monitor)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    assert _train(without, 4, plain) == losses
    assert torch.equal(torch.random.get_rng_state(), state)
    assert with_probe.training and monitor.latest_probe is not None and plain.latest_probe is None
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
    assert len(calls) == 1 and monitor.latest_probe is None and monitor.latest_analysis


def test_in_strict_mode_a_failing_probe_stops_training():
    model = tiny_llama_lora(rank=4)
    with pytest.raises(LoRAMonitorError, match="the functional probe failed"):
        with LoRAMonitor(model, every_n_steps=1, probe=lambda: None, strict=True) as monitor:
            _train(model, 2, monitor)
