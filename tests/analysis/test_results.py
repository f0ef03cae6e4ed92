"""lora_monitor.analysis.results: the analyses the ranks of a multi-process run gather pickle
compactly and come back unchanged."""

from __future__ import annotations

import pickle

import torch

from lora_monitor.analysis import Snapshot, analyze
from tests.helpers.factors import factors_without_base


def test_analyses_pickle_compactly_and_back_unchanged():
    # The ranks of a multi-process run gather their analyses: each must carry its own few
    # bytes (not the transfer buffer it was cut from) and come back equal, as tensors.
    snapshot = Snapshot.capture(factors_without_base(rank=4, seed=0), step=3)
    analyses = analyze(snapshot, factors_without_base(rank=6, seed=1), "A")
    payload = pickle.dumps(analyses)
    content = sum(
        value.nbytes for a in analyses.values() for value in vars(a).values() if isinstance(value, torch.Tensor)
    )
    assert len(payload) < content + 1000 * len(analyses)
    back = pickle.loads(payload)
    assert back.keys() == analyses.keys()
    for key, analysis in analyses.items():
        for name, value in vars(analysis).items():
            if isinstance(value, torch.Tensor):
                restored = getattr(back[key], name)
                assert type(restored) is torch.Tensor and restored.dtype == value.dtype, name
                torch.testing.assert_close(restored, value, rtol=0, atol=0)
            else:
                assert getattr(back[key], name) == value, name
        assert back[key].shared_directions == analysis.shared_directions
