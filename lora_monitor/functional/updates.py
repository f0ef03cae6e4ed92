"""The update each peft variant applies, from its factors: tensors in, tensors out.

``docs/maths.md``, "What ΔW is under each peft variant": ΔW is the merged weight minus the
pretrained weight. These functions give it in the cheapest exact form:

- :func:`since_initial`: s·(B·A − B₀·A₀) as the factors ``[B, −B₀]``, ``[A; A₀]`` (rank ≤ 2r),
  for initializations that moved s·B₀·A₀ out of the base weight (PiSSA, OLoRA, CorDA, LoftQ);
- :func:`dora_update`: DoRA's ΔW = (D − I)·W₀ + D·s·B·A, D = diag(m / ‖row of W₀ + s·B·A‖),
  its directional term kept factored (B' = D·B) and the whole update dense, one module at a
  time (the magnitude part (D − I)·W₀ is full rank: no factored form exists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lora_monitor.functional.svd import compute_dtype


def since_initial(B: Tensor, A: Tensor, B0: Tensor, A0: Tensor) -> tuple[Tensor, Tensor]:
    """Factors ``(B_u, A_u)`` with ``B_u @ A_u == B @ A − B0 @ A0``: ``[B, −B₀]`` (d×2r) and
    ``[A; A₀]`` (2r×k). Batched over leading dimensions; nothing d×k is formed."""
    if B.shape != B0.shape or A.shape != A0.shape:
        raise ValueError(
            f"since_initial: the initial factors B₀ {tuple(B0.shape)}, A₀ {tuple(A0.shape)} do "
            f"not have the shapes of B {tuple(B.shape)}, A {tuple(A.shape)}"
        )
    return torch.cat([B, -B0.to(B)], dim=-1), torch.cat([A, A0.to(A)], dim=-2)


@dataclass(frozen=True)
class DoraUpdate:
    """DoRA's update of one module, all in the (d, k) orientation.

    Attributes:
        scale: D's diagonal, m / ‖row of W₀ + s·B·A‖ ``(d,)``.
        direction_B: D·B ``(d, r)``: the directional term D·s·B·A is ``s · direction_B @ A``.
        delta: ΔW = (D − I)·W₀ + D·s·B·A ``(d, k)``, the update the model applies.
        magnitude_norm: ‖(D − I)·W₀‖_F, the part of ΔW that only rescales W₀'s rows.
        direction_norm: ‖D·s·B·A‖_F.
    """

    scale: Tensor
    direction_B: Tensor
    delta: Tensor
    magnitude_norm: Tensor
    direction_norm: Tensor


def dora_update(B: Tensor, A: Tensor, scaling: float, magnitude: Tensor, W0: Tensor) -> DoraUpdate:
    """DoRA's update from its factors, magnitude vector ``m (d,)`` and base weight ``W0 (d, k)``,
    as peft computes it (``DoraLinearVariant``: the row norms of W₀ + s·B·A, detached)."""
    dtype = compute_dtype(B, A, W0)
    B, A, W0, magnitude = B.to(dtype), A.to(dtype), W0.to(dtype), magnitude.to(dtype)
    low_rank = scaling * (B @ A)
    scale = magnitude / torch.linalg.vector_norm(W0 + low_rank, dim=1)
    rescaled = (scale - 1)[:, None] * W0
    direction = scale[:, None] * low_rank
    return DoraUpdate(
        scale=scale,
        direction_B=scale[:, None] * B,
        delta=rescaled + direction,
        magnitude_norm=torch.linalg.matrix_norm(rescaled),
        direction_norm=torch.linalg.matrix_norm(direction),
    )
