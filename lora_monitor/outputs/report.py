"""The rank suggestion as text: the console line, the Markdown report and its tables.

The same header is the same quantity, formatted the same, in every table: the report in
TensorBoard's Text tab, ``lora-monitor compare`` and ``lora-monitor inspect``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import median
from typing import Optional

from lora_monitor.analysis.rank import ModuleEvidence, RankRecommendation, layer_name
from lora_monitor.functional.bases import basis_info
from lora_monitor.outputs.tags import RECOMMENDATION_PLACE

#: Where the cautions are, in a text that lists them after its first line.
CAUTIONS_BELOW = "the cautions below"


def summary_line(recommendation: RankRecommendation, details: str = RECOMMENDATION_PLACE) -> str:
    """The suggestion in one line, for the console; ``details`` says where the cautions are."""
    source = (
        "directions shared with the reference above chance"
        if recommendation.compared
        else ("the 90 %-energy rank of ΔW (spectrum only)")
    )
    per_projection = ", ".join(f"{p}: {'none' if r is None else r}" for p, r in recommendation.projections.items())
    if recommendation.rank is None:
        head = "no LoRA rank is supported by the evidence"
    else:
        head = f"suggested LoRA rank {recommendation.rank}"
    strength = f"weak evidence: see {details}" if recommendation.weak else "evidence consistent"
    return f"{head} ({per_projection}; from {source}, {len(recommendation.modules)} modules; {strength})"


def report_markdown(recommendation: RankRecommendation) -> str:
    """A Markdown report: the suggestion, the cautions, a table per projection and per module."""
    lines = [f"**{summary_line(recommendation, CAUTIONS_BELOW)}**", ""]
    if recommendation.rank is None and recommendation.compared:
        lines += [
            "No module shares a direction with the reference clearly above the level of "
            "random subspaces (φ(i, i) at chance, max(i, j)/n): the two runs agree on nothing "
            "yet. Train longer, or the update is noise at this rank.",
            "",
        ]
    if recommendation.cautions:
        lines += ["Evidence is weak:", ""] + [f"- {c}" for c in recommendation.cautions] + [""]
    by_projection: dict[str, list[ModuleEvidence]] = defaultdict(list)
    for m in recommendation.modules:
        by_projection[m.key[1]].append(m)
    evidence = "per layer (shared blocks)" if recommendation.compared else "per layer (90 %-energy rank)"
    rows = []
    for projection, suggested in recommendation.projections.items():
        modules = by_projection[projection]
        per_layer = ", ".join(f"{m.key[0]}: {m.suggested}" for m in modules)
        rows.append(
            [
                projection,
                "none" if suggested is None else str(suggested),
                per_layer,
                f"{median(m.delta_w_energy_rank for m in modules):g}",
                f"{median(m.delta_w_stable_rank for m in modules):.2f}",
            ]
        )
    lines += [
        markdown_table(
            ["projection", "suggested rank", evidence, "median ΔW energy rank (90 %)", "median ΔW stable rank"],
            rows,
        ),
        "",
        f"Per module (φ in basis {recommendation.basis!r}, the singular vectors of "
        f"{basis_info(recommendation.basis).matrix}; k = the suggested rank; chance of φ(i, i) is i/n):",
        "",
        evidence_table(recommendation.modules, recommendation.basis, compared=recommendation.compared),
    ]
    if recommendation.skipped:
        lines += ["", "Skipped: " + "; ".join(recommendation.skipped)]
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ranks(m: ModuleEvidence) -> str:
    return str(m.rank) if m.reference_rank is None else f"{m.reference_rank} → {m.rank}"


def _top(m: ModuleEvidence) -> str:
    return "–" if m.phi_top is None else f"{m.phi_top:.3f} / {m.chance_top:.4f}"


#: Every column a table of modules can have: header → cell. A header names the matrix it
#: describes, and the same header is the same quantity, formatted the same, in every table
#: (the report in TensorBoard's Text tab, ``lora-monitor compare`` and ``inspect``).
COLUMNS = {
    "module": lambda m: layer_name(m.key),
    "r": lambda m: str(m.rank),
    "r (ref → cur)": _ranks,
    "shared directions": lambda m: "–" if m.shared_directions is None else str(m.shared_directions),
    "φ(k, k)": lambda m: _number(m.block_overlap, ".3f"),
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
    "‖ΔW‖_F",
    "ΔW σ₁",
    "ΔW σ₁/σ₂",
    "ΔW energy rank (90 %)",
    "ΔW effective rank",
    "ΔW stable rank",
)


def evidence_table(modules: Sequence[ModuleEvidence], basis: str, *, compared: bool) -> str:
    """The per-module table of the report: ΔW's spectrum, and with a reference φ and the gaps
    of the basis matrix's spectra (the smaller of the two runs')."""
    matrix = basis_info(basis).matrix
    columns = {name: COLUMNS[name] for name in SPECTRAL_COLUMNS[:1]}
    columns["r (ref → cur)"] = COLUMNS["r (ref → cur)"]
    if compared:
        columns |= {name: COLUMNS[name] for name in ("shared directions", "φ(k, k)", "φ(1, 1) / chance")}
    columns |= {name: COLUMNS[name] for name in SPECTRAL_COLUMNS[2:]}
    if compared:
        columns[f"{matrix} σ₁/σ₂ (min of ref, cur)"] = lambda m: _number(m.top_gap, ".3f")
        columns[f"{matrix} σ_k/σ_k+1 (min of ref, cur)"] = lambda m: _number(m.cut_gap, ".3f")
    else:
        columns["ΔW σ_k/σ_k+1"] = lambda m: _number(m.cut_gap, ".3f")
    if any(m.delta_w_relative_norm is not None for m in modules):  # saved adapters have no W₀
        columns["‖ΔW‖_F/‖W₀‖_F"] = COLUMNS["‖ΔW‖_F/‖W₀‖_F"]
    return markdown_table(list(columns), [[cell(m) for cell in columns.values()] for m in modules])


def spectrum_table(modules: Sequence[ModuleEvidence]) -> str:
    """``lora-monitor inspect``'s table: :data:`SPECTRAL_COLUMNS`, a row per module."""
    return markdown_table(list(SPECTRAL_COLUMNS), [[COLUMNS[name](m) for name in SPECTRAL_COLUMNS] for m in modules])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub/TensorBoard Markdown table, columns padded so that it also reads as plain text."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
