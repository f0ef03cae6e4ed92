"""The pieces the speed of the monitor rests on, each checked against the plain computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_monitor.analysis import ReferenceBases, Snapshot, analyze
from lora_monitor.analysis.device import _stack
from lora_monitor.functional import BASES, factored_basis, factored_svd, singular_basis, subspace_similarity
from lora_monitor.outputs import plots, rendering
from tests.helpers.factors import random_factors


def _factors(rank: int, seed: int) -> dict:
    """Three layers of q and v, float64, without W₀."""
    return random_factors(
        3, ("q", "v"), rank, seed, n=24, in_features=20, dtype=torch.float64,
        scaling=lambda p: -0.5 if p == "v" else 2.0, with_base_weight=False, module_name="layers.{layer}.{projection}_proj",
    )


def test_snapshot_batches_are_views_and_analysis_does_not_copy_them():
    snapshot = Snapshot.capture(_factors(4, 0), step=1)
    factors = list(snapshot.factors.values())
    B, A, _ = _stack(factors, torch.device("cpu"))
    assert B.data_ptr() == factors[0].lora_B.data_ptr() and A.data_ptr() == factors[0].lora_A.data_ptr()
    torch.testing.assert_close(B, torch.stack([f.lora_B for f in factors]))
    torch.testing.assert_close(A, torch.stack([f.lora_A for f in factors]))
    # Not consecutive (every other module): stacked by copying.
    B2, _, _ = _stack(factors[::2], torch.device("cpu"))
    torch.testing.assert_close(B2, torch.stack([f.lora_B for f in factors[::2]]))


@pytest.mark.parametrize("basis", BASES)
def test_cached_reference_bases_give_the_uncached_analysis(basis):
    snapshot = Snapshot.capture(_factors(6, 0), step=3)
    reference = _factors(2, 1)
    bases = ReferenceBases.compute(reference, snapshot.factors, basis)
    cached = analyze(snapshot, reference, basis, reference_bases=bases)
    plain = analyze(snapshot, reference, basis)
    for key, analysis in plain.items():
        torch.testing.assert_close(cached[key].phi, analysis.phi)
        torch.testing.assert_close(cached[key].singular_values, analysis.singular_values)
        # and against the dense φ of the explicit bases
        f, r = snapshot.factors[key], reference[key]
        dense = subspace_similarity(
            singular_basis(r.lora_B, r.lora_A, r.scaling, basis), singular_basis(f.lora_B, f.lora_A, f.scaling, basis)
        )
        torch.testing.assert_close(analysis.phi, dense)
    with pytest.raises(ValueError, match="basis"):
        analyze(snapshot, reference, "A" if basis != "A" else "B", reference_bases=bases)


def test_phi_image_is_the_matplotlib_figure():
    rng = np.random.default_rng(0)
    grids = {(layer, p): rng.random((4, 16), dtype=np.float32) for layer in (0, 5) for p in ("q", "v")}
    rendering._FRAMES.clear()
    for column in ("A_{r=16}", r"A_{\mathrm{step}=10}"):  # the title changes, the frame is reused
        fast = rendering.phi_image(grids, row_symbol="A_{r=4}", column_symbol=column)
        slow = plots.figure_to_rgb(plots.phi_figure(grids, row_symbol="A_{r=4}", column_symbol=column))
        assert fast.shape == slow.shape and fast.dtype == np.uint8
        difference = np.abs(fast.astype(int) - slow.astype(int))
        assert difference.max() <= 8 and difference.mean() < 1
    assert len(rendering._FRAMES) == 1
    # Other data in the same frame: the heatmap pixels follow it.
    changed = rendering.phi_image({k: 1 - g for k, g in grids.items()}, row_symbol="A_{r=4}", column_symbol="A")
    assert np.abs(changed.astype(int) - fast.astype(int)).max() > 100


def test_analyses_pickle_compactly_and_back_unchanged():
    # The ranks of a multi-process run gather their analyses: each must carry its own few
    # bytes (not the transfer buffer it was cut from) and come back equal, as tensors.
    import pickle

    snapshot = Snapshot.capture(_factors(rank=4, seed=0), step=3)
    analyses = analyze(snapshot, _factors(rank=6, seed=1), "A")
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
