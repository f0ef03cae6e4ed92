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

from lora_monitor.adapters.kinds import block_order
from lora_monitor.adapters.truncation import rank_pattern
from lora_monitor.analysis.rank import ModuleEvidence, RankRecommendation, counted_directions, layer_name
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
    split = rec.per_kind
    if split is not None:
        head += ": " + ", ".join(f"{_GROUP_NAMES[group]} {rank}" for group, rank in split.items())
    elif any(answer.too_small for answer in rec.kinds.values()) and not rec.too_small:
        small = [_GROUP_NAMES[g] for g, answer in rec.kinds.items() if answer.too_small]
        strength = f"r may be too small for the {' and '.join(small)} modules: see {details}"
    line = f"{head} ({_span(rec)}r = {rec.r}; {readings}; {strength})"
    if rec.not_covered:
        line += f"; {not_covered(rec)}"
    return line


#: How the text names the groups of :mod:`lora_monitor.adapters.kinds`.
_GROUP_NAMES = {"attention": "attention", "mlp": "MLP"}


def not_covered(recommendation: RankRecommendation) -> str:
    """What the answer leaves out: the projections the adapter trains that were not monitored."""
    left_out = ", ".join(recommendation.not_covered)
    return (
        f"not covered: the adapter also trains {left_out}, which target_modules leaves out (the "
        f"answer and the probe read the monitored modules only)"
    )


def _count(parameters: int) -> str:
    return f"{parameters:,}".replace(",", " ")


def _per_kind_advice(rec: RankRecommendation, source: str, output: str, where: str) -> str:
    """What to do with a rank per kind: peft's rank_pattern for a new run, the cut for this one,
    and the parameters it saves against one rank for every module."""
    split = rec.per_kind
    assert split is not None and rec.rank is not None
    ranks = rec.module_ranks()
    spec = ",".join(f"{group}={rank}" for group, rank in split.items())
    words = " and ".join(f"the {_GROUP_NAMES[group]} modules r = {rank}" for group, rank in split.items())
    act = f"Give {words}"
    if ranks:
        r, pattern = rank_pattern(dict(sorted(ranks.items(), key=lambda item: block_order(item[0]))))
        act += f": LoraConfig(r={r}, rank_pattern={pattern!r}, ...) for a new run"
        _, uniform, mixed = rec.parameters()
        act += (
            f" ({_count(mixed)} LoRA parameters, {_count(uniform - mixed)} fewer than r = {rec.rank} for every module)"
        )
    act += f"; or cut this run's adapter so: `lora-monitor truncate {source} --rank {spec} -o {output}`{where}."
    small = [_GROUP_NAMES[group] for group, answer in rec.kinds.items() if answer.too_small]
    if small:
        act += f" The {' and '.join(small)} modules may need a larger r than they have: train them larger first."
    return act


def advice(recommendation: RankRecommendation, adapter_dir: Optional[str | os.PathLike] = None) -> str:
    """What to do with the suggestion, in a sentence or two; its ``lora-monitor truncate``
    command names ``adapter_dir`` (the run's saved adapter) and runs as printed when it is
    given, else it names placeholders."""
    rec = recommendation
    act = _advice(rec, adapter_dir)
    if rec.not_covered and rec.rank is not None:
        act += (
            f" This answer reads the monitored modules only; the adapter also trains "
            f"{', '.join(rec.not_covered)}, which lora-monitor truncate cuts too: monitor every trained module "
            f"(target_modules=None, the default) before cutting them."
        )
    return act


def _advice(rec: RankRecommendation, adapter_dir: Optional[str | os.PathLike]) -> str:
    if rec.rank is None:
        return "Nothing to act on yet: train longer and read the suggestion again."
    split = rec.per_kind
    if rec.too_small and split is not None and not all(a.too_small for a in rec.kinds.values()):
        # One group needs more than it has, the other less: a rank each for the next run.
        wanted = {g: 2 * a.r if a.too_small else split[g] for g, a in rec.kinds.items()}
        small = [_GROUP_NAMES[g] for g, a in rec.kinds.items() if a.too_small]
        act = (
            f"Train again with a larger r for the {' and '.join(small)} modules (they need more than half "
            f"of their r directions on the probe batch) and "
            + " and ".join(f"r = {wanted[g]} for the {_GROUP_NAMES[g]} modules" for g in wanted)
        )
        ordered = sorted(rec.trained, key=lambda m: block_order(m.name))
        ranks = {m.name: wanted.get(m.group or "", max(wanted.values())) for m in ordered}
        if ranks:
            r, pattern = rank_pattern(ranks)
            act += f": LoraConfig(r={r}, rank_pattern={pattern!r}, ...)"
        return act + "."
    if rec.too_small:
        assert rec.probe is not None and rec.probe.rank is not None  # too_small: the probe read a rank
        return (
            f"Train again with a larger r (e.g. r = {2 * rec.r}): {counted_directions(rec.probe.rank, rec.r)} "
            f"directions count on the probe batch, so the task may need more."
        )
    if rec.rank >= rec.r and split is None:
        return f"Keep r = {rec.r}."
    label = "_".join(f"{group}{rank}" for group, rank in split.items()) if split is not None else f"r{rec.rank}"
    if adapter_dir is None:
        source, output, where = "ADAPTER_DIR", "OUT_DIR", " (ADAPTER_DIR: where model.save_pretrained saved it)"
    else:
        source, output, where = shlex.quote(str(adapter_dir)), shlex.quote(f"{adapter_dir}_{label}"), ""
    if split is not None:
        act = _per_kind_advice(rec, source, output, where)
    else:
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
        if probe.lowest < probe.losses[probe.r]:
            lines += [
                "The shares are measured to the lowest loss read, which is below the whole update's: cut "
                "to fewer directions, the model does better on the probe batch (the directions cut off "
                "raise its loss there).",
                "",
            ]
    if rec.kinds:
        lines += [_kinds_table(rec), ""]
    if rec.not_covered:
        lines += [f"Modules {not_covered(rec)}.", ""]
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


def _kinds_table(rec: RankRecommendation) -> str:
    """The per-kind answer: each group cut alone, the other whole."""
    rows = []
    for group, answer in rec.kinds.items():
        probe = answer.probe
        rows.append(
            [
                _GROUP_NAMES[group],
                ", ".join(answer.projections),
                "–" if probe is None else ("none" if probe.rank is None else str(probe.rank)),
                "none" if answer.spectral is None else str(answer.spectral),
                "none" if answer.rank is None else str(answer.rank),
                str(answer.r),
                "yes" if answer.too_small else "no",
            ]
        )
    split = rec.per_kind
    verdict = (
        f"they differ more than {RULE.kind_split:g}×: a rank each (peft's rank_pattern)"
        if split is not None
        else f"within {RULE.kind_split:g}× of each other: one rank serves both"
    )
    headers = ["group", "projections", "probe (this group cut, the other whole)", "ΔW gap rank", "rank", "r"]
    return f"Per kind ({verdict}):\n\n" + markdown_table([*headers, "r may be too small"], rows)


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
