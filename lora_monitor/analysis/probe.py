"""The functional probe: the rank a task needs, read off what the loss does when every ΔW is cut.

At a snapshot, every monitored ΔW is cut to its top k directions at once and the loss of the
model is measured on one fixed batch (:class:`~lora_monitor.adapters.truncation.LiveTruncation`
does the cutting; a front-end gives the loss: Lightning's ``training_step``, the transformers
model's own loss, a plain loop's ``probe=``). The update so far lowered the loss from ``loss(0)``
(no update) to the lowest loss it reads — ``loss(r)``, unless fewer directions do better, as they
do where the update's noise directions hurt (rsLoRA's large scaling, a high learning rate) —
and the rank it needs is the smallest k that keeps ``RULE.keep`` of that reduction, measured in
log loss: a loss that fell a hundredfold is cut at the same share of the way as one that halved.
The validation's truth is defined the same way (the knee of held-out loss against its lowest
point). It reads the task, not r: directions that only add noise raise the loss or leave it
where it is, so they never count.
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

    @property
    def lowest(self) -> float:
        """The lowest loss read with any update (``losses[r]`` unless fewer directions did better)."""
        return min(loss for k, loss in self.losses.items() if k > 0 and math.isfinite(loss))

    def kept(self, k: int) -> float:
        """The share of the log-loss reduction, from ``losses[0]`` to :attr:`lowest`, that rank ``k`` keeps."""
        lowest, none = math.log(self.lowest), math.log(self.losses[0])
        return (none - math.log(self.losses[k])) / (none - lowest)

    def first_keeping(self, share: float) -> Optional[int]:
        """The smallest k read that keeps ``share`` of the reduction (None: none does)."""
        return next((k for k in sorted(self.losses) if k > 0 and self.kept(k) >= share), None)


def read_probe(loss_at: Callable[[int], float], r: int, base: Optional[float] = None) -> ProbeReading:
    """Cut to 0 and to r, then upwards through ``RULE.grid`` until ``RULE.keep_high`` of the
    log-loss reduction is kept and the loss has stopped falling below the lowest read (2 + a few
    forward passes: the suggestion is usually small, and the loss at r is usually the lowest).

    ``base``: ``loss_at(0)`` where the caller knows it (the loss with no update at all is the
    frozen model's, the same at every snapshot while nothing else trains): one forward fewer.
    The grid is still walked from 1 upwards: the suggestion is the *first* k keeping the share,
    and the curve need not fall monotonically (noise directions can raise the loss), so no
    bisection or warm start is sure to find the same k. Where a cut beats the whole update, the
    walk goes on while the loss still falls, so that the reduction is measured to the bottom of
    the curve rather than to the first k that happens to beat a noisy ``loss(r)``."""
    start = time.perf_counter()
    losses = {0: float(loss_at(0)) if base is None else base, r: float(loss_at(r))}
    if not (math.isfinite(losses[0]) and math.isfinite(losses[r]) and 0 < losses[r] < losses[0]):
        return ProbeReading(r, losses, seconds=time.perf_counter() - start)
    reading = ProbeReading(r, losses)
    for k in [k for k in RULE.grid if k < r]:
        lowest = reading.lowest
        losses[k] = float(loss_at(k))
        walked_far_enough = (reading.first_keeping(RULE.keep_high) or r) <= k
        if walked_far_enough and not losses[k] < lowest:
            break
    keeping = {share: reading.first_keeping(share) for share in (RULE.keep_low, RULE.keep, RULE.keep_high)}
    return ProbeReading(
        r,
        dict(sorted(losses.items())),
        keeping[RULE.keep],
        keeping[RULE.keep_low],
        keeping[RULE.keep_high],
        time.perf_counter() - start,
    )
