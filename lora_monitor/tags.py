"""What the monitor's outputs are called: tag names and the scalars of one snapshot.

Pure naming, no I/O and no framework: the engine asks this module what to write, and every
output (TensorBoard, Lightning's loggers, W&B, MLflow, CSV) writes the same tags.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from lora_monitor.adapters import ModuleKey
from lora_monitor.recommend import RankRecommendation
from lora_monitor.snapshots import ModuleAnalysis

TAG_PREFIX = "lora_monitor"
IMAGE_TAG = f"{TAG_PREFIX}/phi_heatmaps"
#: Scalars logged per monitored module, ``lora_monitor/<name>/layer_<L>.<projection>`` (those
#: that need W₀, a reference or the initial factors only when the run has them).
SCALAR_NAMES = (
    "delta_w_norm",
    "sigma_max",
    "phi_top",
    "phi_mean",
    "shared_directions",
    "energy_rank",
    "effective_rank",
    "stable_rank",
    "amplification",
    "delta_w_relative_norm",
    "a_init_similarity",
)
#: Scalars logged only when asked for (``intruder_top_k``).
OPTIONAL_SCALAR_NAMES = ("intruder_dimensions",)
RECOMMENDATION_TAG = f"{TAG_PREFIX}/rank_recommendation"


def scalar_tag(name: str, key: ModuleKey) -> str:
    layer, projection = key
    return f"{TAG_PREFIX}/{name}/layer_{layer:02d}.{projection}"


def snapshot_scalars(analyses: Mapping[ModuleKey, ModuleAnalysis]) -> dict[str, float]:
    """Every scalar of one snapshot's analyses, by tag."""
    return {
        scalar_tag(name, key): value
        for key, analysis in sorted(analyses.items())
        for name, value in analysis.scalars.items()
    }


def recommendation_scalars(recommendation: RankRecommendation) -> dict[str, float]:
    """The rank suggested at one snapshot, as scalars (logged at every snapshot, so that the
    suggestion can be watched as it forms): for the model, per projection, and whether the
    evidence is weak (1) or consistent (0). A projection with no supported rank logs 0."""
    values = {f"{TAG_PREFIX}/suggested_rank/{p}": float(r or 0) for p, r in recommendation.projections.items()}
    values[f"{TAG_PREFIX}/suggested_rank/model"] = float(recommendation.rank or 0)
    values[f"{TAG_PREFIX}/suggested_rank/weak_evidence"] = float(recommendation.weak)
    return values


def custom_scalars_layout(keys: Sequence[ModuleKey]) -> dict[str, dict[str, list]]:
    """A TensorBoard custom-scalars layout (``SummaryWriter.add_custom_scalars``): for each
    per-module metric, one multi-line chart per projection with the layers as its lines."""
    projections = sorted({projection for _, projection in keys})
    return {
        f"{TAG_PREFIX}: {name}": {
            projection: ["Multiline", [rf"{TAG_PREFIX}/{name}/layer_\d+\.{re.escape(projection)}$"]]
            for projection in projections
        }
        for name in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES
    }
