"""What the monitor's outputs are called: tag names and the scalars of one snapshot.

Pure naming, no I/O and no framework: the engine asks this module what to write, and every
output (TensorBoard, Lightning's loggers, W&B, MLflow, CSV) writes the same tags.

TensorBoard groups cards by the part of a tag before its first ``/``, sorts the groups by name
(capitals before lower case) and opens the first two. So the monitor writes three kinds of group:

- ``LoRA_rank``: the answer — the suggested rank for the model and per projection at every
  snapshot, whether the evidence is weak, the overview figure, the end-of-fit report (text);
- ``LoRA_summary``: medians over layers, per projection, of the key per-layer metrics;
- ``lora_monitor.<metric>``: the per-layer series ``lora_monitor.<metric>/layer_<L>.<p>``, one
  group per metric, for drill-down (the custom-scalars layout draws each as one chart per
  projection, layers as lines); ``lora_monitor.phi_heatmaps/layer_<L>``: the φ heatmaps.

The two capitalized groups sort before Lightning's ``epoch`` and ``hp_metric`` and before any
lower-case metric, so they are the two TensorBoard opens; together they hold at most
:data:`MAX_SUMMARY_CARDS` cards whatever the depth of the model.

Every tag says which matrix it describes: ``delta_w_*`` are of ΔW (merged minus pretrained
weight), ``a_init_similarity`` of A, the ``phi_*`` and ``shared_directions`` series of the
singular vectors of the monitor's ``basis`` (A by default); the tables of
:mod:`lora_monitor.recommend` and of the CLI use the same names.
"""

from __future__ import annotations

import re
from statistics import median
from typing import TYPE_CHECKING, Mapping, Sequence

from lora_monitor.adapters import ModuleKey

if TYPE_CHECKING:  # recommend.py imports this module for RECOMMENDATION_TAG
    from lora_monitor.recommend import RankRecommendation
    from lora_monitor.snapshots import ModuleAnalysis

#: The group of the answer: suggested ranks, evidence, overview figure, end-of-fit report.
RANK_GROUP = "LoRA_rank"
#: The group of medians over layers.
SUMMARY_GROUP = "LoRA_summary"
#: Per-layer groups are ``lora_monitor.<metric>``.
LAYER_GROUP_PREFIX = "lora_monitor"
#: At most this many cards in the two groups TensorBoard opens (for up to 21 projections).
MAX_SUMMARY_CARDS = 24

#: Scalars logged per monitored module, by the name :attr:`ModuleAnalysis.scalars` gives them
#: (the argument of :func:`scalar_tag`); those that need W₀, a reference or the initial factors
#: only when the run has them.
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
#: The metric's name in its tag, naming the matrix it describes.
TAG_METRICS = {
    "delta_w_norm": "delta_w_norm",
    "sigma_max": "delta_w_sigma_max",
    "phi_top": "phi_top",
    "phi_mean": "phi_mean",
    "shared_directions": "shared_directions",
    "energy_rank": "delta_w_energy_rank",
    "effective_rank": "delta_w_effective_rank",
    "stable_rank": "delta_w_stable_rank",
    "amplification": "delta_w_amplification",
    "delta_w_relative_norm": "delta_w_relative_norm",
    "a_init_similarity": "a_init_similarity",
    "intruder_dimensions": "intruder_dimensions",
    # Of some peft variants' modules only: snapshots.VARIANT_SCALAR_NAMES (DoRA's magnitude
    # part (D − I)·W₀ and directional term, the spread of D; AdaLoRA's kept rank).
    "dora_magnitude_norm": "dora_magnitude_norm",
    "dora_direction_norm": "dora_direction_norm",
    "dora_scale_std": "dora_scale_std",
    "adalora_kept_rank": "adalora_kept_rank",
}
#: Per-projection medians in ``LoRA_summary``, most telling first: as many as fit the budget.
SUMMARY_METRICS = ("shared_directions", "energy_rank", "phi_top", "delta_w_relative_norm", "a_init_similarity")

#: The φ heatmaps of one drawn layer: ``lora_monitor.phi_heatmaps/layer_<L>`` (image).
HEATMAP_GROUP = f"{LAYER_GROUP_PREFIX}.phi_heatmaps"
#: One figure of every layer: supported rank per layer and projection against r and the suggestion.
OVERVIEW_TAG = f"{RANK_GROUP}/overview"
#: The end-of-fit report, Markdown (TensorBoard → Text).
RECOMMENDATION_TAG = f"{RANK_GROUP}/recommendation"
#: Where a user finds the report in TensorBoard, for messages.
RECOMMENDATION_PLACE = f"TensorBoard → Text → {RECOMMENDATION_TAG}"

#: Cards of ``LoRA_rank`` besides one per projection: overview, model, weak evidence.
_RANK_CARDS = 3


def _layer_name(key: ModuleKey) -> str:
    layer, projection = key
    return f"layer_{layer:02d}.{projection}"


def scalar_tag(name: str, key: ModuleKey) -> str:
    """``lora_monitor.<metric>/layer_<L>.<p>`` of the per-module scalar ``name`` (a
    :data:`SCALAR_NAMES` entry)."""
    return f"{LAYER_GROUP_PREFIX}.{TAG_METRICS[name]}/{_layer_name(key)}"


def summary_tag(name: str, projection: str) -> str:
    """``LoRA_summary/median_<metric>.<p>``: the median over layers of ``name``."""
    return f"{SUMMARY_GROUP}/median_{TAG_METRICS[name]}.{projection}"


def heatmap_tag(layer: int) -> str:
    return f"{HEATMAP_GROUP}/layer_{layer:02d}"


def suggested_rank_tag(projection: str | None) -> str:
    """``LoRA_rank/suggested.<p>``, or ``LoRA_rank/suggested.model`` for ``None``."""
    return f"{RANK_GROUP}/suggested.{'model' if projection is None else projection}"


WEAK_EVIDENCE_TAG = f"{RANK_GROUP}/weak_evidence"


def is_monitor_tag(tag: str) -> bool:
    """Whether ``tag`` is one of the monitor's (any of its groups)."""
    group = tag.split("/", 1)[0]
    return group in (RANK_GROUP, SUMMARY_GROUP, LAYER_GROUP_PREFIX) or group.startswith(f"{LAYER_GROUP_PREFIX}.")


def summary_metrics(projections: int) -> tuple[str, ...]:
    """The :data:`SUMMARY_METRICS` whose medians fit, with ``projections`` projections, in
    :data:`MAX_SUMMARY_CARDS` cards beside ``LoRA_rank``'s (fixed by the projections alone, so
    the same tags are written at every snapshot of a run)."""
    room = MAX_SUMMARY_CARDS - _RANK_CARDS - projections
    return SUMMARY_METRICS[: max(0, room // max(projections, 1))]


def snapshot_scalars(analyses: Mapping[ModuleKey, ModuleAnalysis]) -> dict[str, float]:
    """Every scalar of one snapshot's analyses, by tag: each module's series and, per
    projection, the medians over layers of :func:`summary_metrics`."""
    values = {
        scalar_tag(name, key): value
        for key, analysis in sorted(analyses.items())
        for name, value in analysis.scalars.items()
    }
    by_projection: dict[str, list[dict[str, float]]] = {}
    for (_, projection), analysis in sorted(analyses.items()):
        by_projection.setdefault(projection, []).append(analysis.scalars)
    for name in summary_metrics(len(by_projection)):
        for projection, modules in by_projection.items():
            present = [m[name] for m in modules if name in m]
            if present:
                values[summary_tag(name, projection)] = float(median(present))
    return values


def recommendation_scalars(recommendation: RankRecommendation) -> dict[str, float]:
    """The rank suggested at one snapshot, as scalars (logged at every snapshot, so that the
    suggestion can be watched as it forms): for the model, per projection, and whether the
    evidence is weak (1: spectrum only, too early or another caution; 0: consistent). A
    projection with no supported rank logs 0."""
    values = {suggested_rank_tag(p): float(r or 0) for p, r in recommendation.projections.items()}
    values[suggested_rank_tag(None)] = float(recommendation.rank or 0)
    values[WEAK_EVIDENCE_TAG] = float(recommendation.weak)
    return values


def _exactly(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(keys: Sequence[ModuleKey]) -> dict[str, dict[str, list]]:
    """A TensorBoard custom-scalars layout (``SummaryWriter.add_custom_scalars``): the
    suggested ranks on one chart; each summary metric on one chart, projections as lines; and
    for each per-module metric, one multi-line chart per projection with the layers as lines."""
    projections = list(dict.fromkeys(projection for _, projection in sorted(keys)))
    layout: dict[str, dict[str, list]] = {
        f"{RANK_GROUP}: suggested rank": {
            "suggested rank (model and per projection)": ["Multiline", [rf"^{RANK_GROUP}/suggested\."]],
            "weak evidence (1: weak, 0: consistent)": ["Multiline", [_exactly(WEAK_EVIDENCE_TAG)]],
        },
        f"{SUMMARY_GROUP}: medians over layers": {
            f"median {TAG_METRICS[name]}": [
                "Multiline", [_exactly(summary_tag(name, p)) for p in projections]
            ]
            for name in summary_metrics(len(projections))
        },
    }
    for name in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES:
        group = f"{LAYER_GROUP_PREFIX}.{TAG_METRICS[name]}"
        layout[f"{group}: per layer"] = {
            f"{TAG_METRICS[name]} of {p}, layers as lines": [
                "Multiline", [rf"^{re.escape(group)}/layer_\d+\.{re.escape(p)}$"]
            ]
            for p in projections
        }
    return layout
