"""What every front-end reads back from its engine: :class:`EngineResults`."""

from __future__ import annotations

from typing import Optional

from lora_monitor.adapters import ModuleKey
from lora_monitor.analysis import ModuleAnalysis
from lora_monitor.analysis.rank import RankRecommendation
from lora_monitor.engine import LoRAMonitor


class EngineResults:
    """The latest analysis and the recommendation of a front-end's :attr:`engine`, as its users
    read them (``monitor.recommendation.rank``)."""

    engine: LoRAMonitor

    @property
    def latest_analysis(self) -> dict[ModuleKey, ModuleAnalysis]:
        """The analysis of the latest snapshot, ``(layer, projection) → ModuleAnalysis``."""
        return self.engine.latest_analysis

    @property
    def recommendation(self) -> Optional[RankRecommendation]:
        """The rank suggested when training ended, from the latest analysis (None before)."""
        return self.engine.recommendation
