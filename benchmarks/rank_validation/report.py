"""The report: the truth of each case, the per-case table of docs/rank.md, the hit rates, the rule's check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from .cases import EVAL_FRACTIONS, Settings
from .evidence import (
    agreement,
    by_layer,
    candidate_tables,
    every_r,
    package_cost,
    probe_curves,
    tolerance_sweep,
    truth_tables,
)
from .figure import draw_figure
from .scoring import (
    _cut,
    _e,
    _mark,
    _suggestion,
    big_runs,
    in_target,
    kind_of,
    model_value,
    shared_reading,
    table,
    truth_note,
    truth_of,
)


def per_case_table(results: dict, truths: dict, settings: Settings) -> None:
    """docs/rank.md's table: per case the truth and the package's suggestion from one r = 64 run
    (seed 0; its reference run: seed 1) at 25 % and 100 % of training, and what cutting the
    trained adapter to it costs."""
    print(
        "\n## lora_monitor's suggestion vs the truth (one r = 64 run, seed 0; the reference run: the "
        "other seed at the same point of training)\n"
    )
    rows = []
    for cname, case in results["cases"].items():
        named = dict(big_runs(case, settings))
        run = named.get(f"r{settings.big_rank}_s0")
        if run is None:
            continue
        kind, truth = kind_of(cname), truths[cname]
        k_star = truth["k_star"]
        at = {f: run["package"][f] for f in ("0.25", "1.0")}
        target = f"{k_star / 2:g}–{2 * k_star}" if kind == "example" else f"{k_star}–{2 * k_star}"
        beside = " / ".join(_suggestion(at[f]["reference"], k_star, kind) if "reference" in at[f] else "–" for f in at)
        phi = []
        for f in at:
            top, med = shared_reading(at[f], "max"), shared_reading(at[f], "median")
            phi.append("–" if top is None else f"{top} (median {med:g}) {_mark(in_target(top, k_star, kind))}")
        curve = {int(k): x for k, x in run["truncation"].items()}
        cut = {int(k): x for k, x in run["cut"].items()}
        full = curve[run["rank"]]
        rows.append(
            [
                cname,
                f"{k_star} ({truth_note(cname, settings, truth)})",
                target,
                _suggestion(at["0.25"], k_star, kind),
                _suggestion(at["1.0"], k_star, kind),
                beside,
                " / ".join(phi),
                " / ".join(_cut(cut.get(at[f]["rank"]), full) for f in at),
                _e(full),
                _cut(curve[k_star], full),
            ]
        )
    headers = [
        "case",
        "k* (how it is known)",
        "target",
        "suggestion at 25 % of training",
        "at 100 %",
        "with a reference run (25 % / 100 %)",
        "φ: directions shared with the other seed (25 % / 100 %)",
        "held-out loss, r = 64 adapter cut to the suggestion (25 % / 100 %)",
        "full r = 64 update",
        "cut to k*",
    ]
    print(table(headers, rows))
    print(
        "\nk*: the knee (smallest k within 5 % of the log-loss reduction) of the held-out loss of the "
        "trained r = 64 adapters with every ΔW cut to its top k directions, averaged over seeds. "
        "Target (✓): planted [k*, 2k*], the example [k*/2, 2k*]. The suggestion (`recommend_rank`) is "
        "max(probe, spectral gaps): the smallest k keeping 95 % of the log-loss reduction of a training "
        "batch with every ΔW cut jointly; the largest over modules of the largest k ≤ r/2 with "
        "σ_k/σ_k+1 ≥ 1.5 and σ_k² ≥ 1 % of ‖ΔW‖_F². 'likely' is its range (the probe keeping 90 % "
        "to 98 % of the log-loss reduction, and the gaps). φ (the paper's reading, shown beside by "
        "the package, not used): per module the directions shared clearly above chance with the "
        "other seed's adapter (A's row spaces), the largest over modules (the median in brackets); "
        "✓ judged on the largest. Held-out loss cut: the trained adapter saved by peft, cut by "
        "`lora_monitor.adapters.truncation.truncate_adapter`, loaded back; in brackets vs the full "
        "r = 64 update."
    )


#: The rows of the hit-rate table: label → the reading of one r = 64 run at one fraction.
HIT_ROWS: dict[str, Callable[[dict, str], Optional[float]]] = {
    "lora_monitor's suggestion: max(probe, spectral gaps)": lambda run, f: run["package"][f]["rank"],
    "the same beside a reference run": lambda run, f: run["package"][f].get("reference", {}).get("rank"),
    "probe alone (95 % of the log-loss reduction)": lambda run, f: run["package"][f]["probe"]["rank"],
    "spectral gaps alone (σ_k/σ_k+1 ≥ 1.5, σ_k² ≥ 1 % of ‖ΔW‖_F²)": lambda run, f: run["package"][f]["spectral"],
    "as chosen: max(probe_log, gap15), no 1 % floor": lambda run, f: max(
        run["estimates"][f]["probe"]["probe_log"], model_value(run["estimates"][f], "gap15")
    ),
    "energy90 (90 % of ‖ΔW‖_F², the former rule)": lambda run, f: model_value(run["estimates"][f], "energy90"),
    "ref_A (the paper's overlap rank vs the other seed)": lambda run, f: model_value(run["estimates"][f], "ref_A"),
    "φ: shared directions vs the other seed, largest": lambda run, f: shared_reading(run["package"][f], "max"),
    "φ: shared directions vs the other seed, median": lambda run, f: shared_reading(run["package"][f], "median"),
}


def hit_rates(results: dict, truths: dict, settings: Settings) -> None:
    """How often the package's suggestion, and its runners-up, are within the target."""
    fr = [str(f) for f in EVAL_FRACTIONS]
    runs = [(cname, run) for cname, case in results["cases"].items() for _, run in big_runs(case, settings)]
    print(
        f"\n## How often the suggestion is within the target, over the {len(runs)} r = {settings.big_rank} runs "
        f"(planted [k*, 2k*], example [k*/2, 2k*])\n"
    )
    rows = []
    for label, read in HIT_ROWS.items():
        cells = []
        for f in fr:
            hits = [in_target(read(run, f), truths[c]["k_star"], kind_of(c)) for c, run in runs]
            cells.append(f"{sum(hits)}/{len(hits)}")
        rows.append([label, *cells])
    covered, weak = [], []
    for f in fr:
        readings = [(run["package"][f], truths[c]["k_star"], kind_of(c)) for c, run in runs]
        inside = [p["low"] is not None and p["low"] <= k <= p["high"] for p, k, _ in readings]
        covered.append(f"{sum(inside)}/{len(inside)}")
        misses = [p for p, k, kind in readings if not in_target(p["rank"], k, kind)]
        flagged = sum(bool(p["cautions"]) for p, _, _ in readings)
        weak.append(f"{flagged} ({sum(bool(p['cautions']) for p in misses)} of {len(misses)})")
    rows.append(["k* inside the suggestion's likely range", *covered])
    rows.append(["suggestion flagged weak (of those outside the target)", *weak])
    print(table(["reading", *[f"{float(f):.0%}" for f in fr]], rows))


def check_rule(results: dict, truths: dict) -> bool:
    """The package's suggestion must be the candidates' max(probe_log, gap15f) — the rule chosen
    from them, max(probe_log, gap15), with the package's 1 % energy floor on the gaps — on every
    run at every evaluated point (0 where neither reads a rank), each part alike, and the same
    beside a reference run (φ is not used). Prints the mismatches, and where the floor moved the
    suggestion from the rule as chosen; True when there are no mismatches."""
    mismatches, moved, n = [], [], 0
    for cname, case in results["cases"].items():
        kind, k_star = kind_of(cname), truths[cname]["k_star"]
        for rname, run in sorted(case["runs"].items()):
            for f, est in run["estimates"].items():
                package = run["package"][f]
                probe, gaps = est["probe"]["probe_log"], est["model"]["gap15f"]["max"]
                beside = package.get("reference", {}).get("rank", package["rank"])
                readings = (package["rank"] or 0, package["probe"]["rank"] or 0, package["spectral"] or 0)
                where = f"- {cname} {rname} at {float(f):.0%}: "
                n += 1
                if readings != (max(probe, gaps), probe, gaps) or beside != package["rank"]:
                    mismatches.append(
                        where + f"package {package['rank']} (probe {package['probe']['rank']}, gaps "
                        f"{package['spectral']}; beside the reference {beside}), candidates probe_log {probe}, "
                        f"gap15f {gaps}"
                    )
                chosen = max(probe, est["model"]["gap15"]["max"])
                if chosen != readings[0]:
                    verdicts = [_mark(in_target(x, k_star, kind)) for x in (chosen, readings[0])]
                    moved.append(
                        where + f"{chosen} → {readings[0]} (gap15 {est['model']['gap15']['max']} → gap15f {gaps}; "
                        f"k* = {k_star}: {verdicts[0]} → {verdicts[1]})"
                    )
    print("\n## Check: the package's suggestion is the candidates' max(probe_log, gap15f)\n")
    if mismatches:
        print(f"MISMATCH on {len(mismatches)} of {n} readings:")
        print("\n".join(mismatches))
    else:
        print(
            f"The package's suggestion, its probe and its gaps equal max(probe_log, gap15f), probe_log and "
            f"gap15f on all {n} readings (every run, every r, at {', '.join(f'{f:.0%}' for f in EVAL_FRACTIONS)}), "
            f"with and without a reference run."
        )
    print(
        f"\nThe 1 % energy floor on the gaps moved the suggestion from the rule as chosen, max(probe_log, "
        f"gap15), on {len(moved)} of {n} readings" + (":" if moved else ".")
    )
    if moved:
        print("\n".join(moved))
    return not mismatches


def check_cuts(results: dict, settings: Settings) -> None:
    """``truncate_adapter``'s cut adapters against the benchmark's own truncation curve (the same
    best rank-k update, merged differently), where the suggestion is on the curve's grid."""
    worst, n = 0.0, 0
    for case in results["cases"].values():
        for _, run in big_runs(case, settings):
            curve = run["truncation"]
            for k, loss in run["cut"].items():
                if k in curve:
                    worst, n = max(worst, abs(loss / curve[k] - 1)), n + 1
    print(
        f"\ntruncate_adapter vs the truncation curves: {n} cut adapters, largest relative difference "
        f"of held-out loss {worst:.1e}"
    )


def report(
    results: dict, settings: Settings, figure: Optional[str] = None, how: str = "max", truth: str = "trunc"
) -> bool:
    """Print the tables: the package's suggestion vs the truth (docs/rank.md's table) and its hit
    rates, the check that it is the chosen rule; then the evidence the rule was chosen by — the
    truths, loss-vs-r and truncation curves, every candidate at 10/25/50/100 % of training from
    each r = 64 run, their hit rates, the readings on runs of every r. ``how``: the aggregation of
    the candidates' per-module readings (max, second, median). Returns whether the check passed."""
    truths = {}
    for cname, case in results["cases"].items():
        t = truth_of(case, kind_of(cname))
        t["k_star"] = t.get(truth, t["k_star"])
        truths[cname] = t
    per_case_table(results, truths, settings)
    hit_rates(results, truths, settings)
    ok = check_rule(results, truths)
    check_cuts(results, settings)
    package_cost(results, settings)
    print("\n# The evidence the rule was chosen by\n")
    truth_tables(results, truths, settings, how, truth)
    candidate_tables(results, truths, settings, how)
    every_r(results, truths, how)
    probe_curves(results, settings)
    by_layer(results, settings)
    tolerance_sweep(results, truths, settings, how)
    agreement(results, truths, settings, how)
    if figure:
        draw_figure(results, truths, settings, figure)
    return ok
