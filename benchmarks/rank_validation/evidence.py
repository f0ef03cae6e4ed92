"""The evidence the rule was chosen by: every candidate side by side, per case, per r, per layer, and the probe's tolerance."""

from __future__ import annotations

from .cases import EVAL_FRACTIONS, Settings, module_keys
from .scoring import (
    CANDIDATES,
    PER_MODULE,
    REFERENCE_CANDIDATES,
    TRUTHS,
    _e,
    _fmt,
    big_runs,
    in_target,
    kind_of,
    model_value,
    table,
)


def package_cost(results: dict, settings: Settings) -> None:
    print(
        "\n## The probe's cost (forward passes of the probe batch per reading, the package's probe), "
        f"r = {settings.big_rank} runs\n"
    )
    fr = [str(f) for f in EVAL_FRACTIONS]
    rows = []
    for cname, case in results["cases"].items():
        for rname, run in big_runs(case, settings):
            readings = [run["package"][f] for f in fr]
            passes = [len(p["probe"]["losses"]) for p in readings]
            per_pass = sum(p["probe_seconds"] for p in readings) / sum(passes)
            step = run["train_seconds"] / run["steps"]
            rows.append([cname, rname, *passes, f"{per_pass:.2f} / {step:.2f}"])
    headers = ["case", "run", *[f"{float(f):.0%}" for f in fr], "s per probe pass / s per training step"]
    print(table(headers, rows))


def truth_tables(results: dict, truths: dict, settings: Settings, how: str, truth: str) -> None:
    big = f"r{settings.big_rank}_"
    print(f"\n## Truth per case (k* = {TRUTHS[truth]}; candidates' modules aggregated by {how})\n")
    rows = []
    for cname, t in truths.items():
        per_run = ", ".join(f"{n.split('_')[1]}: {x['knee']}" for n, x in t["trunc_runs"].items() if n.startswith(big))
        rows.append(
            [
                cname,
                t["k_star"],
                t.get("trunc", "–"),
                t.get("trunc_linear", "–"),
                per_run,
                t["loss_vs_r"],
                t["loss_vs_r_linear"],
                ", ".join(str(r) for r in t["loss_vs_r_curve"]),
            ]
        )
    print(
        table(
            [
                "case",
                "k*",
                "trunc knee (log)",
                "trunc knee (linear)",
                "trunc knee per run",
                "loss-vs-r knee (log)",
                "loss-vs-r knee (linear)",
                "r trained",
            ],
            rows,
        )
    )
    if "example" in truths:
        print(
            "\nexample, accuracy instead of loss: truncation knee (smallest k within 0.035 of the full "
            "update's accuracy): " + ", ".join(f"{n}: {k}" for n, k in truths["example"]["acc_knee"].items())
        )
    print("\n## Held-out loss vs trained r (planted: seed 0; example: mean over seeds, with val accuracy)\n")
    for cname, t in truths.items():
        cells = ", ".join(f"{r}: {_e(x)}" for r, x in t["loss_vs_r_curve"].items())
        line = f"- {cname}: base (r=0) {_e(t['base'])}; {cells}"
        if "acc_vs_r" in t:
            line += "; acc " + ", ".join(f"{r}: {x:.3f}" for r, x in t["acc_vs_r"].items())
        print(line)
    print("\n## Truncation curves of the trained r = 64 runs (held-out loss with every ΔW cut to its top k)\n")
    for cname, t in truths.items():
        for n, x in t["trunc_runs"].items():
            print(f"- {cname} {n}: " + ", ".join(f"{k}: {_e(v)}" for k, v in x["curve"].items()))
        if "trunc_curve" in t and len(t["trunc_runs"]) > 1:
            print(f"- {cname} mean: " + ", ".join(f"{k}: {_e(v)}" for k, v in t["trunc_curve"].items()))


def candidate_tables(results: dict, truths: dict, settings: Settings, how: str) -> None:
    """Every candidate from each r = 64 run at the four points, and how often each is right."""
    fr = [str(f) for f in EVAL_FRACTIONS]
    names = CANDIDATES + REFERENCE_CANDIDATES
    hits: dict[str, dict[str, list[bool]]] = {n: {f: [] for f in fr} for n in names}
    print(
        f"\n## Candidates from one r = 64 run at {', '.join(f'{float(f):.0%}' for f in fr)} of training "
        f"(cell: the four readings; * = all within the target)\n"
    )
    rows = []
    for cname, case in results["cases"].items():
        kind, k_star = kind_of(cname), truths[cname]["k_star"]
        for rname, run in big_runs(case, settings):
            est = run["estimates"]
            row = [cname, rname.split("_")[1], k_star]
            for n in names:
                vals = [model_value(est[f], n, how) for f in fr]
                if all(v is None for v in vals):
                    row.append("")
                    continue
                for f, v in zip(fr, vals):
                    hits[n][f].append(in_target(v, k_star, kind))
                ok = all(in_target(v, k_star, kind) for v in vals)
                row.append("/".join(_fmt(v) for v in vals) + ("*" if ok else ""))
            rows.append(row)
    print(table(["case", "seed", "k*", *names], rows))
    print(
        "\n## How often each candidate is within the target (planted [k*, 2k*], example [k*/2, 2k*]), "
        "over r = 64 runs\n"
    )
    rows = [[n, *(f"{sum(h)}/{len(h)}" for h in hits[n].values())] for n in names]
    print(table(["candidate", *[f"{float(f):.0%}" for f in fr]], rows))


def every_r(results: dict, truths: dict, how: str) -> None:
    print("\n## What the package and each candidate read on runs of every r (25 % / 100 % of training, seed 0)\n")
    rows = []
    for cname, case in results["cases"].items():
        for run in sorted(case["runs"].values(), key=lambda v: (v["seed"], v["rank"])):
            if run["seed"] != 0:
                continue
            est, package = run["estimates"], run["package"]
            at = ("0.25", "1.0")
            rows.append(
                [
                    cname,
                    run["rank"],
                    truths[cname]["k_star"],
                    "/".join(_fmt(package[f]["rank"]) for f in at),
                    "/".join("yes" if package[f]["too_small"] else "no" for f in at),
                    *("/".join(_fmt(model_value(est[f], n, how)) for f in at) for n in CANDIDATES),
                ]
            )
    print(table(["case", "r", "k*", "package", "'r may be too small'", *CANDIDATES], rows))


def probe_curves(results: dict, settings: Settings) -> None:
    print(
        "\n## Probe curves at 25 % of training (loss on the probe batch with every ΔW cut to its top k), "
        "r = 64 seed 0\n"
    )
    for cname, case in results["cases"].items():
        run = case["runs"].get(f"r{settings.big_rank}_s0")
        if run is not None:
            curve = run["estimates"]["0.25"]["probe_curve"]
            print(f"- {cname}: " + ", ".join(f"{k}: {_e(v)}" for k, v in curve.items()))


def by_layer(results: dict, settings: Settings) -> None:
    run = results["cases"].get("K_by_layer", {}).get("runs", {}).get(f"r{settings.big_rank}_s0")
    case = next((c for c in settings.planted_cases if c.name == "K_by_layer"), None)
    if run is None or case is None:
        return
    print("\n## K_by_layer: per module (planted K by layer), r = 64 seed 0 at 25 % / 100 %\n")
    rows = []
    for m, key in enumerate(module_keys()):
        rows.append(
            [
                f"{key[0]}.{key[1]}",
                case.ranks_by_layer[key[0]],
                *(
                    f"{run['estimates']['0.25']['per_module'][n][m]}/{run['estimates']['1.0']['per_module'][n][m]}"
                    for n in PER_MODULE
                ),
            ]
        )
    print(table(["module", "K", *PER_MODULE], rows))


def probe_k(curve: dict, r: int, tolerance: float, log: bool) -> int:
    """The functional probe's rule on a stored probe curve (k → loss on the probe batch):
    the smallest k with ``loss(k)`` within ``tolerance`` of the reduction of the full update
    (in log loss with ``log``); 0 when the update does not reduce the probe loss."""
    curve = {int(k): v for k, v in curve.items()}
    l0, full = curve[0], curve[r]
    if l0 <= full or full <= 0:
        return 0
    bar = full * (l0 / full) ** tolerance if log else full + tolerance * (l0 - full)
    return min(k for k, v in sorted(curve.items()) if k > 0 and v <= bar)


def tolerance_sweep(results: dict, truths: dict, settings: Settings, how: str = "max") -> None:
    """How the probe's hit rate moves with its one threshold (from the stored probe curves)."""
    rules = [(f"log {t:g}", t, True) for t in (0.02, 0.05, 0.1, 0.2)]
    rules += [(f"linear {t:g}", t, False) for t in (0.02, 0.05, 0.1)]
    fr = [str(f) for f in EVAL_FRACTIONS]
    rows = []
    for label, tol, log in rules:
        hits: dict[str, list[bool]] = {f: [] for f in fr}
        combo: dict[str, list[bool]] = {f: [] for f in fr}
        for cname, case in results["cases"].items():
            kind, k_star = kind_of(cname), truths[cname]["k_star"]
            for _, run in big_runs(case, settings):
                for f in fr:
                    k = probe_k(run["estimates"][f]["probe_curve"], run["rank"], tol, log)
                    g = model_value(run["estimates"][f], "gap15", how) or 0
                    hits[f].append(in_target(k, k_star, kind))
                    combo[f].append(in_target(max(k, g), k_star, kind))
        rows.append(
            [label, *(f"{sum(h)}/{len(h)}" for h in hits.values()), *(f"{sum(h)}/{len(h)}" for h in combo.values())]
        )
    print(
        "\n## Functional probe: hit rate vs its tolerance (share of the reduction loss(0) − loss(full) "
        "it may give up; 'log': measured in log loss), alone and as max(probe, gap15), r = 64 runs\n"
    )
    headers = ["tolerance", *[f"probe {float(f):.0%}" for f in fr], *[f"max(probe, gap15) {float(f):.0%}" for f in fr]]
    print(table(headers, rows))


def agreement(results: dict, truths: dict, settings: Settings, how: str) -> None:
    """Strength of evidence: is the probe more often right when the free spectral reading
    (gap15) agrees with it within a factor 2? And the combination max(probe_log, gap15)."""
    fr = [str(f) for f in EVAL_FRACTIONS]
    agree = {f: [0, 0] for f in fr}
    disagree = {f: [0, 0] for f in fr}
    combo = {f: [0, 0] for f in fr}
    for cname, case in results["cases"].items():
        kind, k_star = kind_of(cname), truths[cname]["k_star"]
        for _, run in big_runs(case, settings):
            for f in fr:
                p = model_value(run["estimates"][f], "probe_log", how)
                g = model_value(run["estimates"][f], "gap15", how)
                ok = in_target(p, k_star, kind)
                same = bool(p and g and max(p, g) <= 2 * min(p, g))
                bucket = agree if same else disagree
                bucket[f][0] += ok
                bucket[f][1] += 1
                combo[f][0] += in_target(max(p or 0, g or 0), k_star, kind)
                combo[f][1] += 1
    print(
        "\n## Strength of evidence: probe_log within target when gap15 agrees (within 2×) / disagrees; "
        "and max(probe_log, gap15)\n"
    )
    rows = [
        [
            f"{float(f):.0%}",
            f"{agree[f][0]}/{agree[f][1]}",
            f"{disagree[f][0]}/{disagree[f][1]}",
            f"{combo[f][0]}/{combo[f][1]}",
        ]
        for f in fr
    ]
    print(table(["fraction", "agree: probe right", "disagree: probe right", "max(probe_log, gap15) right"], rows))
