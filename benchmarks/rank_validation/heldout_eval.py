"""The held-out cases' readings and report: the package's rule as it is, read on every saved
snapshot of every held-out run, against the truth of its r = 64 run.

Readings (cached per run in ``CACHE/heldout/estimates``, keyed by a hash of the package's
``adapters``, ``analysis`` and ``functional`` code and of this module): at each of
:data:`~rank_validation.heldout.HELDOUT_FRACTIONS`, :func:`lora_monitor.analysis.analyze`,
:func:`~lora_monitor.analysis.probe.read_probe` (a fixed training batch of 16, every LoRA module
cut jointly) and :func:`~lora_monitor.analysis.rank.recommend_rank`, as the tuning cases are read;
where the adapter has attention and MLP modules, also per group: the probe cutting that group
only (the other whole) and ``recommend_rank`` on that group's modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from lora_monitor.adapters import LoRAFactors
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis import probe as package_probe
from lora_monitor.analysis import rank as package_rank

from . import ROOT
from .cases import Settings
from .evaluation import knee
from .heldout import HELDOUT_CASES, HELDOUT_FRACTIONS, MODULE_PATHS, HeldoutCase
from .heldout_training import (
    Key,
    Plain,
    cut,
    group_of,
    parse_key,
    run_file,
    teacher_file,
    thin_svd,
)
from .scoring import table

#: Whether the package gives a per-kind answer (issue 22, item 2: ``ProbeReading.groups``).
PER_KIND = "groups" in {f.name for f in dataclasses.fields(package_probe.ProbeReading)}

#: The probe batch: the first training sequences, as many as the tuning cases' probe.
PROBE_BATCH = 16


def _factors(case: HeldoutCase, run: dict, i: int, W0: dict[Key, torch.Tensor]) -> dict[Key, LoRAFactors]:
    out = {}
    for name, (B, A) in run["factors"][i].items():
        key = parse_key(name)
        out[key] = LoRAFactors(
            module_name=f"layers.{key[0]}.{MODULE_PATHS[case.model][key[1]]}",
            layer=key[0],
            projection=key[1],
            lora_A=A,
            lora_B=B,
            scaling=run["scaling"],
            base_weight=W0[key],
        )
    return out


def _probe(plain: Plain, svds: dict, batch: tuple, cut_keys: set) -> Callable[[int], float]:
    """k ↦ the probe batch's loss with the modules of ``cut_keys`` cut to k directions (the
    others whole); each k computed once."""
    seen: dict[int, float] = {}
    whole = cut(svds, None)

    def loss_at(k: int) -> float:
        if k not in seen:
            part = {key: d for key, d in whole.items() if key not in cut_keys}
            if k:
                part |= cut({key: v for key, v in svds.items() if key in cut_keys}, k)
            plain.set(part)
            seen[k] = plain.loss(*batch)
        return seen[k]

    return loss_at


def _reading(rec: Any, reading: Any) -> dict:
    return {
        "rank": rec.rank,
        "low": rec.low,
        "high": rec.high,
        "spectral": rec.spectral,
        "projections": rec.projections,
        "probe": reading.rank,
        "probe_losses": reading.losses,
        "too_small": rec.too_small,
        "cautions": rec.cautions,
    }


def tail_losses(plain: Plain, svds: dict, batches: list[tuple], r: int) -> list[dict[int, float]]:
    """Not the package's rule, a diagnostic for "r may be too small": on the probe batch and on a
    second training batch, the loss with no update, with every ΔW cut to ⌈r/2⌉ and whole. Where
    r is too small the top half of the directions lowers the loss on both batches; where r ≥ 2k*
    it is noise, and its effect differs from batch to batch."""
    out = []
    for batch in batches:
        loss_at = _probe(plain, svds, batch, set(svds))
        out.append({k: loss_at(k) for k in sorted({0, (r + 1) // 2, r})})
    return out


def read_run(case: HeldoutCase, run: dict, plain: Plain, batches: list[tuple]) -> dict:
    """The package's suggestion (and per group, where there are two) at every saved snapshot."""
    out: dict[str, Any] = {}
    groups = sorted({group_of(k) for k in case.lora})
    for i, step in enumerate(run["snapshot_steps"]):
        f = HELDOUT_FRACTIONS[i]
        factors = _factors(case, run, i, plain.W0)
        svds = {key: thin_svd(fa.lora_B, fa.lora_A, fa.scaling) for key, fa in factors.items()}
        analyses = analyze(Snapshot(step=step, factors=factors))
        batch = batches[0]
        reading = package_probe.read_probe(_probe(plain, svds, batch, set(svds)), run["rank"])
        parts = {}
        if len(groups) > 1:
            for g in groups:
                keys = {k for k in svds if group_of(k[1]) == g}
                parts[g] = package_probe.read_probe(_probe(plain, svds, batch, keys), run["rank"])
        if parts and PER_KIND:
            # the package's own per-kind answer (lora_monitor.adapters.kinds): each group's
            # probe, the other whole, carried by the reading as the monitor's probe carries it
            reading = dataclasses.replace(reading, groups=parts)
        rec = package_rank.recommend_rank(analyses, probe=reading)
        entry: dict[str, Any] = {"step": step, "all": _reading(rec, reading)}
        if PER_KIND and getattr(rec, "kinds", None):
            entry["per_kind"] = rec.per_kind
            for g, answer in rec.kinds.items():
                part = parts[g]
                entry[g] = {
                    "rank": answer.rank,
                    "low": part.low,
                    "high": None if part.high is None else max(part.high, answer.spectral or 0),
                    "spectral": answer.spectral,
                    "probe": part.rank,
                    "probe_losses": part.losses,
                    "too_small": answer.too_small,
                    "package": True,
                }
        else:
            for g, part in parts.items():
                keys = {k for k in svds if group_of(k[1]) == g}
                rec = package_rank.recommend_rank({k: a for k, a in analyses.items() if k in keys}, probe=part)
                entry[g] = _reading(rec, part) | {"package": False}
        entry["tail"] = tail_losses(plain, svds, batches, run["rank"])
        out[str(f)] = entry
    return out


def cut_loss(case: HeldoutCase, run: dict, plain: Plain, held: tuple, k: Optional[int]) -> Optional[float]:
    """Held-out loss of the run's final update with every ΔW cut to k (k from a suggestion)."""
    if not k:
        return None
    svds = {parse_key(n): thin_svd(B, A, run["scaling"]) for n, (B, A) in run["factors"][-1].items()}
    plain.set(cut(svds, k))
    return plain.loss(*held)


def version() -> str:
    package = ROOT / "lora_monitor"
    files = sorted(p for sub in ("adapters", "analysis", "functional") for p in (package / sub).rglob("*.py"))
    text = "".join(p.read_text() for p in files) + repr(HELDOUT_FRACTIONS)
    text += "".join(inspect.getsource(fn) for fn in (read_run, _probe, _reading, _factors, cut_loss, tail_losses))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def evaluate_heldout(
    cache: pathlib.Path, settings: Settings, only: Optional[list[str]] = None, reevaluate: bool = False
) -> dict:
    torch.set_num_threads(1)
    v = version()
    results: dict[str, Any] = {"version": v, "cases": {}}
    for case in HELDOUT_CASES:
        if only and case.name not in only:
            continue
        present = [r for r in case.ranks if run_file(cache, case, r).exists()]
        if not present:
            continue
        teacher = None
        plain = None
        entry: dict[str, Any] = {}
        for r in sorted(present, reverse=True):
            stored = cache / "heldout" / "estimates" / case.name / f"r{r}.json"
            if stored.exists() and not reevaluate:
                summary = json.loads(stored.read_text())
                if summary.get("version") == v:
                    entry[f"r{r}"] = summary
                    continue
            t0 = time.perf_counter()
            run = torch.load(run_file(cache, case, r))
            if teacher is None or plain is None:
                teacher = torch.load(teacher_file(cache, case))
                plain = Plain(case, [parse_key(n) for n in run["factors"][0]])
            train, held = teacher["train"], teacher["heldout"]
            n = PROBE_BATCH
            batches = [tuple(train[x][i * n : (i + 1) * n] for x in ("ids", "mask", "target")) for i in (0, 1)]
            heldset = (held["ids"], held["mask"], held["target"])
            summary = {k: run[k] for k in ("rank", "steps", "train_seconds", "heldout_loss", "base_heldout_loss")}
            summary |= {"version": v, "truncation": run["truncation"], "snapshot_steps": run["snapshot_steps"]}
            summary["train_loss_first_last"] = (run["train_loss"][0], run["train_loss"][-1])
            summary["readings"] = read_run(case, run, plain, batches)
            if r == settings.big_rank:
                ks = {summary["readings"][f]["all"]["rank"] for f in ("0.25", "1.0")}
                summary["cut"] = {k: cut_loss(case, run, plain, heldset, k) for k in ks if k}
            summary = json.loads(json.dumps(summary, default=lambda o: o.tolist()))
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(summary))
            entry[f"r{r}"] = summary
            print(f"evaluated {case.name} r={r} in {time.perf_counter() - t0:.0f} s", flush=True)
        results["cases"][case.name] = entry
    path = cache / "heldout" / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return results


def _curve(c: dict) -> dict[int, float]:
    return {int(k): float(x) for k, x in c.items()}


def truths(case: HeldoutCase, runs: dict, big: int) -> Optional[dict[str, int]]:
    """k* of the case (knee of the r = big run's truncation curve), and per group where there are two."""
    run = runs.get(f"r{big}")
    if run is None:
        return None
    return {g: knee(_curve(c), _curve(c)[0]) for g, c in run["truncation"].items()}


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _cell(reading: dict, k_star: int) -> str:
    rank = reading["rank"]
    if rank is None:
        return "none ✗"
    likely = f", likely {reading['low']}–{reading['high']}" if reading["low"] is not None else ""
    return f"{rank}{likely} {_mark(k_star <= rank <= 2 * k_star)}"


#: The fractions of training read, as the results' keys spell them ("0.1" … "1.0").
READ_AT = tuple(str(f) for f in HELDOUT_FRACTIONS)


def _fires(run: dict, f: str, group: str = "all", former: bool = False) -> bool:
    """Whether "r may be too small" is said at fraction ``f``: the package's rule (the probe needs
    more than r/2 directions) or its former rule (the probe needs all r of them)."""
    reading = run["readings"][f][group]
    if not former:
        return bool(reading["too_small"])
    return reading["probe"] is not None and reading["probe"] >= run["rank"]


def _small(run: dict, group: str = "all", former: bool = False) -> str:
    fired = [f for f in READ_AT if _fires(run, f, group, former)]
    return "at " + ", ".join(f"{float(f):.0%}" for f in fired) if fired else "never"


def tail_table(results: dict, big: int) -> None:
    """The diagnostic of :func:`tail_losses`: per run, at 25, 50 and 100 % of training, what the top
    half of the directions does to the log loss of the probe batch (A) and of a second batch (B):
    gain_X = log loss_X(⌈r/2⌉) − log loss_X(r), and its share of the update's log-loss reduction."""
    rows = []
    for case in HELDOUT_CASES:
        runs = results.get(case.name) or {}
        k = truths(case, runs, big)
        for run in sorted(runs.values(), key=lambda v: -v["rank"]):
            cells = []
            for f in ("0.25", "0.5", "1.0"):
                tail = [{int(x): y for x, y in t.items()} for t in run["readings"][f]["tail"]]
                r, h = run["rank"], (run["rank"] + 1) // 2
                gains = [math.log(t[h] / t[r]) for t in tail]
                shares = [g / math.log(t[0] / t[r]) for g, t in zip(gains, tail)]
                cells.append(" / ".join(f"{g:+.3f} ({s:+.0%})" for g, s in zip(gains, shares)))
            rows.append([case.name, run["rank"], "–" if k is None else k["all"], *cells])
    print("\n## Diagnostic (not the rule): the top half of the directions, probe batch A / second batch B\n")
    headers = ["case", "r", "k*", "gain A / B at 25 % (share)", "at 50 %", "at 100 %"]
    print(table(headers, rows))


def _split(entry: dict) -> str:
    if "per_kind" not in entry:
        return "–"
    split = entry["per_kind"]
    return "one rank" if split is None else ", ".join(f"{g} {r}" for g, r in split.items())


#: The held-out sets, by ``HeldoutCase.batch``.
SET_NAMES = {
    1: "set 1 (read before and after the changes of 7 December 2026)",
    2: "set 2 (fixed after those changes: blind to them)",
}


@dataclasses.dataclass
class _Tally:
    """One held-out set's hits (per fraction) and "too small" checks."""

    hits: dict[str, list[bool]] = dataclasses.field(default_factory=lambda: {f: [] for f in READ_AT})
    below: list[bool] = dataclasses.field(default_factory=list)
    above: list[bool] = dataclasses.field(default_factory=list)
    below_former: list[bool] = dataclasses.field(default_factory=list)
    above_former: list[bool] = dataclasses.field(default_factory=list)

    def met(self) -> bool:
        """The issue's targets: 90 % within [k*, 2k*] at 25 % and at 100 %; "too small" on every run
        below k* by half of training and on none at r ≥ 2k*."""
        enough = all(sum(self.hits[f]) >= 0.9 * len(self.hits[f]) for f in ("0.25", "1.0"))
        return enough and all(self.below) and all(self.above)


def _count(checks: list[bool]) -> str:
    return f"{sum(checks)}/{len(checks)}"


def report_heldout(cache: pathlib.Path, settings: Settings) -> bool:
    """Print the held-out table, the hit rates and the "too small" check; True when every target held."""
    path = cache / "heldout" / "results.json"
    results = json.loads(path.read_text())["cases"]
    big = settings.big_rank
    rows, small_rows = [], []
    sets = {case.batch: _Tally() for case in HELDOUT_CASES}
    per_kind_rows = []
    for case in HELDOUT_CASES:
        runs = results.get(case.name)
        k = truths(case, runs, big) if runs else None
        if not runs or k is None:
            continue
        k_star, run, tally = k["all"], runs[f"r{big}"], sets[case.batch]
        for f in READ_AT:
            rank = run["readings"][f]["all"]["rank"]
            tally.hits[f].append(rank is not None and k_star <= rank <= 2 * k_star)
        full = run["truncation"]["all"][str(big)]
        cut = run.get("cut", {})
        cuts = " / ".join(
            "–"
            if cut.get(str(run["readings"][f]["all"]["rank"])) is None
            else f"{cut[str(run['readings'][f]['all']['rank'])]:.2e}"
            for f in ("0.25", "1.0")
        )
        groups = " / ".join(f"{g} {x}" for g, x in k.items() if g != "all")
        rows.append(
            [
                case.batch,
                case.name,
                case.what,
                f"{k_star}" + (f" ({groups})" if groups else ""),
                f"{k_star}–{2 * k_star}",
                _cell(run["readings"]["0.25"]["all"], k_star),
                _cell(run["readings"]["1.0"]["all"], k_star),
                f"{cuts} / {full:.2e} / base {run['base_heldout_loss']:.2e}",
            ]
        )
        if big >= 2 * k_star:
            tally.above.append(not any(_fires(run, f) for f in READ_AT))
            tally.above_former.append(not any(_fires(run, f, former=True) for f in READ_AT))
        for other in runs.values():
            r = other["rank"]
            if r >= k_star and r < 2 * k_star and r != big:
                continue
            if r < k_star:
                by_half = ("0.1", "0.25", "0.5")
                tally.below.append(any(_fires(other, f) for f in by_half))
                tally.below_former.append(any(_fires(other, f, former=True) for f in by_half))
            small_rows.append(
                [
                    case.name,
                    f"r = {r}",
                    k_star,
                    "below k*" if r < k_star else ("≥ 2k*" if r >= 2 * k_star else "k*…2k*"),
                    _small(other),
                    _small(other, former=True),
                    " / ".join(str(other["readings"][f]["all"]["rank"]) for f in ("0.25", "0.5", "1.0")),
                ]
            )
        if len(k) > 2:
            for g in (g for g in k if g != "all"):
                per_kind_rows.append(
                    [
                        case.name,
                        g,
                        k[g],
                        _cell(run["readings"]["0.25"][g], k[g]),
                        _cell(run["readings"]["1.0"][g], k[g]),
                        _small(run, g),
                        " / ".join(_split(run["readings"][f]) for f in ("0.25", "1.0")),
                    ]
                )
    print("\n## Held-out cases: the suggestion from one r = 64 run vs the truth\n")
    headers = ["set", "case", "what it varies", "k* (per group)", "target", "at 25 %", "at 100 %"]
    headers.append("held-out loss: cut to the suggestion 25 % / 100 % / full r = 64 / base")
    print(table(headers, rows))
    print("\n## Held-out hit rates (within [k*, 2k*])\n")
    print(
        table(
            ["reading", *[f"{float(f):.0%}" for f in READ_AT]],
            [
                [f"suggestion, {SET_NAMES[batch]}", *[f"{sum(h)}/{len(h)}" for h in tally.hits.values()]]
                for batch, tally in sorted(sets.items())
            ],
        )
    )
    print('\n## "r may be too small"\n')
    print(
        table(
            [
                "case",
                "run",
                "k*",
                "r vs k*",
                "said",
                "the former rule (probe needs all r) said",
                "suggestion 25 % / 50 % / 100 %",
            ],
            small_rows,
        )
    )
    for batch, tally in sorted(sets.items()):
        print(
            f"\n{SET_NAMES[batch]}: runs below k* that said it by half of training: {_count(tally.below)}; "
            f"runs at r ≥ 2k* that never said it: {_count(tally.above)}. The former rule (the probe "
            f"needs all r): {_count(tally.below_former)} and {_count(tally.above_former)}"
        )
    if per_kind_rows:
        print("\n## Per group (attention / MLP), each cut with the other whole\n")
        headers = ["case", "group", "k* of the group", "at 25 %", "at 100 %", "too small said"]
        headers.append("the package's per-kind answer (25 % / 100 %)")
        print(table(headers, per_kind_rows))
    tail_table(results, big)
    return all(tally.met() for tally in sets.values())
