"""Target 4: all images of one snapshot, 4 layers × (ΔW_q, ΔW_v), in ≤ 0.5 s.

Last, what the monitor draws per snapshot today (:func:`lora_monitor.outputs.rendering.snapshot_images`):
one heatmap image per drawn layer (4 of 32) and the overview figure of all 32 layers.

Compares, in one run, matplotlib drawing the whole figure (``figure_to_rgb(phi_figure(...))``)
with :func:`lora_monitor.outputs.rendering.phi_image`, which draws the figure's frame once per layout (the
first snapshot: "cold") and then only colour-maps the grids into it ("warm", every later
snapshot). Both rank 8 against rank 64 (with the zoom panels) and rank 64 against rank 64.
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets  # noqa: E402

from lora_monitor.outputs import plots, rendering  # noqa: E402

REPEATS = 5


def main() -> int:
    rng = np.random.default_rng(0)
    targets = Targets()
    for p, q in [(8, 64), (64, 64)]:
        grids = {(layer, proj): rng.random((p, q), dtype=np.float32) for layer in (0, 10, 21, 31) for proj in ("q", "v")}
        symbols = dict(row_symbol=f"A_{{r={p}}}", column_symbol=f"A_{{r={q}}}")
        matplotlib_times, warm_times = [], []
        rendering._FRAMES.clear()
        start = time.perf_counter()
        rendering.phi_image(grids, **symbols)
        cold = time.perf_counter() - start
        for repeat in range(REPEATS):
            start = time.perf_counter()
            plots.figure_to_rgb(plots.phi_figure(grids, **symbols))
            matplotlib_times.append(time.perf_counter() - start)
            step_symbols = dict(symbols, column_symbol=f"A_{{\\mathrm{{step}}={100 * repeat}}}")
            start = time.perf_counter()
            rendering.phi_image(grids, **step_symbols)
            warm_times.append(time.perf_counter() - start)
        whole, warm = statistics.median(matplotlib_times), statistics.median(warm_times)
        print(f"r = {p} vs r = {q}, 4 layers × 2 projections:")
        print(f"  matplotlib, whole figure: {whole * 1e3:.0f} ms (median of {REPEATS})")
        print(f"  phi_image, first snapshot (frame drawn): {cold * 1e3:.0f} ms")
        print(f"  phi_image, later snapshots: {warm * 1e3:.0f} ms (median of {REPEATS}), {whole / warm:.0f}× faster")
        targets.check(f"one snapshot's images, r={p} vs r={q}", warm, 0.5, " s")
    monitor_images(targets)
    return targets.exit_code()


def monitor_images(targets: Targets) -> None:
    """:func:`snapshot_images` as the engine calls it: 32 layers × (q, v), r = 8 against 64."""
    import torch

    from lora_monitor.adapters import LoRAFactors
    from lora_monitor.analysis.rank import recommend_rank
    from lora_monitor.analysis import Snapshot, analyze

    generator = torch.Generator().manual_seed(0)

    def factors(rank: int) -> dict:
        return {
            (layer, proj): LoRAFactors(
                f"layers.{layer}.{proj}", layer, proj,
                torch.randn(rank, 256, generator=generator), torch.randn(256, rank, generator=generator), 1.0,
            )
            for layer in range(32)
            for proj in ("q", "v")
        }

    reference, current = factors(64), factors(8)
    analyses = analyze(Snapshot(step=100, factors=current), reference, "A")
    recommendation = recommend_rank(analyses, reference_is_run=True)
    layers = [0, 10, 21, 31]
    grids = {key: a.phi.numpy().T for key, a in analyses.items() if key[0] in layers}
    symbols = dict(layers=layers, row_symbol="A_{r=8}", column_symbol="A_{r=64}", recommendation=recommendation)
    rendering._FRAMES.clear()
    rendering._OVERVIEWS.clear()
    rendering._OVERVIEW_CANVASES.clear()
    start = time.perf_counter()
    rendering.snapshot_images(grids, **symbols)
    cold = time.perf_counter() - start
    # Every later snapshot has a new step in its title; the overview is redrawn when what it
    # shows changed (worst case: every time) and reused once the run settles.
    changed, settled = [], []
    for repeat in range(REPEATS):
        for overview_changed, times in ((True, changed), (False, settled)):
            step = dict(symbols, column_symbol=f"A_{{\\mathrm{{step}}={200 + 2 * repeat + overview_changed}}}")
            if overview_changed:
                rendering._OVERVIEWS.clear()
            start = time.perf_counter()
            images = rendering.snapshot_images(grids, **step)
            times.append(time.perf_counter() - start)
    worst, best = statistics.median(changed), statistics.median(settled)
    print(f"snapshot_images, 32 layers × 2 projections: {len(images)} images (4 heatmaps, the overview):")
    print(
        f"  first snapshot: {cold * 1e3:.0f} ms; later snapshots: {worst * 1e3:.0f} ms with the overview "
        f"redrawn, {best * 1e3:.0f} ms once it settled (medians of {REPEATS})"
    )
    targets.check("one snapshot's images as the monitor draws them", worst, 0.5, " s")


if __name__ == "__main__":
    sys.exit(main())
