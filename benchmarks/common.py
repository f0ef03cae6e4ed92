"""Shared by the benchmark scripts: interleaved timing and a pass/fail line per target.

The machines these run on are shared and noisy, so every comparison is measured side by side in
one run, alternating its contenders repeat by repeat, and compares medians.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # not imported at run time: benchmarks/cli.py measures children by their
    import torch  # peak memory, which counts the parent's resident set at the fork


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall seconds of each contender, run in turn ``repeats`` times (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(repeats + 1):
        for name, run in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if repeat:  # the first round warms caches and lazy initialisation up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class Targets:
    """Collects ``measured <= limit`` checks, prints them, and gives the exit status."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, measured: float, limit: float, unit: str = "") -> None:
        ok = measured <= limit
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {measured:.4g}{unit} (target ≤ {limit:g}{unit})")
        if not ok:
            self.failed.append(name)

    def exit_code(self) -> int:
        if self.failed:
            print(f"targets missed: {', '.join(self.failed)}")
        return 1 if self.failed else 0
