"""The maths of the LoRA paper's Section 7, as pure tensor functions.

Tensors in, tensors out: batched over any leading dimensions, computed on the inputs' device,
no I/O, and no knowledge of peft or Lightning. Half-precision inputs are computed in float32.

Notation (see ``MATHS.md``): ΔW = s·B·A with B ∈ ℝ^{d×r} (peft's ``lora_B``), A ∈ ℝ^{r×k}
(``lora_A``) and s the ``scaling``.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import Tensor

Basis = Literal["A", "B", "delta_w_left", "delta_w_right"]
#: The singular-vector bases φ can be computed in. ``"A"``: right singular vectors of A, vectors
#: of the input space ℝ^k (the paper's Section 7.2 and its figures); ``"B"``: left singular
#: vectors of B (output space ℝ^d); ``"delta_w_left"`` / ``"delta_w_right"``: left (ℝ^d) or
#: right (ℝ^k) singular vectors of the whole update ΔW.
BASES: tuple[str, ...] = ("A", "B", "delta_w_left", "delta_w_right")

Scaling = Union[float, Tensor]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the analysis runs in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def factored_svd(B: Tensor, A: Tensor, scaling: Scaling = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``scaling · B @ A`` computed from its factors, never forming the product.

    B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), then the small SVD R_B R_Aᵀ = U_c Σ V_cᵀ gives
    ΔW = Q_B U_c (s·Σ) (Q_A V_c)ᵀ. Cost O((d + k)·r²) and memory O((d + k)·r) instead of
    O(d·k·min(d, k)) and d·k.

    Args:
        B: ``(..., d, r)``.
        A: ``(..., r, k)``.
        scaling: a number, or a tensor broadcastable to the batch shape ``(...)``.

    Returns:
        ``(U, S, Vh)`` with ``U: (..., d, m)``, ``S: (..., m)`` in decreasing order and
        ``Vh: (..., m, k)``, ``m = min(d, r, k)``, in float32 (float64 if an input is float64).
        A zero or rank-deficient factor gives zero singular values (never NaN); a matrix
        whose factors hold NaN or Inf gets NaN singular values instead of an exception.
    """
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"factored_svd: B is {tuple(B.shape)} and A is {tuple(A.shape)}; the rank dimensions "
            f"(B's last, A's second to last) must agree"
        )
    dtype = compute_dtype(B, A)
    B = B.to(dtype)
    A = A.to(dtype)
    scaling = torch.as_tensor(scaling, dtype=dtype, device=B.device)
    finite = torch.isfinite(B).all(-1).all(-1) & torch.isfinite(A).all(-1).all(-1)
    finite = finite & torch.isfinite(scaling)
    # LAPACK's SVD raises on non-finite input; zero those matrices and mark their spectrum NaN.
    B = torch.where(finite[..., None, None], B, torch.zeros((), dtype=dtype, device=B.device))
    A = torch.where(finite[..., None, None], A, torch.zeros((), dtype=dtype, device=A.device))
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.mT)
    u_core, s_core, vh_core = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    U = q_b @ u_core
    Vh = vh_core @ q_a.mT
    # A negative scaling flips the left vectors so that singular values stay non-negative.
    S = s_core * scaling.abs()[..., None]
    U = U * torch.where(scaling < 0, -1.0, 1.0).to(dtype)[..., None, None]
    S = torch.where(finite[..., None], S, torch.full((), float("nan"), dtype=dtype, device=S.device))
    return U, S, Vh


def singular_basis(B: Tensor, A: Tensor, scaling: Scaling = 1.0, basis: Basis = "A") -> Tensor:
    """Orthonormal singular vectors of one side of a LoRA update, ordered by singular value.

    Returns ``(..., n, m)``: columns are the singular vectors, ``n = k`` for ``"A"`` and
    ``"delta_w_right"``, ``n = d`` for ``"B"`` and ``"delta_w_left"``.
    """
    if basis == "A":
        eye = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device).expand(*A.shape[:-2], -1, -1)
        return factored_svd(eye, A)[2].mT
    if basis == "B":
        eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device).expand(*B.shape[:-2], -1, -1)
        return factored_svd(B, eye)[0]
    if basis == "delta_w_left":
        return factored_svd(B, A, scaling)[0]
    if basis == "delta_w_right":
        return factored_svd(B, A, scaling)[2].mT
    raise ValueError(f"unknown basis {basis!r}; expected one of {', '.join(map(repr, BASES))}")


def subspace_similarity(U: Tensor, V: Tensor) -> Tensor:
    """The whole grid of the normalized subspace similarity φ of the LoRA paper (Section 7.2).

    ``φ[..., i-1, j-1] = ‖U[:, :i]ᵀ V[:, :j]‖_F² / min(i, j)`` for bases ``U: (..., n, p)`` and
    ``V: (..., n, q)`` with orthonormal columns ordered by singular value. One product and a
    two-dimensional cumulative sum: no loop over (i, j).

    Returns ``(..., p, q)`` with values in [0, 1].
    """
    if U.shape[-2] != V.shape[-2]:
        raise ValueError(
            f"subspace_similarity: U is {tuple(U.shape)} and V is {tuple(V.shape)}; both bases "
            f"must live in the same space (the second to last dimensions must agree)"
        )
    dtype = compute_dtype(U, V)
    overlap = (U.to(dtype).mT @ V.to(dtype)).square()
    cumulative = overlap.cumsum(-2).cumsum(-1)
    p, q = cumulative.shape[-2:]
    i = torch.arange(1, p + 1, device=U.device, dtype=dtype)
    j = torch.arange(1, q + 1, device=U.device, dtype=dtype)
    return (cumulative / torch.minimum(i[:, None], j[None, :])).clamp(0.0, 1.0)
