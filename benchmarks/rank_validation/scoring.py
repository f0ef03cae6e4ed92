"""Scoring: the candidates' names, the truth k* of each case, whether a reading is within its target, and the tables' cells."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Optional

from .cases import Settings
from .evaluation import knee, knee_linear

#: The candidates of the side-by-side tables, in order (names of rank_candidates; "probe*" are
#: model-level readings, the others per module, aggregated by ``--aggregate``).
CANDIDATES = (
    "energy90",
    "gd",
    "mp",
    "gap15",
    "gap15f",
    "gap2",
    "stab80",
    "stab90",
    "incr",
    "growth",
    "probe90",
    "probe95",
    "probe_log",
)


REFERENCE_CANDIDATES = ("ref_dw", "ref_A")


PER_MODULE = ("energy90", "gd", "mp", "gap15", "gap15f", "gap2", "stab80", "incr", "growth")


def model_value(est: dict, name: str, how: str = "max") -> Optional[int]:
    """A candidate's model-level suggestion at one fraction (``how``: max, second, median)."""
    if name.startswith("probe"):
        return est["probe"].get(name)
    if name not in est["model"]:
        return None
    return int(round(est["model"][name][how]))


#: The truths a table can be scored against (``--truth``): the key in :func:`truth_of`'s result.
TRUTHS = {
    "trunc": "knee (log loss, 5 %) of the seed-averaged truncation curve of the trained r = 64 runs",
    "loss_vs_r": "knee (log loss, 5 %) of held-out loss vs trained r",
    "loss_vs_r_linear": "knee (loss, 5 % of the reduction) of held-out loss vs trained r",
}


def truth_of(case: dict, kind: str) -> dict:
    """The truths of a case (see :data:`TRUTHS`), all by :func:`knee` (or :func:`knee_linear`).

    ``trunc`` (the default ``k*``): the knee of the truncation curve — held-out loss (the
    example: validation loss, trained head kept) with every ΔW of a trained r = 64 adapter cut to
    its top k directions — averaged over the r = 64 seeds. One run, one optimisation: only the
    number of kept directions varies, so the curve measures the rank the learnt function uses.
    ``loss_vs_r``: the knee of held-out loss vs the trained r (planted: seed 0; example: mean
    over seeds). With α = r and 300 steps it mixes capacity with learning speed: a larger r
    takes larger effective steps and converges further (K2_flat: r = 2 → 1.0e-5, r = 3 → 6.4e-6,
    r = 8 → 4.6e-6, r = 64 → 3.3e-5), so it is reported beside, not used as the truth."""
    runs = case["runs"]
    out: dict[str, Any] = {"trunc_runs": {}}
    curves = []
    big = max(v["rank"] for v in runs.values())
    for name, v in sorted(runs.items()):
        if v["rank"] == big and len(v["truncation"]) > 2:
            curve = {int(k): x for k, x in v["truncation"].items()}
            curves.append(curve)
            out["trunc_runs"][name] = {
                "curve": curve,
                "knee": knee(curve, curve[0]),
                "knee_linear": knee_linear(curve, curve[0]),
            }
    if curves:
        common = sorted(set.intersection(*(set(c) for c in curves)))
        mean = {k: sum(c[k] for c in curves) / len(curves) for k in common}
        out["trunc_curve"] = mean
        out["trunc"] = knee(mean, mean[0])
        out["trunc_linear"] = knee_linear(mean, mean[0])
    by_r: dict[int, list[float]] = {}
    chosen = [v for v in runs.values() if kind == "example" or v["seed"] == 0]
    for v in chosen:
        by_r.setdefault(v["rank"], []).append(v["heldout_loss"])
    base = sum(v["base_loss"] for v in chosen) / len(chosen)
    out["loss_vs_r_curve"] = {r: sum(x) / len(x) for r, x in sorted(by_r.items())}
    out["base"] = base
    out["loss_vs_r"] = knee(out["loss_vs_r_curve"], base)
    out["loss_vs_r_linear"] = knee_linear(out["loss_vs_r_curve"], base)
    if kind == "example":
        acc: dict[int, list[float]] = {}
        for v in runs.values():
            acc.setdefault(v["rank"], []).append(v["val_acc"])
        out["acc_vs_r"] = {r: sum(x) / len(x) for r, x in sorted(acc.items())}
        # accuracy: the smallest k within the validation set's noise (±0.035) of the full update
        out["acc_knee"] = {}
        for name, v in sorted(runs.items()):
            if v["rank"] == big and len(v["truncation"]) > 2:
                a = {int(k): x for k, x in v["truncation_acc"].items()}
                out["acc_knee"][name] = min(k for k, x in sorted(a.items()) if x >= a[v["rank"]] - 0.035)
    out["k_star"] = out.get("trunc", out["loss_vs_r"])
    return out


def kind_of(case_name: str) -> str:
    return "example" if case_name == "example" else "planted"


def in_target(value: Optional[float], k_star: int, kind: str) -> bool:
    """Planted: within [k*, 2k*]; the example: within a factor 2 of the truncation knee."""
    if value is None:
        return False
    if kind == "example":
        return k_star / 2 <= value <= 2 * k_star
    return k_star <= value <= 2 * k_star


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else str(int(x))


def _e(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-2 else f"{x:.2e}"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def big_runs(case: dict, settings: Settings) -> list[tuple[str, dict]]:
    """The r = 64 runs of a case, by name (``r64_s0``, ``r64_s1``, ...)."""
    return sorted((n, run) for n, run in case["runs"].items() if run["rank"] == settings.big_rank)


def shared_reading(package: dict, how: str) -> Optional[float]:
    """The paper's φ reading beside a reference run: directions shared with it clearly above
    chance, per module, read as their ``max`` or ``median`` over modules."""
    shared = package.get("reference", {}).get("shared")
    if not shared:
        return None
    return max(shared) if how == "max" else statistics.median(shared)


def truth_note(case_name: str, settings: Settings, truth: dict) -> str:
    """How a case's k* relates to what was planted (the example: its seeds' own knees)."""
    case = next((c for c in settings.planted_cases if c.name == case_name), None)
    if case is None:
        knees = ", ".join(str(x["knee"]) for x in truth["trunc_runs"].values())
        return f"truncation knee; the seeds' knees {knees}"
    if case.decay != 1:
        return f"truncation knee; planted K = {case.K}, σ × {case.decay:g} each"
    if len(set(case.ranks_by_layer)) > 1:
        return f"truncation knee; planted K = {'/'.join(map(str, case.ranks_by_layer))} by layer"
    return f"truncation knee; planted K = {case.K}"


def _suggestion(reading: dict, k_star: int, kind: str) -> str:
    if reading["rank"] is None:
        return "none ✗"
    likely = f", likely {reading['low']}–{reading['high']}" if reading["low"] is not None else ""
    return f"{reading['rank']}{likely} {_mark(in_target(reading['rank'], k_star, kind))}"


def _cut(loss: Optional[float], full: float) -> str:
    return "–" if loss is None else f"{_e(loss)} ({loss / full - 1:+.0%})"
