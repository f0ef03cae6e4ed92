"""Every tag the monitor writes, and what it means: the tag reference.

Pure naming, no I/O and no framework: the engine asks this module what to write, and every
output (TensorBoard, Lightning's loggers, W&B, MLflow, CSV) writes the same tags.

TensorBoard groups cards by the part of a tag before its first ``/``, sorts the groups by name
(capitals before lower case) and opens the first two, so the answer comes first: ``LoRA_rank``
and ``LoRA_summary`` sort before Lightning's ``epoch`` and ``hp_metric`` and before any
lower-case metric, and together hold at most :data:`MAX_SUMMARY_CARDS` cards whatever the depth
of the model. Every tag names the matrix it describes: ``delta_w_*`` are of ΔW (merged minus
pretrained weight), ``a_init_similarity`` of A, the ``phi_*`` and ``shared_directions`` series
of the singular vectors of the monitor's ``basis`` (A by default); the report's and the CLI's
tables use the same names.

At every snapshot, at step ``step``:

The cards of a group are sorted by name: ``LoRA_rank`` shows the overview first, then the
suggestion, the probe's reading and the range, the strength.

- ``LoRA_rank/suggested.model``: the LoRA rank suggested by this snapshot
  (:func:`lora_monitor.analysis.rank.recommend_rank`: the larger of the functional probe's
  rank and the largest spectral gap rank), so that it can be watched as it forms; 0 where no
  rank is supported.
- ``LoRA_rank/suggested.range_low``, ``LoRA_rank/suggested.range_high``: the range the
  suggestion likely lies in (with a probe only).
- ``LoRA_rank/suggested.probe_rank``: the functional probe's rank: the smallest k whose joint truncation
  of every monitored ΔW keeps 95 % of the log-loss reduction on the probe batch (with a probe
  only; 0 while the update has not lowered the probe loss).
- ``LoRA_rank/suggested_kind.attention``, ``LoRA_rank/suggested_kind.mlp``: where the adapter
  trains both attention and MLP modules, the rank each group needs, read with the other group
  whole (:class:`lora_monitor.analysis.rank.KindAnswer`); the report gives each its own rank
  (peft's ``rank_pattern``) where they differ more than 2×.
- ``LoRA_rank/weak_evidence``: 1 when that suggestion's evidence is weak (or r may be too
  small), else 0.
- ``LoRA_rank/overview`` (image): every layer at once, per projection each layer's gap rank
  against r and the suggestion, and the probe's curve
  (:func:`lora_monitor.outputs.overview.overview_figure`).
- ``LoRA_summary/max_delta_w_gap_rank.<p>``: per projection, the largest ``delta_w_gap_rank``
  over layers (the spectral reading of the suggestion).
- ``LoRA_summary/median_<metric>.<p>``: the median over layers of the per-layer metrics of
  :func:`summary_metrics` (``delta_w_gap_rank``, ``delta_w_relative_norm``,
  ``delta_w_energy_rank``, ``a_init_similarity``, as many as fit; beside another run,
  ``shared_directions`` and ``phi_top`` first — never for two snapshots of one run, where in
  A's basis they measure how little A has moved, not the rank).

Per module, ``lora_monitor.<metric>/layer_<L>.<p>`` (layer L, projection p):

- ``delta_w_norm``: ‖ΔW‖_F; ``delta_w_sigma_max``: σ₁, the top singular value of ΔW.
- ``phi_top``: φ(1, 1), how well the reference's top direction is aligned with the current
  top direction; ``phi_mean``: the mean of φ(i, i) for i up to the smaller of the two ranks.
- ``shared_directions``: the number of top directions shared with the reference clearly above
  the level of random subspaces (:func:`lora_monitor.functional.shared_directions` gives the
  precise rule).
- ``delta_w_gap_rank``: the largest k ≤ r/2 with σ_k/σ_{k+1} ≥ 1.5 and σ_k² ≥ 1 % of
  ‖ΔW‖_F² in ΔW's spectrum: the directions standing clear of its noise (0: none).
- ``delta_w_energy_rank``, ``delta_w_effective_rank``, ``delta_w_stable_rank``: of ΔW's
  spectrum: the smallest k holding 90 % of ‖ΔW‖_F², exp(entropy of σ/Σσ) (Roy & Vetterli),
  ‖ΔW‖_F²/σ₁².
- ``delta_w_amplification``: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F (the paper's §7.3), and
  ``delta_w_relative_norm``: ‖ΔW‖_F / ‖W₀‖_F; both need the live W₀.
- ``a_init_similarity``: φ(A₀, A, r, r), how much of A's row space is still its value before
  the first optimizer step (from a fresh start only).
- ``intruder_dimensions``: with ``intruder_top_k``, the top singular vectors of W₀ + ΔW far
  from every singular vector of W₀.
- DoRA modules only: ``dora_magnitude_norm``, ‖(D − I)·W₀‖_F, the part of ΔW that rescales
  W₀'s rows (D = diag(m / ‖row of W₀ + s·B·A‖)); ``dora_direction_norm``, ‖D·s·B·A‖_F, the
  low-rank directional term (the one φ reads); ``dora_scale_std``, the standard deviation of
  D's diagonal over rows (0 when every row is rescaled alike). AdaLoRA modules only:
  ``adalora_kept_rank``, the number of triplets rank allocation keeps (non-zero E).
- ``lora_monitor.phi_heatmaps/layer_<L>`` (image), for each drawn layer (``layers``):
  φ(reference, current, i, j) per projection, i (reference) on the vertical axis and j
  (current) on the horizontal one, colour scale 0..1; when the reference has the smaller rank,
  a zoom on i, j ≤ r_ref with the cells j > i masked.

When training ends: ``LoRA_rank/recommendation`` (text; TensorBoard's Text tab shows it as
``LoRA_rank/recommendation/text_summary``), the suggested LoRA rank with its evidence (the
summary line also goes to the console).

Once per run, a custom-scalars layout (TensorBoard → Custom Scalars) draws every per-layer
metric as one chart per projection, the layers as its lines. No ``phi_*`` or
``shared_directions`` scalars and no heatmap are written for the first snapshot of a run with
``reference="first"`` or ``"previous"`` (there is nothing to compare with yet); the overview is
written at every snapshot (drawn again only when what it shows changed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from statistics import median

from lora_monitor.adapters import ModuleKey
from lora_monitor.adapters.kinds import ATTENTION, MLP, module_group
from lora_monitor.analysis.rank import RankRecommendation, layer_name
from lora_monitor.analysis.results import OPTIONAL_SCALAR_NAMES, SCALAR_NAMES, ModuleAnalysis

#: The group of the answer: suggested ranks, evidence, overview figure, end-of-fit report.
RANK_GROUP = "LoRA_rank"
#: The group of medians over layers.
SUMMARY_GROUP = "LoRA_summary"
#: Per-layer groups are ``lora_monitor.<metric>``.
LAYER_GROUP_PREFIX = "lora_monitor"
#: At most this many cards in the two groups TensorBoard opens (for up to 16 projections).
MAX_SUMMARY_CARDS = 24

#: Per-projection medians in ``LoRA_summary``, most telling first: as many as fit the budget.
SUMMARY_METRICS = ("delta_w_gap_rank", "delta_w_relative_norm", "delta_w_energy_rank", "a_init_similarity")
#: Shown first beside another run only: for two snapshots of one run in A's basis they read
#: how far A moved from its random init, which is no evidence of the rank the task needs.
COMPARISON_METRICS = ("shared_directions", "phi_top")

#: The φ heatmaps of one drawn layer: ``lora_monitor.phi_heatmaps/layer_<L>`` (image).
HEATMAP_GROUP = f"{LAYER_GROUP_PREFIX}.phi_heatmaps"
#: One figure of every layer: gap rank per layer and projection against r and the suggestion.
OVERVIEW_TAG = f"{RANK_GROUP}/overview"
#: The end-of-fit report, Markdown (TensorBoard → Text).
RECOMMENDATION_TAG = f"{RANK_GROUP}/recommendation"
#: The report's tag as TensorBoard's Text tab shows it (``add_text`` appends ``/text_summary``).
RECOMMENDATION_TEXT_TAG = f"{RECOMMENDATION_TAG}/text_summary"
#: Where a user finds the report in TensorBoard, for messages.
RECOMMENDATION_PLACE = f"TensorBoard → Text → {RECOMMENDATION_TEXT_TAG}"

#: Cards of ``LoRA_rank`` besides one per projection: overview, model, weak evidence, the
#: probe's rank and the range's two ends.
_RANK_CARDS = 6
#: Cards of ``LoRA_rank`` where the projections hold attention and MLP ones: a rank per group.
_KIND_CARDS = 2


def scalar_tag(name: str, key: ModuleKey) -> str:
    """``lora_monitor.<name>/layer_<L>.<p>`` of the per-module scalar ``name``."""
    return f"{LAYER_GROUP_PREFIX}.{name}/{layer_name(key)}"


def summary_tag(name: str, projection: str) -> str:
    """``LoRA_summary/median_<metric>.<p>``: the median over layers of ``name``."""
    return f"{SUMMARY_GROUP}/median_{name}.{projection}"


def heatmap_tag(layer: int) -> str:
    return f"{HEATMAP_GROUP}/layer_{layer:02d}"


SUGGESTED_TAG = f"{RANK_GROUP}/suggested.model"
RANGE_LOW_TAG, RANGE_HIGH_TAG = f"{RANK_GROUP}/suggested.range_low", f"{RANK_GROUP}/suggested.range_high"
PROBE_RANK_TAG = f"{RANK_GROUP}/suggested.probe_rank"
WEAK_EVIDENCE_TAG = f"{RANK_GROUP}/weak_evidence"


def kind_tag(group: str) -> str:
    """``LoRA_rank/suggested_kind.<group>``: the rank one group (attention, MLP) needs."""
    return f"{RANK_GROUP}/suggested_kind.{group}"


def has_kinds(projections: Sequence[str]) -> bool:
    """Whether ``projections`` hold both attention and MLP ones (then ``LoRA_rank`` has a card
    per group), as their names tell."""
    groups = {module_group(p) for p in projections}
    return ATTENTION in groups and MLP in groups


def gap_rank_tag(projection: str) -> str:
    """``LoRA_summary/max_delta_w_gap_rank.<p>``: the largest spectral gap rank of projection
    ``p`` over its layers."""
    return f"{SUMMARY_GROUP}/max_delta_w_gap_rank.{projection}"


def is_monitor_tag(tag: str) -> bool:
    """Whether ``tag`` is one of the monitor's (any of its groups)."""
    group = tag.split("/", 1)[0]
    return group in (RANK_GROUP, SUMMARY_GROUP, LAYER_GROUP_PREFIX) or group.startswith(f"{LAYER_GROUP_PREFIX}.")


def summary_metrics(projections: int, compares_runs: bool = False, kinds: bool = False) -> tuple[str, ...]:
    """The medians of ``LoRA_summary`` that fit, with ``projections`` projections, in
    :data:`MAX_SUMMARY_CARDS` cards beside ``LoRA_rank``'s (fixed by the projections alone, so
    the same tags are written at every snapshot of a run): :data:`SUMMARY_METRICS`, after
    :data:`COMPARISON_METRICS` when the reference is another run (``compares_runs``); ``kinds``:
    the projections hold attention and MLP ones (:func:`has_kinds`), two more rank cards."""
    room = MAX_SUMMARY_CARDS - _RANK_CARDS - (_KIND_CARDS if kinds else 0) - projections
    metrics = (COMPARISON_METRICS if compares_runs else ()) + SUMMARY_METRICS
    return metrics[: max(0, room // max(projections, 1))]


def snapshot_scalars(analyses: Mapping[ModuleKey, ModuleAnalysis], compares_runs: bool = False) -> dict[str, float]:
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
    for name in summary_metrics(len(by_projection), compares_runs, has_kinds(list(by_projection))):
        for projection, modules in by_projection.items():
            present = [m[name] for m in modules if name in m]
            if present:
                values[summary_tag(name, projection)] = float(median(present))
    return values


def recommendation_scalars(recommendation: RankRecommendation) -> dict[str, float]:
    """The rank suggested at one snapshot, as scalars (logged at every snapshot, so that the
    suggestion can be watched as it forms): for the model, with a probe its reading and the
    range, each projection's gap rank, and whether the evidence is weak (1: spectrum only, too
    early, r may be too small or another caution; 0: consistent). No rank logs 0."""
    rec = recommendation
    values = {SUGGESTED_TAG: float(rec.rank or 0)}
    if rec.probe is not None:
        values[PROBE_RANK_TAG] = float(rec.probe.rank or 0)
        values[RANGE_LOW_TAG] = float(rec.low or 0)
        values[RANGE_HIGH_TAG] = float(rec.high or 0)
    values |= {gap_rank_tag(p): float(r or 0) for p, r in rec.projections.items()}
    if has_kinds(list(rec.projections)):
        values |= {kind_tag(group): float(answer.rank or 0) for group, answer in rec.kinds.items()}
    values[WEAK_EVIDENCE_TAG] = float(rec.weak)
    return values


def _exactly(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(keys: Sequence[ModuleKey], compares_runs: bool = False) -> dict[str, dict[str, list]]:
    """A TensorBoard custom-scalars layout (``SummaryWriter.add_custom_scalars``): the
    suggestion, its range and its readings on one chart; each summary metric on one chart,
    projections as lines; and for each per-module metric, one multi-line chart per projection
    with the layers as lines."""
    projections = list(dict.fromkeys(projection for _, projection in sorted(keys)))
    readings = [SUGGESTED_TAG, RANGE_LOW_TAG, RANGE_HIGH_TAG, PROBE_RANK_TAG]
    if has_kinds(projections):
        readings += [kind_tag(ATTENTION), kind_tag(MLP)]
    layout: dict[str, dict[str, list]] = {
        f"{RANK_GROUP}: suggested rank": {
            "suggested rank, its range, the probe's and the gap ranks": [
                "Multiline",
                [_exactly(tag) for tag in readings] + [rf"^{SUMMARY_GROUP}/max_delta_w_gap_rank\."],
            ],
            "weak evidence (1: weak, 0: consistent)": ["Multiline", [_exactly(WEAK_EVIDENCE_TAG)]],
        },
        f"{SUMMARY_GROUP}: medians over layers": {
            f"median {name}": ["Multiline", [_exactly(summary_tag(name, p)) for p in projections]]
            for name in summary_metrics(len(projections), compares_runs, has_kinds(projections))
        },
    }
    for name in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES:
        group = f"{LAYER_GROUP_PREFIX}.{name}"
        layout[f"{group}: per layer"] = {
            f"{name} of {p}, layers as lines": ["Multiline", [rf"^{re.escape(group)}/layer_\d+\.{re.escape(p)}$"]]
            for p in projections
        }
    return layout
