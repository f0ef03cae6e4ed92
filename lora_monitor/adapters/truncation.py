"""Cut a saved LoRA adapter to a smaller rank: every ΔW replaced by its best rank-K approximation.

The result is a peft adapter directory like the one read (``adapter_config.json`` and
``adapter_model.safetensors``), loadable by ``PeftModel.from_pretrained``: modules of one rank
set ``r``, the others peft's ``rank_pattern`` (their full paths, so that no other module
matches), ``lora_alpha`` and ``alpha_pattern`` unchanged. The factors of a module cut to K are
``B' = U_K·√(Σ_K/s')`` and ``A' = √(Σ_K/s')·V_Kᵀ`` with ``U_K Σ_K V_Kᵀ`` the top K singular
triplets of ΔW = s·B·A (:func:`lora_monitor.functional.factored_svd`, never forming ΔW) and s'
the scaling peft gives rank K: ``s'·B'·A'`` is that best approximation (Eckart–Young), its two
factors balanced.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Union

import torch

from lora_monitor.adapters.factors import PEFT_PREFIX, LoRAMonitorError
from lora_monitor.adapters.saved import SavedModule, read_saved_modules
from lora_monitor.adapters.variants import initialization_in_base
from lora_monitor.functional.svd import factored_svd

#: The rank each saved module is cut to: one for all, or by module path (a module's own rank
#: where it is lower: a module is never padded).
Ranks = Union[int, Mapping[str, int], Callable[[str], int]]


def _rank_of(ranks: Ranks, module_name: str) -> int:
    if isinstance(ranks, int):
        return ranks
    if callable(ranks):
        return int(ranks(module_name))
    return int(ranks[module_name])


def _cut(module: SavedModule, rank: int, use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (B', A') of rank ``rank`` whose update, at peft's scaling for that rank, is
    the best rank-``rank`` approximation of the module's ΔW."""
    scaling = module.alpha / (math.sqrt(rank) if use_rslora else rank)
    U, S, Vh = factored_svd(module.lora_B.double(), module.lora_A.double(), module.scaling)
    root = (S[:rank] / scaling).sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    return B.to(module.lora_B.dtype), A.to(module.lora_A.dtype)


def truncate_adapter(source: str | os.PathLike, output: str | os.PathLike, ranks: Ranks) -> dict[str, int]:
    """Write to ``output`` the adapter ``source`` with every ΔW cut to its best rank-K
    approximation, K given by ``ranks`` (never above a module's own rank).

    Returns:
        The rank of each module written, by its path.

    Raises:
        LoRAMonitorError: ``source`` is not a plain LoRA adapter this can cut (DoRA rescales
            the rows of W₀ + s·B·A, and a PiSSA-like initialization left W − s·B₀·A₀ in the
            base model: their ΔW is not s·B·A), a rank below 1, or ``output`` is ``source``.
    """
    saved = read_saved_modules(source)
    config = dict(saved.config)
    output = Path(output)
    if output.resolve() == saved.path.resolve():
        raise LoRAMonitorError(f"the truncated adapter would overwrite {saved.path}: write it to another directory")
    if any(module.magnitude is not None for module in saved.modules) or config.get("use_dora"):
        raise LoRAMonitorError(
            f"{saved.path} is a DoRA adapter: its update rescales the rows of W₀ + s·B·A, so "
            f"cutting B·A to rank K is not the best rank-K update; lora_monitor truncates plain "
            f"LoRA (and rsLoRA) adapters"
        )
    initialization = initialization_in_base(config)
    if initialization is not None:
        raise LoRAMonitorError(
            f"{saved.path} was initialized by {initialization}, which moved s·B₀·A₀ out of the base "
            f"weight: its ΔW is not s·B·A, and B₀, A₀ are not saved; convert it first (peft's "
            f"path_initial_model_for_weight_conversion) and truncate the converted adapter"
        )
    use_rslora = bool(config.get("use_rslora", False))
    tensors = dict(saved.tensors)
    written: dict[str, int] = {}
    for module in saved.modules:
        rank = min(_rank_of(ranks, module.module_name), module.r)
        if rank < 1:
            raise LoRAMonitorError(f"cannot truncate {module.module_name} to rank {rank}: a LoRA rank is at least 1")
        B, A = _cut(module, rank, use_rslora)
        key_A = next(k for k in tensors if k.startswith(f"{module.module_name}.lora_A") and k.endswith("weight"))
        key_B = next(k for k in tensors if k.startswith(f"{module.module_name}.lora_B") and k.endswith("weight"))
        tensors[key_A], tensors[key_B] = A.contiguous(), B.contiguous()
        written[module.module_name] = rank
    common = Counter(written.values()).most_common(1)[0][0]
    config["r"] = common
    config["rank_pattern"] = {
        name.removeprefix(PEFT_PREFIX): rank for name, rank in sorted(written.items()) if rank != common
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import save_file

    save_file(tensors, str(output / "adapter_model.safetensors"), metadata={"format": "pt"})
    return written


def _pattern_candidates(name: str) -> list[str]:
    """peft ``rank_pattern`` keys for module ``name``, shortest first: its last name, its last
    two, its path with the layer numbers wildcarded, its whole path (keys are regular
    expressions matched against the end of each module's path, after a dot)."""
    parts = name.split(".")
    wildcard = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parts)
    return [re.escape(parts[-1]), re.escape(".".join(parts[-2:])), wildcard, re.escape(name)]


def rank_pattern(ranks: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    r"""peft's ``r`` and ``rank_pattern`` that give every module of ``ranks`` (module path → rank)
    its rank: ``r`` the most common one, and for the others the shortest keys that match (as peft
    matches them, ``(.*\.)?(key)$``) only modules of that same rank, e.g. ``{"gate_proj": 8}``
    for every MLP gate of a Llama, ``{"bert\.encoder\.layer\.\d+\.output\.dense": 8}`` for
    BERT's (whose ``output.dense`` alone would also match ``attention.output.dense``)."""
    names = {name.removeprefix(PEFT_PREFIX): int(rank) for name, rank in ranks.items()}
    common = Counter(names.values()).most_common(1)[0][0] if names else 0
    pattern: dict[str, int] = {}
    for name, rank in names.items():
        if rank == common or any(re.match(rf"(.*\.)?({key})$", name) for key in pattern):
            continue
        for key in _pattern_candidates(name):
            matched = [other for other in names if re.match(rf"(.*\.)?({key})$", other)]
            if all(names[other] == rank for other in matched):
                pattern[key] = rank
                break
    return common, pattern


class LiveTruncation:
    """Cuts the updates of a live model's plain LoRA layers to their top k directions, in
    place, and puts the factors back: what a model with every ΔW truncated to rank k does
    (:meth:`cut`), for the functional probe of the rank a task needs.

    Each layer's ΔW = s·B·A is decomposed once (:func:`factored_svd`); ``cut(k)`` writes
    ``B' = U_k·√(Σ_k/s)``, ``A' = √(Σ_k/s)·V_kᵀ`` into the first k columns / rows of its factors
    and zeros into the rest (k = 0: no update), without gradients; :meth:`restore` writes the
    factors back exactly. Use it as a context manager.

    Args:
        layers: module path → ``(peft LoRA layer, adapter name)``, the layers to cut
            (:func:`~lora_monitor.adapters.live.plain_lora_layers`).
    """

    def __init__(self, layers: Mapping[str, tuple]) -> None:
        self._parts = []
        with torch.no_grad():
            for layer, name in layers.values():
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                scaling = float(layer.scaling[name])
                U, S, Vh = factored_svd(B.detach(), A.detach(), scaling)
                root = (S / scaling).sqrt()
                self._parts.append(
                    (A, B, (U * root).to(B.dtype), (root[:, None] * Vh).to(A.dtype), A.clone(), B.clone())
                )

    @property
    def rank(self) -> int:
        """The largest rank of the layers cut (``cut(rank)`` is the whole update)."""
        return max((A.shape[0] for A, *_ in self._parts), default=0)

    def cut(self, k: int) -> None:
        """Every layer's ΔW its best rank-k approximation (its own whole update where k ≥ r)."""
        with torch.no_grad():
            for A, B, left, right, original_A, original_B in self._parts:
                if k >= A.shape[0]:
                    A.copy_(original_A)
                    B.copy_(original_B)
                    continue
                A.zero_()
                B.zero_()
                A[:k] = right[:k]
                B[:, :k] = left[:, :k]

    def restore(self) -> None:
        self.cut(self.rank)

    def __enter__(self) -> LiveTruncation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()
