"""The rank suggestion as text: the console line, the Markdown report and its tables.

The same header is the same quantity, formatted the same, in every table: the report in
TensorBoard's Text tab, ``lora-monitor compare`` and ``lora-monitor inspect``.
"""

from __future__ import annotations

import os
import shlex
from collections import defaultdict
from collections.abc import Sequence
from statistics import median
from typing import Optional

from lora_monitor.analysis.rank import ModuleEvidence, RankRecommendation, layer_name
from lora_monitor.analysis.rank_rule import RULE
from lora_monitor.functional.bases import basis_info
from lora_monitor.outputs.tags import RECOMMENDATION_PLACE

#: Where the cautions are, in a text that lists them after its first line.
CAUTIONS_BELOW = "the cautions below"
#: Where the documentation states how often the suggestion was right.
VALIDATION_PLACE = "docs/rank.md, “How right it is”"


def _percent(share: float) -> str:
    return f"{100 * share:g} %"


def _span(recommendation: RankRecommendation) -> str:
    low, high = recommendation.low, recommendation.high
    # low ≤ rank ≤ high: one number says it all when they meet.
    return "" if low is None or high is None or low == high else f"likely {low}–{high}, "


def summary_line(recommendation: RankRecommendation, details: str = RECOMMENDATION_PLACE) -> str:
    """The suggestion in one line, for the console; ``details`` says where the cautions are.

    E.g. ``suggested LoRA rank 4 (likely 3–6, r = 64; functional probe 4, ΔW's spectral gaps
    q 2 / v 4; evidence consistent)``.
    """
    rec = recommendation
    probe = rec.probe.rank if rec.probe is not None else None
    readings = ("functional probe " + ("none" if probe is None else str(probe)) + ", ") if rec.probe else ""
    if rec.spectral is None:
        readings += "no spectral gap in ΔW"
    else:
        readings += "ΔW's spectral gaps " + " / ".join(f"{p} {v or 'none'}" for p, v in rec.projections.items())
    if rec.too_small:
        strength = f"r may be too small: see {details}"
    elif rec.weak:
        strength = f"weak evidence: see {details}"
    else:
        strength = "evidence consistent"
    head = "no LoRA rank is supported by the evidence yet" if rec.rank is None else f"suggested LoRA rank {rec.rank}"
    return f"{head} ({_span(rec)}r = {rec.r}; {readings}; {strength})"


def advice(recommendation: RankRecommendation, adapter_dir: Optional[str | os.PathLike] = None) -> str:
    """What to do with the suggestion, in a sentence or two; its ``lora-monitor truncate``
    command names ``adapter_dir`` (the run's saved adapter) and runs as printed when it is
    given, else it names placeholders."""
    rec = recommendation
    if rec.rank is None:
        return "Nothing to act on yet: train longer and read the suggestion again."
    if rec.too_small:
        return (
            f"Train again with a larger r (e.g. r = {2 * rec.r}): every one of the r = {rec.r} "
            f"directions counts on the probe batch, so the task may need more."
        )
    if rec.rank >= rec.r:
        return f"Keep r = {rec.r}."
    if adapter_dir is None:
        source, output, where = "ADAPTER_DIR", "OUT_DIR", " (ADAPTER_DIR: where model.save_pretrained saved it)"
    else:
        source, output, where = shlex.quote(str(adapter_dir)), shlex.quote(f"{adapter_dir}_r{rec.rank}"), ""
    act = (
        f"Train with r = {rec.rank}, or keep this run and cut its adapter to the suggestion: "
        f"`lora-monitor truncate {source} --rank {rec.rank} -o {output}`{where}."
    )
    if rec.weak:
        act += " The evidence is weak: read the suggestion again later in training before acting on it."
    return act


def report_markdown(recommendation: RankRecommendation, adapter_dir: Optional[str | os.PathLike] = None) -> str:
    """A Markdown report: the suggestion, what to do (:func:`advice`, naming ``adapter_dir``),
    the cautions, the probe's losses, and a table per projection and per module."""
    rec = recommendation
    lines = [f"**{summary_line(rec, CAUTIONS_BELOW)}**", "", f"What to do: {advice(rec, adapter_dir)}", ""]
    if rec.cautions:
        lines += ["Cautions:", ""] + [f"- {c}" for c in rec.cautions] + [""]
    lines += [
        f"How it is read (how often it was right: {VALIDATION_PLACE}): the functional probe "
        f"cuts every monitored ΔW to its top k directions at once and measures the loss on one "
        f"batch; its rank is the smallest k keeping {_percent(RULE.keep)} of the whole update's log-loss "
        f"reduction ({_percent(RULE.keep_low)} and {_percent(RULE.keep_high)} bound the range). A module's "
        f"spectral gap rank is the largest k ≤ r/2 with σ_k/σ_k+1 ≥ {RULE.gap_ratio:g} and σ_k² ≥ "
        f"{_percent(RULE.gap_floor)} of "
        f"‖ΔW‖_F². The suggestion is the larger "
        f"of the probe's rank and the largest gap rank.",
        "",
    ]
    if rec.probe is not None and rec.probe.rank is not None:
        probe = rec.probe
        rows = [[str(k), f"{loss:.4g}", f"{probe.kept(k):.1%}"] for k, loss in probe.losses.items()]
        lines += [
            f"Functional probe ({len(probe.losses)} forward passes, {probe.seconds:.2f} s):",
            "",
            markdown_table(["k (every ΔW cut to)", "probe loss", "share of the log-loss reduction kept"], rows),
            "",
        ]
        if any(probe.kept(k) > 1 for k in probe.losses):
            lines += [
                "A share above 100 %: cut to those k directions, the model's loss on the probe batch is "
                "lower than with its whole update (the directions cut off raise it on this batch).",
                "",
            ]
    by_projection: dict[str, list[ModuleEvidence]] = defaultdict(list)
    for m in rec.modules:
        by_projection[m.key[1]].append(m)
    rows = []
    for projection, gap in rec.projections.items():
        modules = by_projection[projection]
        rows.append(
            [
                projection,
                "none" if gap is None else str(gap),
                ", ".join(f"{m.key[0]}: {m.delta_w_gap_rank}" for m in modules),
                f"{median(m.delta_w_energy_rank for m in modules):g}",
                f"{median(m.delta_w_stable_rank for m in modules):.2f}",
            ]
        )
    headers = [
        "projection",
        "ΔW gap rank (largest)",
        "per layer",
        "median ΔW energy rank (90 %)",
        "median ΔW stable rank",
    ]
    lines += [markdown_table(headers, rows), ""]
    if rec.compared:
        lines += [
            f"Per module; φ against the reference run in basis {rec.basis!r} (the singular vectors "
            f"of {basis_info(rec.basis).matrix}; chance of φ(1, 1) is 1/n) is shown beside, not "
            f"used for the rank: two seeds share the update's structured noise too.",
            "",
        ]
    else:
        lines += ["Per module:", ""]
    lines.append(evidence_table(rec.modules, compared=rec.compared))
    if rec.skipped:
        lines += ["", "Skipped: " + "; ".join(rec.skipped)]
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ranks(m: ModuleEvidence) -> str:
    return str(m.rank) if m.reference_rank is None else f"{m.reference_rank} → {m.rank}"


def _top(m: ModuleEvidence) -> str:
    return "–" if m.phi_top is None else f"{m.phi_top:.3f} / {m.chance_top:.4f}"


GAP_RANK_COLUMN = f"ΔW gap rank (σ_k/σ_k+1 ≥ {RULE.gap_ratio:g})"

#: Every column a table of modules can have: header → cell. A header names the matrix it
#: describes, and the same header is the same quantity, formatted the same, in every table
#: (the report in TensorBoard's Text tab, ``lora-monitor compare`` and ``inspect``).
COLUMNS = {
    "module": lambda m: layer_name(m.key),
    "r": lambda m: str(m.rank),
    "r (ref → cur)": _ranks,
    GAP_RANK_COLUMN: lambda m: str(m.delta_w_gap_rank),
    "ΔW σ_k/σ_k+1": lambda m: _number(m.delta_w_gap, ".3f"),
    "shared directions": lambda m: "–" if m.shared_directions is None else str(m.shared_directions),
    "φ(1, 1) / chance": _top,
    "‖ΔW‖_F": lambda m: f"{m.delta_w_norm:.4g}",
    "ΔW σ₁": lambda m: f"{m.delta_w_sigma_max:.4g}",
    "ΔW σ₁/σ₂": lambda m: _number(m.delta_w_top_gap, ".3f"),
    "ΔW energy rank (90 %)": lambda m: str(m.delta_w_energy_rank),
    "ΔW effective rank": lambda m: f"{m.delta_w_effective_rank:.2f}",
    "ΔW stable rank": lambda m: f"{m.delta_w_stable_rank:.2f}",
    "‖ΔW‖_F/‖W₀‖_F": lambda m: _number(m.delta_w_relative_norm, ".2e"),
}
#: The columns of ``lora-monitor inspect``: ΔW's spectrum alone.
SPECTRAL_COLUMNS = (
    "module",
    "r",
    GAP_RANK_COLUMN,
    "ΔW σ_k/σ_k+1",
    "‖ΔW‖_F",
    "ΔW σ₁",
    "ΔW σ₁/σ₂",
    "ΔW energy rank (90 %)",
    "ΔW effective rank",
    "ΔW stable rank",
)


def evidence_table(modules: Sequence[ModuleEvidence], *, compared: bool) -> str:
    """The per-module table of the report: ΔW's spectrum and, beside another run, φ."""
    names = ["module", "r (ref → cur)", *SPECTRAL_COLUMNS[2:]]
    if compared:
        names[4:4] = ["shared directions", "φ(1, 1) / chance"]
    if any(m.delta_w_relative_norm is not None for m in modules):  # saved adapters have no W₀
        names.append("‖ΔW‖_F/‖W₀‖_F")
    return markdown_table(names, [[COLUMNS[name](m) for name in names] for m in modules])


def spectrum_table(modules: Sequence[ModuleEvidence]) -> str:
    """``lora-monitor inspect``'s table: :data:`SPECTRAL_COLUMNS`, a row per module."""
    return markdown_table(list(SPECTRAL_COLUMNS), [[COLUMNS[name](m) for name in SPECTRAL_COLUMNS] for m in modules])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub/TensorBoard Markdown table, columns padded so that it also reads as plain text."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
