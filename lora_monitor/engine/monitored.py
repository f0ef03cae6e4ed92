"""What a monitor watches: :class:`Monitored`, the model it is attached to and its LoRA modules.

Found once, when the monitor is attached (:meth:`Monitored.attach`): where the model runs, the
monitored modules (their paths, the probe's groups, their shapes) and the trained projections
that ``target_modules`` leaves out. Each snapshot reads the live factors again
(:meth:`Monitored.capture`), on every rank, inside the strategy's gather.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lora_monitor.adapters import LoRAFactors, ModuleKey, find_lora_factors, select_factors
from lora_monitor.adapters.kinds import TrainedModule, groups_of, trained_modules, uncovered_projections
from lora_monitor.analysis import Snapshot
from lora_monitor.analysis.device import base_weight_results
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.engine.distributed import RankContext, ShardedBaseSums, capture_kept
from lora_monitor.engine.options import MonitorOptions
from lora_monitor.engine.references import References
from lora_monitor.engine.reporter import Reporter
from lora_monitor.engine.runner import Outcome

#: W₀'s numbers by module, taken at the snapshot's step (``delta_w_amplification``, ...).
BaseResults = dict[ModuleKey, dict[str, Tensor]]


def default_layers(layer_indices: Sequence[int], count: int = 4) -> list[int]:
    """``count`` layers spread evenly over depth, first and last included (paper: 1/32/64/96)."""
    ordered = sorted(set(layer_indices))
    positions = np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int)
    return [ordered[p] for p in dict.fromkeys(positions.tolist())]


@dataclass(frozen=True)
class Monitored:
    """The model a monitor is attached to, where it runs, and what its set-up found.

    Attributes:
        model: what holds the LoRA layers.
        rank_context: where the monitor runs (this rank, the world size, the strategy's gather).
        module_names: the paths of the monitored LoRA modules (what the probe cuts).
        groups: each monitored module's group (attention, MLP), by key.
        module_groups: the same groups by path (the probe's).
        trained: the monitored modules with their shapes.
        not_covered: the trained projections ``target_modules`` leaves out.
    """

    model: torch.nn.Module
    rank_context: RankContext
    module_names: set[str]
    groups: dict[ModuleKey, str]
    module_groups: dict[str, str]
    trained: list[TrainedModule]
    not_covered: list[str]

    @classmethod
    def attach(
        cls, model: torch.nn.Module, rank_context: RankContext, options: MonitorOptions, references: References
    ) -> tuple[Monitored, dict[ModuleKey, LoRAFactors]]:
        """What ``model`` holds to monitor, and its monitored factors (``references`` loaded and
        checked against them). Configuration errors (:class:`LoRAMonitorError`) are raised here.
        """
        # FSDP (1) holds flat shards outside its gather: the factors are read and checked in it.
        with rank_context.gathered():
            trained = find_lora_factors(model, options.adapter_name)
            monitored = select_factors(trained, options.target_modules, None)
            if options.layers is not None:
                select_factors(monitored, None, options.layers)  # raises if an entry matches nothing
            references.load(monitored)
            shapes = trained_modules(monitored)
        groups = groups_of(monitored)
        return cls(
            model,
            rank_context,
            module_names={f.module_name for f in monitored.values()},
            groups=groups,
            module_groups={monitored[key].module_name: group for key, group in groups.items()},
            trained=shapes,
            not_covered=uncovered_projections(trained, monitored),
        ), monitored

    def factors(self, options: MonitorOptions) -> dict[ModuleKey, LoRAFactors]:
        """The live factors of the monitored modules (inside the gather, under a sharded strategy)."""
        return select_factors(find_lora_factors(self.model, options.adapter_name), options.target_modules, None)

    def capture(
        self,
        step: int,
        options: MonitorOptions,
        kept: Callable[[dict[ModuleKey, LoRAFactors]], list[ModuleKey]],
        reporter: Reporter,
        base_numbers: bool = True,
    ) -> tuple[Snapshot, BaseResults]:
        """A snapshot of the monitored factors this rank keeps (``kept`` of the live ones: its
        share where the ranks split the analysis), taken on every rank (sharded strategies gather
        the LoRA factors collectively, and copies are made while they are whole), and the W₀
        numbers that can only be taken now, of every module: a sharded or partitioned W₀'s are
        summed over the ranks (a collective), and FSDP (1) frees the W₀ it gathers (they are
        computed inside its gather, and no reference to it is kept)."""
        results: BaseResults = {}
        # Read-only: products of the live parameters must record no autograd graph.
        with self.rank_context.gathered(), torch.no_grad():
            live = self.factors(options)
            sums: Optional[ShardedBaseSums] = ShardedBaseSums() if base_numbers else None
            snapshot = capture_kept(live, kept(live), step, sums)  # every rank: collectives
            if sums is not None:
                with reporter.contained(f"step {step}: the W₀ numbers of sharded modules"):
                    results = sums.results()  # every rank: a collective
            if self.rank_context.keeps_base_weight:
                return snapshot, results
            if base_numbers:
                with reporter.contained(f"step {step}: the W₀ numbers"):
                    results |= base_weight_results(snapshot.factors)
            return snapshot.without_base_weights(), results

    def recommend(self, outcome: Outcome, options: MonitorOptions) -> None:
        """The rank an analyzed outcome of these modules suggests (:func:`recommend_rank`),
        decided once per snapshot, on every rank; a failure is one of its problems."""
        assert outcome.analyses is not None
        try:
            outcome.recommendation = recommend_rank(
                outcome.analyses,
                probe=outcome.probe,
                reference_is_run=options.compares_runs,
                basis=options.basis,
                groups=self.groups,
                trained=self.trained,
                not_covered=self.not_covered,
            )
        except Exception as error:
            outcome.problems.append(
                f"step {outcome.step}: the rank recommendation failed with {type(error).__name__}: {error}"
            )
