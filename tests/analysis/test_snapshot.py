"""lora_monitor.analysis.snapshot: what a snapshot copies (the factors) and what it keeps a view of
(W₀), and its batches of one shape as views."""

from __future__ import annotations

import torch

from lora_monitor.adapters import find_lora_factors
from lora_monitor.analysis import Snapshot
from lora_monitor.analysis.device import _stack
from tests.helpers.factors import factors_without_base
from tests.helpers.models import tiny_llama_lora


def test_snapshot_keeps_a_reference_to_W0_not_a_copy():
    model = tiny_llama_lora(rank=4)
    factors = find_lora_factors(model)
    snapshot = Snapshot.capture(factors, step=0)
    for key, f in snapshot.factors.items():
        assert f.base_weight.data_ptr() == factors[key].base_weight.data_ptr()
        assert f.lora_A.data_ptr() != factors[key].lora_A.data_ptr()  # the factors are copies
    # A checkpoint stores the factors only.
    assert all("base_weight" not in m for m in snapshot.state_dict()["modules"])


def test_snapshot_batches_are_views_and_analysis_does_not_copy_them():
    snapshot = Snapshot.capture(factors_without_base(4, 0), step=1)
    factors = list(snapshot.factors.values())
    B, A, _ = _stack(factors, torch.device("cpu"))
    assert B.data_ptr() == factors[0].lora_B.data_ptr() and A.data_ptr() == factors[0].lora_A.data_ptr()
    torch.testing.assert_close(B, torch.stack([f.lora_B for f in factors]))
    torch.testing.assert_close(A, torch.stack([f.lora_A for f in factors]))
    # Not consecutive (every other module): stacked by copying.
    B2, _, _ = _stack(factors[::2], torch.device("cpu"))
    torch.testing.assert_close(B2, torch.stack([f.lora_B for f in factors[::2]]))
