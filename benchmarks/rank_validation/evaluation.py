"""Evaluation: every reading (the package's suggestion, the candidates, the cuts) on every cached run, cached per run."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import rank_candidates as rc
import torch
from lora_monitor.adapters import LoRAFactors
from lora_monitor.adapters import truncation as package_truncation
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis import probe as package_probe
from lora_monitor.analysis import rank as package_rank

from . import BENCHMARKS, ROOT
from .cases import (
    EVAL_FRACTIONS,
    FRACTIONS,
    KNEE_TOLERANCE,
    TRUNC_K,
    D,
    Merged,
    Settings,
    example_data,
    example_eval,
    hidden_states,
    linear,
    load_base,
    masked_mse,
    module_keys,
    pooled_logits,
)
from .training import _lora, run_path, teacher_path


def load_run(cache: pathlib.Path, case: str, rank: int, seed: int) -> Optional[dict]:
    path = run_path(cache, case, rank, seed)
    return torch.load(path) if path.exists() else None


def snapshot_index(run: dict, fraction: float) -> int:
    """Index of the saved snapshot nearest to ``fraction`` of training."""
    steps = torch.tensor(run["snapshot_steps"], dtype=torch.float64)
    return int((steps - fraction * run["steps"]).abs().argmin())


def knee(points: dict[int, float], base: float, tolerance: float = KNEE_TOLERANCE) -> int:
    """The knee of a loss curve over ranks (trained r, or truncation k): the smallest x whose loss
    is within ``tolerance`` of the achievable reduction, measured in log loss:
    ``log loss(x) − log best ≤ tolerance · (log base − log best)``, best = min over x, base = the
    loss with no update (x = 0).

    On a log scale because the planted task is realizable (its loss falls towards 0: a direction
    that halves a small loss matters as much as one that halves a large one), and the same rule
    is kept for the example's cross-entropy, where a log scale and a linear one nearly agree
    (the loss moves by ±15 % only)."""
    best = min(points.values())
    lb, l0 = math.log(best), math.log(max(base, best))
    return min(x for x, loss in points.items() if math.log(loss) - lb <= tolerance * (l0 - lb))


def knee_linear(points: dict[int, float], base: float, tolerance: float = KNEE_TOLERANCE) -> int:
    """:func:`knee` on the loss itself: ``loss(x) ≤ best + tolerance · (base − best)``."""
    best = min(points.values())
    return min(x for x, loss in points.items() if loss <= best + tolerance * (base - best))


def probe_callable(run: dict, fraction_index: int, ctx: dict) -> Callable[[int], float]:
    """The functional probe's callable: k ↦ loss on one fixed training batch with every ΔW cut to
    its top k directions (jointly), at one snapshot; each k computed once. The monitor has
    exactly this: a training batch and the loss function."""
    B, A, s = run["B"][fraction_index], run["A"][fraction_index], run["scaling"]
    U, S, Vh = rc.svd(B, A, s)
    merged: Merged = ctx["merged"]
    seen: dict[int, float] = {}

    if run["kind"] == "planted":
        ids, mask, target = ctx["probe"][run["case"]]

        def loss_of_model() -> float:
            return float(masked_mse(merged.hidden(ids, mask), target, mask))
    else:
        ids, mask, y = ctx["probe"]["example"]
        head = torch.nn.Linear(D, 20)
        head.load_state_dict(run["heads"][fraction_index])

        @torch.no_grad()
        def loss_of_model() -> float:
            return float(torch.nn.functional.cross_entropy(pooled_logits(merged.model, head, ids, mask), y))

    def loss_at(k: int) -> float:
        if k not in seen:
            dw = (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
            merged.set({key: dw[i] for i, key in enumerate(module_keys())} if k else None)
            seen[k] = loss_of_model()
        return seen[k]

    return loss_at


def evaluation_context(cache: pathlib.Path, settings: Settings) -> dict:
    """The model the updates are merged into, and per case the probe batch (the first training
    batch) and the held-out data the truncated adapters are scored on."""
    ctx: dict[str, Any] = {"merged": Merged(), "probe": {}, "heldout": {}}
    n = settings.probe_batch
    for case in settings.planted_cases:
        path = teacher_path(cache, case.name)
        if path.exists():
            teacher = torch.load(path)
            train, held = teacher["train"], teacher["heldout"]
            ctx["probe"][case.name] = (train["ids"][:n], train["mask"][:n], train["target"][:n])
            ctx["heldout"][case.name] = (held["ids"], held["mask"], held["target"])
    train, val = example_data(settings)
    ctx["probe"]["example"] = (train.input_ids[:n], train.attention_mask[:n], train.labels[:n])
    ctx["heldout"]["example"] = val
    return ctx


def package_factors(run: dict, index: int, W0: dict) -> dict:
    """One snapshot's saved factors as the package reads them from the live model: a
    :class:`LoRAFactors` per (layer, canonical projection), with W₀."""
    B, A, s = run["B"][index], run["A"][index], run["scaling"]
    return {
        (layer, proj[0]): LoRAFactors(
            module_name=f"encoder.layer.{layer}.attention.self.{proj}",
            layer=layer,
            projection=proj[0],
            lora_A=A[m],
            lora_B=B[m],
            scaling=s,
            base_weight=W0[layer, proj],
        )
        for m, (layer, proj) in enumerate(module_keys())
    }


def package_suggestion(
    run: dict, ref: Optional[dict], fraction: float, ctx: dict
) -> tuple[dict, Callable[[int], float]]:
    """lora_monitor's suggestion at one point of training, as the monitor makes it: ``analyze``,
    ``read_probe`` (on a fresh probe callable: its forward passes and seconds are what a monitor
    pays) and ``recommend_rank``; and with the reference run's snapshot at the same point as
    ``analyze``'s reference (φ in basis A, shown beside, not used by the rule). Returns the
    reading and the probe callable (its losses cached, for the candidates)."""
    i = snapshot_index(run, fraction)
    W0 = ctx["merged"].W0
    current = Snapshot(step=run["snapshot_steps"][i], factors=package_factors(run, i, W0))
    probe = probe_callable(run, i, ctx)
    reading = package_probe.read_probe(probe, run["rank"])
    rec = package_rank.recommend_rank(analyze(current), probe=reading)
    out: dict[str, Any] = {
        "step": run["snapshot_steps"][i],
        "rank": rec.rank,
        "low": rec.low,
        "high": rec.high,
        "spectral": rec.spectral,
        "probe": {"rank": reading.rank, "low": reading.low, "high": reading.high, "losses": reading.losses},
        "probe_seconds": reading.seconds,
        "cautions": rec.cautions,
        "too_small": rec.too_small,
    }
    if ref is not None:
        reference = package_factors(ref, snapshot_index(ref, fraction), W0)
        beside = package_rank.recommend_rank(
            analyze(current, reference, "A"), probe=reading, reference_is_run=True, basis="A"
        )
        out["reference"] = {
            "rank": beside.rank,
            "low": beside.low,
            "high": beside.high,
            "shared": [m.shared_directions for m in beside.modules],
        }
    return out, probe


def candidates_at(run: dict, ref: Optional[dict], fraction: float, probe: Callable[[int], float]) -> dict:
    """Every candidate of ``rank_candidates`` at one point of training (per module and model
    level; t/2 is the earlier snapshot of those that look at time), and the whole probe curve."""
    s = run["scaling"]
    i, j = snapshot_index(run, fraction), snapshot_index(run, fraction / 2)
    B, A = run["B"][i], run["A"][i]
    per_module = rc.spectral_candidates(B, A, s, run["B"][j], run["A"][j])
    if ref is not None:
        ri = snapshot_index(ref, fraction)
        per_module |= rc.reference_candidates(B, A, ref["B"][ri], ref["A"][ri], s, ref["scaling"])
    probes = {
        name: rc.functional_probe(probe, run["rank"], keep=keep, grid=TRUNC_K, log=log, to_lowest=to_lowest)
        for name, keep, log, to_lowest in (
            ("probe90", 0.90, False, None),
            ("probe95", 0.95, False, None),
            ("probe_log", 0.95, True, 0.98),
        )
    }
    return {
        "per_module": {name: v.tolist() for name, v in per_module.items()},
        "model": {name: rc.aggregate(v) for name, v in per_module.items()},
        "probe": probes,
        # the whole curve, for the tolerance sweep of the report (not what a monitor pays)
        "probe_curve": {k: probe(k) for k in TRUNC_K if k < run["rank"]} | {run["rank"]: probe(run["rank"])},
        "step": run["snapshot_steps"][i],
        "earlier_step": run["snapshot_steps"][j],
    }


@torch.no_grad()
def heldout_loss(model, run: dict, ctx: dict) -> float:
    """Held-out loss of a (merged) model on the run's task: the planted case's held-out MSE, or
    the example's validation cross-entropy with the run's trained head."""
    if run["kind"] == "planted":
        ids, mask, target = ctx["heldout"][run["case"]]
        return float(masked_mse(hidden_states(model, ids, mask), target, mask))
    head = torch.nn.Linear(D, 20)
    head.load_state_dict(run["heads"][-1])
    return example_eval(model, head, ctx["heldout"]["example"])[0]


def cut_losses(run: dict, ks: Sequence[int], ctx: dict) -> dict[int, float]:
    """What cutting the trained adapter to each k of ``ks`` costs, the way a user does it: the
    run's last factors saved as a peft adapter, cut by ``truncate_adapter``, loaded back by peft
    and merged; k → held-out loss."""
    from peft import PeftModel

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        trained = pathlib.Path(tmp) / "trained"
        model = _lora(load_base(), run["rank"])
        with torch.no_grad():
            for m, key in enumerate(module_keys()):
                linear(model, key).lora_B["default"].weight.copy_(run["B"][-1][m])
                linear(model, key).lora_A["default"].weight.copy_(run["A"][-1][m])
        model.save_pretrained(trained)
        for k in sorted(set(ks)):
            cut = pathlib.Path(tmp) / f"k{k}"
            package_truncation.truncate_adapter(trained, cut, k)
            out[k] = heldout_loss(PeftModel.from_pretrained(load_base(), cut).merge_and_unload().eval(), run, ctx)
    return out


def estimate_run(run: dict, ref: Optional[dict], ctx: dict, settings: Settings) -> dict:
    """The package's suggestion at ``settings.package_fractions`` of an r = 64 run (at
    :data:`EVAL_FRACTIONS` of the others), every candidate at :data:`EVAL_FRACTIONS`, and for
    the r = 64 runs the held-out loss of the trained adapter cut to the suggestions at 25 % and
    100 % of training."""
    big = run["rank"] == settings.big_rank
    package: dict[float, dict] = {}
    candidates: dict[float, dict] = {}
    for f in settings.package_fractions if big else EVAL_FRACTIONS:
        package[f], probe = package_suggestion(run, ref, f, ctx)
        if f in EVAL_FRACTIONS:
            candidates[f] = candidates_at(run, ref, f, probe)
    out = {"package": package, "estimates": candidates}
    if big:
        out["cut"] = cut_losses(run, [package[f]["rank"] for f in (0.25, 1.0) if package[f]["rank"]], ctx)
    return out


def estimates_version() -> str:
    """Changes when the code of the readings changes — the candidates', this package's evaluation,
    the package's analysis, probe, rank rule and truncation — and the cached readings of a run
    are recomputed then."""
    package = ROOT / "lora_monitor"
    files = [BENCHMARKS / "rank_candidates.py"]
    files += sorted(p for sub in ("adapters", "analysis", "functional") for p in (package / sub).rglob("*.py"))
    text = "".join(p.read_text() for p in files) + repr((TRUNC_K, EVAL_FRACTIONS, FRACTIONS))
    readings = (estimate_run, package_suggestion, package_factors, candidates_at, probe_callable, cut_losses)
    text += "".join(inspect.getsource(function) for function in (*readings, heldout_loss, evaluation_context))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def evaluate(cache: pathlib.Path, settings: Settings, reevaluate: bool = False) -> dict:
    """Every reading on every cached run (cached per run in ``DIR/estimates``); writes and returns
    ``DIR/results.json``."""
    torch.set_num_threads(1)
    ctx: Optional[dict] = None
    version = estimates_version()
    results: dict[str, Any] = {"cases": {}, "estimates_version": version}
    cases: list[tuple[str, Sequence[int], Sequence[int]]] = [(c.name, c.ranks, (0, 1)) for c in settings.planted_cases]
    cases.append(("example", settings.example_ranks, settings.example_seeds))
    for name, ranks, seeds in cases:
        present = [(r, seed) for r in ranks for seed in seeds if run_path(cache, name, r, seed).exists()]
        if not present:
            continue
        entry: dict[str, Any] = {"runs": {}}
        for r, seed in sorted(present):
            # the reference of an r = 64 run: the r = 64 run of the next seed (cyclically)
            ref_seed = None
            if r == settings.big_rank:
                others = sorted(s for (rr, s) in present if rr == r and s != seed)
                if others:
                    ref_seed = next((s for s in others if s > seed), others[0])
            stored = cache / "estimates" / name / f"r{r}_s{seed}.json"
            if stored.exists() and not reevaluate:
                summary = json.loads(stored.read_text())
                if summary.get("version") == version and summary.get("ref_seed") == ref_seed:
                    entry["runs"][f"r{r}_s{seed}"] = summary
                    continue
            if ctx is None:
                ctx = evaluation_context(cache, settings)
            run = load_run(cache, name, r, seed)
            ref = load_run(cache, name, r, ref_seed) if ref_seed is not None else None
            t0 = time.perf_counter()
            summary = {k: run[k] for k in ("rank", "seed", "steps", "train_seconds")}
            summary |= {"version": version, "ref_seed": ref_seed, "truncation": run["truncation"]}
            if run["kind"] == "planted":
                summary |= {"heldout_loss": run["heldout_loss"], "base_loss": run["base_heldout_loss"]}
            else:
                summary |= {
                    "heldout_loss": run["val_loss"],
                    "val_acc": run["val_acc"],
                    "base_loss": run["base_val_loss"],
                    "base_acc": run["base_val_acc"],
                    "truncation_acc": run["truncation_acc"],
                }
            summary |= estimate_run(run, ref, ctx, settings)
            summary = json.loads(json.dumps(summary, default=_json_default))
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(summary))
            entry["runs"][f"r{r}_s{seed}"] = summary
            del run, ref
            print(f"evaluated {name} r={r} seed={seed} in {time.perf_counter() - t0:.1f} s", flush=True)
        results["cases"][name] = entry
    path = cache / "results.json"
    path.write_text(json.dumps(results, indent=1, default=_json_default))
    return results


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(type(o))
