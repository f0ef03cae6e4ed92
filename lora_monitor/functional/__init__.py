"""The maths of the LoRA paper's Section 7, as pure tensor functions.

Tensors in, tensors out: batched over any leading dimensions, computed on the inputs' device,
no I/O, and no knowledge of peft or of any training framework. Half-precision inputs are
computed in float32, and everything in float64 while the user's settings round float32 matrix
products (TF32, bfloat16 matmul precision, autocast: :func:`~lora_monitor.functional.compute_dtype`).

- :mod:`~lora_monitor.functional.bases` — the bases φ can be computed in (no torch);
- :mod:`~lora_monitor.functional.thin_qr` — thin QR of tall factors, Gram path or Householder;
- :mod:`~lora_monitor.functional.svd` — the SVD of ΔW = s·B·A from its factors, and its bases;
- :mod:`~lora_monitor.functional.similarity` — φ grids, their chance level, shared directions;
- :mod:`~lora_monitor.functional.spectra` — energy, effective and stable ranks, norms;
- :mod:`~lora_monitor.functional.weights` — amplification and intruder dimensions against W₀;
- :mod:`~lora_monitor.functional.updates` — the update each peft variant applies.

Every name is importable from here; the submodules (and torch) load on first use, so that
``from lora_monitor.functional.bases import BASES`` costs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_monitor.functional.bases import BASES, Basis, BasisInfo, basis_info

if TYPE_CHECKING:
    from lora_monitor.functional.similarity import (
        column_space_similarity,
        random_subspace_similarity,
        sample_random_subspace_similarity,
        shared_directions,
        subspace_similarity,
    )
    from lora_monitor.functional.spectra import (
        effective_rank,
        energy_rank,
        frobenius_norm,
        gap_rank,
        stable_rank,
    )
    from lora_monitor.functional.svd import Scaling, compute_dtype, factored_basis, factored_svd, singular_basis
    from lora_monitor.functional.updates import DoraUpdate, dora_update, since_initial
    from lora_monitor.functional.weights import (
        amplification_factor,
        amplification_from_projection,
        block_projection,
        intruder_dimensions,
    )

_SUBMODULE = {
    **dict.fromkeys(
        (
            "column_space_similarity",
            "random_subspace_similarity",
            "sample_random_subspace_similarity",
            "shared_directions",
            "subspace_similarity",
        ),
        "similarity",
    ),
    **dict.fromkeys(("effective_rank", "energy_rank", "frobenius_norm", "gap_rank", "stable_rank"), "spectra"),
    **dict.fromkeys(("Scaling", "compute_dtype", "factored_basis", "factored_svd", "singular_basis"), "svd"),
    **dict.fromkeys(("DoraUpdate", "dora_update", "since_initial"), "updates"),
    **dict.fromkeys(
        ("amplification_factor", "amplification_from_projection", "block_projection", "intruder_dimensions"),
        "weights",
    ),
}

__all__ = [
    "BASES",
    "Basis",
    "BasisInfo",
    "DoraUpdate",
    "Scaling",
    "amplification_factor",
    "amplification_from_projection",
    "basis_info",
    "block_projection",
    "column_space_similarity",
    "compute_dtype",
    "dora_update",
    "effective_rank",
    "energy_rank",
    "factored_basis",
    "factored_svd",
    "frobenius_norm",
    "gap_rank",
    "intruder_dimensions",
    "random_subspace_similarity",
    "sample_random_subspace_similarity",
    "shared_directions",
    "since_initial",
    "singular_basis",
    "stable_rank",
    "subspace_similarity",
]


def __getattr__(name: str) -> Any:
    submodule = _SUBMODULE.get(name)
    if submodule is None:
        raise AttributeError(f"module 'lora_monitor.functional' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lora_monitor.functional.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULE])
