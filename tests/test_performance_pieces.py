"""The pieces the speed of the monitor rests on, each checked against the plain computation."""

from __future__ import annotations

import numpy as np
import torch

from lora_monitor.outputs import plots, rendering
from tests.helpers.factors import random_factors


def _factors(rank: int, seed: int) -> dict:
    """Three layers of q and v, float64, without W₀."""
    return random_factors(
        3, ("q", "v"), rank, seed, n=24, in_features=20, dtype=torch.float64,
        scaling=lambda p: -0.5 if p == "v" else 2.0, with_base_weight=False, module_name="layers.{layer}.{projection}_proj",
    )


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


