"""The functional probe: the rank a task needs, read off what the loss does when every ΔW is cut.

At a snapshot, every monitored ΔW is cut to its top k directions at once and the loss of the
model is measured on one fixed batch (:class:`~lora_monitor.adapters.truncation.LiveTruncation`
does the cutting; a front-end gives the loss: Lightning's ``training_step``, the transformers
model's own loss, a plain loop's ``probe=``). The update so far lowered the loss from ``loss(0)``
(no update) to ``loss(r)``; the rank it needs is the smallest k that keeps ``RULE.keep`` of that
reduction, measured in log loss — a loss that fell a hundredfold is cut at the same share of the
way as one that halved. It reads the task, not r: directions that only add noise raise the loss
or leave it where it is, so they never count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from lora_monitor.analysis.rank_rule import RULE


@dataclass(frozen=True)
class ProbeReading:
    """What cutting every monitored ΔW to k directions did to the loss on the probe batch.

    Attributes:
        r: the largest rank of the modules cut (``losses[r]``: the whole update).
        losses: k → the probe batch's loss with every ΔW cut to k directions (0: none).
        rank: the smallest k keeping ``RULE.keep`` of the log-loss reduction; None when the
            update has not lowered the probe loss (nothing to keep).
        low, high: the smallest k keeping ``RULE.keep_low`` and ``RULE.keep_high`` of it.
        seconds: the probe's wall time (its forward passes).
        groups: where the adapter trains both attention and MLP modules, the reading of each
            group cut alone, the other whole (``"attention"``, ``"mlp"``): their ``losses[0]``
            is the loss with that group's update removed.
    """

    r: int
    losses: dict[int, float] = field(default_factory=dict)
    rank: Optional[int] = None
    low: Optional[int] = None
    high: Optional[int] = None
    seconds: float = 0.0
    groups: dict[str, ProbeReading] = field(default_factory=dict)

    def kept(self, k: int) -> float:
        """The share of the whole update's log-loss reduction that rank ``k`` keeps."""
        full, none = math.log(self.losses[self.r]), math.log(self.losses[0])
        return (none - math.log(self.losses[k])) / (none - full)


def read_probe(loss_at: Callable[[int], float], r: int, base: Optional[float] = None) -> ProbeReading:
    """Cut to 0 and to r, then upwards through ``RULE.grid`` until ``RULE.keep_high`` of the
    log-loss reduction is kept (2 + a few forward passes: the suggestion is usually small).

    ``base``: ``loss_at(0)`` where the caller knows it (the loss with no update at all is the
    frozen model's, the same at every snapshot while nothing else trains): one forward fewer.
    The grid is still walked from 1 upwards: the suggestion is the *first* k keeping the share,
    and the curve need not rise monotonically (noise directions can raise the loss), so no
    bisection or warm start is sure to find the same k."""
    start = time.perf_counter()
    losses = {0: float(loss_at(0)) if base is None else base, r: float(loss_at(r))}
    if not (math.isfinite(losses[0]) and math.isfinite(losses[r]) and 0 < losses[r] < losses[0]):
        return ProbeReading(r, losses, seconds=time.perf_counter() - start)
    reading = ProbeReading(r, losses)
    found: dict[float, int] = {}
    for k in [k for k in RULE.grid if k < r] + [r]:
        if k not in losses:
            losses[k] = float(loss_at(k))
        for share in (RULE.keep_low, RULE.keep, RULE.keep_high):
            if share not in found and reading.kept(k) >= share:
                found[share] = k
        if RULE.keep_high in found:
            break
    return ProbeReading(
        r,
        dict(sorted(losses.items())),
        found[RULE.keep],
        found[RULE.keep_low],
        found[RULE.keep_high],
        time.perf_counter() - start,
    )
