"""The rule that turns a snapshot's analysis into a suggested LoRA rank: every constant of it.

The rule (:mod:`lora_monitor.analysis.rank`): the suggestion is the larger of the functional
probe's rank (:mod:`lora_monitor.analysis.probe`) and the largest spectral gap rank of ΔW;
its strength says when the two disagree or the update is too young to read. The constants
were chosen, and are checked against tasks whose needed rank is known, by
``benchmarks/rank_validation``; how often the rule is right is in docs/rank.md, written from
the benchmark's report — never in runtime messages, where it would go stale when the benchmark
is rerun.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankRule:
    """The constants of the rank rule.

    Attributes:
        keep: the share of the whole update's log-loss reduction on the probe batch that the
            probe's rank keeps.
        keep_low, keep_high: the shares that bound the range said beside the suggestion
            ("4, likely 3–6").
        grid: the ranks the probe tries, upwards (and r, the whole update).
        gap_ratio: the least σ_k / σ_{k+1} that counts as a gap above an update's noise.
        gap_floor: the least share of ‖ΔW‖_F² a direction must hold for its gap to count (it
            drops the gaps of ΔW's short noise tail, which read 4–6 for a planted rank 2 on a
            tiny model at r = 16).
        disagreement: the probe and the gaps further apart than this factor: too early to read.
        early_relative_norm: the median ‖ΔW‖_F / ‖W₀‖_F below which B has barely left its zero
            initialization: too early to read.
        kind_split: attention and MLP ranks further apart than this factor get a rank each
            (peft's ``rank_pattern``); closer, one rank serves both.
        too_small: the probe needing more than this share of the r directions says r may be
            too small: r is then under twice the rank the update uses, the margin the
            validation's target allows ([k*, 2k*]).
    """

    keep: float = 0.95
    keep_low: float = 0.9
    keep_high: float = 0.98
    grid: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    gap_ratio: float = 1.5
    gap_floor: float = 0.01
    disagreement: float = 2.0
    early_relative_norm: float = 1e-3
    kind_split: float = 2.0
    too_small: float = 0.5


#: The rule the monitor, the CLI and the validation benchmark use.
RULE = RankRule()
