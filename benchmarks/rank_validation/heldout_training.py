"""Training the held-out cases (:mod:`rank_validation.heldout`): their models, teachers and runs.

Unlike the tuning cases' code, modules are handled one by one (an all-linear adapter's modules
differ in shape): a run saves, at :data:`~rank_validation.heldout.HELDOUT_FRACTIONS` of training,
``{"layer.kind": (B, A)}``, and at the end its truncation curve — held-out loss with every ΔW cut
to its top k directions — and, where the adapter has attention and MLP modules, the same with
only one group cut (the other whole): the per-kind truths.
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Any, Optional

import torch

from .cases import TRUNC_K, Settings, load_base, load_tokenizer, masked_mse, planted_texts
from .heldout import (
    ATTENTION,
    HELDOUT_CASES,
    HELDOUT_FRACTIONS,
    LLAMA_CONFIG,
    LLAMA_SEED,
    MODULE_PATHS,
    QV,
    HeldoutCase,
)

Key = tuple[int, str]


def key_name(key: Key) -> str:
    return f"{key[0]}.{key[1]}"


def parse_key(name: str) -> Key:
    layer, kind = name.split(".", 1)
    return int(layer), kind


def build_base(model: str) -> torch.nn.Module:
    """The plain base model, in eval mode, without dropout."""
    if model == "minilm":
        return load_base().eval()
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(LLAMA_SEED)
    return LlamaModel(LlamaConfig(**LLAMA_CONFIG)).eval()


def layers_of(model: torch.nn.Module) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.encoder.layer if hasattr(base, "encoder") else base.layers


def linear_of(model: torch.nn.Module, model_kind: str, key: Key) -> Any:
    return layers_of(model)[key[0]].get_submodule(MODULE_PATHS[model_kind][key[1]])


def keys_of(model: torch.nn.Module, kinds: tuple[str, ...]) -> list[Key]:
    return [(layer, kind) for layer in range(len(layers_of(model))) for kind in kinds]


def target_regex(case: HeldoutCase) -> str:
    """peft ``target_modules`` as a regex matching exactly the case's LoRA modules."""
    paths = "|".join(MODULE_PATHS[case.model][k].replace(".", r"\.") for k in case.lora)
    layers = r"encoder\.layer" if case.model == "minilm" else r"layers"
    return rf".*{layers}\.\d+\.({paths})"


def group_of(kind: str) -> str:
    return "attention" if kind in ATTENTION else "mlp"


def sigma_of(case: HeldoutCase, base: torch.nn.Module, key: Key) -> float:
    """The planted singular value of one module (see :mod:`rank_validation.heldout`)."""
    W = linear_of(base, case.model, key).weight.detach().double()
    if case.model == "llama":
        return 2 * float(W.norm()) / W.shape[0] ** 0.5
    if key[1] in QV:
        return 0.5
    qv = [linear_of(base, case.model, (key[0], k)).weight.detach().double() for k in QV]
    reference = float(torch.cat([torch.linalg.svdvals(w) for w in qv]).median())
    return 0.5 * float(torch.linalg.svdvals(W).median()) / reference


def planted_updates(case: HeldoutCase, base: torch.nn.Module) -> dict[Key, torch.Tensor]:
    """ΔW* of every planted module: ``σ · U Vᵀ``, U and V random orthonormal (fresh seeds)."""
    out = {}
    kinds = list(MODULE_PATHS[case.model])
    for key in keys_of(base, tuple(kinds)):
        K = case.planted_rank(key[1])
        if not K:
            continue
        W = linear_of(base, case.model, key).weight
        n, m = W.shape
        gen = torch.Generator().manual_seed(50_000 + 100 * key[0] + kinds.index(key[1]) + 1000 * K)
        U = torch.linalg.qr(torch.randn(n, K, generator=gen, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(m, K, generator=gen, dtype=torch.float64))[0]
        out[key] = (sigma_of(case, base, key) * U @ V.T).float()
    return out


def hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=ids[i : i + batch], attention_mask=mask[i : i + batch]).last_hidden_state
                for i in range(0, ids.shape[0], batch)
            ]
        )


def inputs(case: HeldoutCase, settings: Settings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) of the training and held-out sequences: MiniLM the tuning cases' pydoc chunks,
    the Llama random tokens (as many, as long)."""
    n = {"train": settings.planted_train, "heldout": settings.planted_heldout}
    if case.model == "llama":
        gen = torch.Generator().manual_seed(7)
        out = {}
        for name in ("train", "heldout"):
            ids = torch.randint(0, LLAMA_CONFIG["vocab_size"], (n[name], settings.planted_tokens), generator=gen)
            out[name] = (ids, torch.ones_like(ids))
        return out
    tok = load_tokenizer()
    train, held = planted_texts(settings)
    out = {}
    for name, texts in (("train", train), ("heldout", held)):
        enc = tok(texts, padding="max_length", truncation=True, max_length=settings.planted_tokens, return_tensors="pt")
        out[name] = (enc["input_ids"].long(), enc["attention_mask"].long())
    return out


def teacher_file(cache: pathlib.Path, case: HeldoutCase) -> pathlib.Path:
    return cache / "heldout" / "teachers" / f"{case.teacher}.pt"


def run_file(cache: pathlib.Path, case: HeldoutCase, rank: int) -> pathlib.Path:
    return cache / "heldout" / "runs" / case.name / f"r{rank}_s0.pt"


def _save(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def make_teacher(cache: pathlib.Path, settings: Settings, case: HeldoutCase) -> None:
    base = build_base(case.model)
    W0 = {
        k: linear_of(base, case.model, k).weight.detach().clone()
        for k in keys_of(base, tuple(MODULE_PATHS[case.model]))
    }
    planted = planted_updates(case, base)
    data = inputs(case, settings)
    out: dict[str, Any] = {
        "planted_sigma": {key_name(k): float(torch.linalg.svdvals(d)[0]) for k, d in planted.items()}
    }
    with torch.no_grad():
        for k, d in planted.items():
            linear_of(base, case.model, k).weight.add_(d)
    for name, (ids, mask) in data.items():
        out[name] = {"ids": ids, "mask": mask, "target": hidden(base, ids, mask)}
    with torch.no_grad():
        for k, w in W0.items():
            linear_of(base, case.model, k).weight.copy_(w)
    held = out["heldout"]
    out["base_heldout_loss"] = float(masked_mse(hidden(base, held["ids"], held["mask"]), held["target"], held["mask"]))
    _save(teacher_file(cache, case), out)
    print(f"teacher {case.teacher}: base held-out loss {out['base_heldout_loss']:.4e}", flush=True)


def thin_svd(B: torch.Tensor, A: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW = s·B·A's thin SVD from its factors, float64."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    u, S, vh = torch.linalg.svd(s * Rb @ Ra.T)
    return Qb @ u, S, vh @ Qa.T


def cut(svds: dict, k: Optional[int]) -> dict[Key, torch.Tensor]:
    """Each ΔW cut to its top k directions (None: whole)."""
    out = {}
    for key, (U, S, Vh) in svds.items():
        kk = S.numel() if k is None else min(k, S.numel())
        out[key] = ((U[:, :kk] * S[:kk]) @ Vh[:kk]).float()
    return out


class Plain:
    """A plain base model whose monitored weights are set to W₀ + ΔW on demand."""

    def __init__(self, case: HeldoutCase, keys: list[Key]) -> None:
        self.case = case
        self.model = build_base(case.model)
        self.W0 = {k: linear_of(self.model, case.model, k).weight.detach().clone() for k in keys}

    def set(self, deltas: Optional[dict[Key, torch.Tensor]]) -> None:
        with torch.no_grad():
            for k, w in self.W0.items():
                d = None if deltas is None else deltas.get(k)
                linear_of(self.model, self.case.model, k).weight.copy_(w if d is None else w + d)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> float:
        return float(masked_mse(hidden(self.model, ids, mask), target, mask))


def lr_factor(case: HeldoutCase, step: int) -> float:
    """The schedule's multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if case.schedule == "constant":
        return 1.0
    warm = max(1, round(case.warmup * case.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, case.steps - warm)))


def train_run(cache: pathlib.Path, settings: Settings, case: HeldoutCase, rank: int, seed: int = 0) -> None:
    from peft import LoraConfig, get_peft_model

    from .training import _batches

    data = torch.load(teacher_file(cache, case))
    train, held = data["train"], data["heldout"]
    torch.manual_seed(seed)
    alpha = rank if case.alpha == "r" else 2 * rank
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=case.rslora, target_modules=target_regex(case), lora_dropout=0.0
    )
    model = get_peft_model(build_base(case.model), config)
    model.train()
    keys = keys_of(model, case.lora)
    lins = {k: linear_of(model, case.model, k) for k in keys}
    assert all(hasattr(lin, "lora_A") for lin in lins.values()), "a LoRA module is missing"
    n_lora = sum(1 for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    assert n_lora == len(keys), (n_lora, len(keys))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(case, step))
    snaps = sorted({max(1, round(f * case.steps)) for f in HELDOUT_FRACTIONS})
    factors, losses, lrs = [], [], []
    gen = torch.Generator().manual_seed(10_000 + seed)
    start = time.perf_counter()
    for step, idx in enumerate(_batches(train["ids"].shape[0], settings.batch_size, case.steps, gen), 1):
        h = model(input_ids=train["ids"][idx], attention_mask=train["mask"][idx]).last_hidden_state
        loss = masked_mse(h, train["target"][idx], train["mask"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step in snaps:
            factors.append(
                {
                    key_name(k): (
                        lin.lora_B["default"].weight.detach().clone(),
                        lin.lora_A["default"].weight.detach().clone(),
                    )
                    for k, lin in lins.items()
                }
            )
    train_seconds = time.perf_counter() - start
    scaling = float(lins[keys[0]].scaling["default"])
    del model, opt
    plain = Plain(case, keys)
    svds = {parse_key(n): thin_svd(B, A, scaling) for n, (B, A) in factors[-1].items()}
    ids, mask, target = held["ids"], held["mask"], held["target"]
    ks = [k for k in TRUNC_K if k < rank] + [rank]
    curves: dict[str, dict[int, float]] = {"all": {}}
    groups = sorted({group_of(k) for k in case.lora})
    if rank == settings.big_rank:
        for k in ks:
            plain.set(cut(svds, k))
            curves["all"][k] = plain.loss(ids, mask, target)
        if len(groups) > 1:
            whole = cut(svds, None)
            for g in groups:
                curves[g] = {}
                for k in ks:
                    part = cut({key: v for key, v in svds.items() if group_of(key[1]) == g}, k)
                    plain.set(whole | part)
                    curves[g][k] = plain.loss(ids, mask, target)
    else:
        plain.set(cut(svds, None))
        curves["all"][rank] = plain.loss(ids, mask, target)
    record = {
        "case": case.name,
        "rank": rank,
        "seed": seed,
        "steps": case.steps,
        "snapshot_steps": snaps,
        "factors": factors,
        "scaling": scaling,
        "train_loss": losses,
        "lr": lrs,
        "heldout_loss": curves["all"][rank],
        "base_heldout_loss": data["base_heldout_loss"],
        "truncation": curves,
        "train_seconds": train_seconds,
    }
    _save(run_file(cache, case, rank), record)
    print(
        f"{case.name} r={rank}: held-out {curves['all'][rank]:.4e} (base {data['base_heldout_loss']:.4e}); "
        f"{train_seconds / case.steps:.3f} s/step",
        flush=True,
    )


def train_heldout(cache: pathlib.Path, settings: Settings, only: Optional[list[str]] = None) -> None:
    """Every held-out run not yet in the cache, one at a time in this process, on one thread."""
    torch.set_num_threads(1)
    for case in HELDOUT_CASES:
        if only and case.name not in only:
            continue
        if not teacher_file(cache, case).exists():
            t0 = time.perf_counter()
            make_teacher(cache, settings, case)
            print(
                f"[{time.strftime('%H:%M:%S')}] teacher {case.teacher} in {time.perf_counter() - t0:.0f} s", flush=True
            )
        for rank in sorted(case.ranks, reverse=True):
            if run_file(cache, case, rank).exists():
                continue
            t0 = time.perf_counter()
            print(f"[{time.strftime('%H:%M:%S')}] start {case.name} r={rank}", flush=True)
            train_run(cache, settings, case, rank)
            print(
                f"[{time.strftime('%H:%M:%S')}] done {case.name} r={rank} in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
