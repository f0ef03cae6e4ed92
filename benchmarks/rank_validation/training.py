"""Training: the cache's layout, one job a process (a teacher, a planted-rank student, an example run), and their scheduling."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import PACKAGE
from .cases import (
    FRACTIONS,
    PROJECTIONS,
    TRUNC_K,
    Merged,
    PlantedCase,
    Settings,
    deltas_from_factors,
    example_eval,
    linear,
    load_base,
    load_tokenizer,
    masked_mse,
    module_keys,
    planted_texts,
    planted_update,
    settings_for,
)


def case_dir(cache: pathlib.Path, case: str) -> pathlib.Path:
    return cache / "runs" / case


def run_path(cache: pathlib.Path, case: str, rank: int, seed: int) -> pathlib.Path:
    return case_dir(cache, case) / f"r{rank}_s{seed}.pt"


def teacher_path(cache: pathlib.Path, case: str) -> pathlib.Path:
    return cache / "teachers" / f"{case}.pt"


def snapshot_steps(steps: int) -> list[int]:
    return sorted({max(1, round(f * steps)) for f in FRACTIONS})


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
                    str(PACKAGE),
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
