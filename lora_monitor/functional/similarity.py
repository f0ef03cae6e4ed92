"""The normalized subspace similarity φ of the LoRA paper (Section 7.2) and its chance level.

``φ(U, V, i, j) = ‖U[:, :i]ᵀ V[:, :j]‖_F² / min(i, j)`` for orthonormal bases ordered by singular
value: the whole grid from one product and a two-dimensional cumulative sum; what random
subspaces give (the paper's Figure 4, right panel); how many top directions two runs share.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lora_monitor.functional import thin_qr
from lora_monitor.functional.svd import compute_dtype


def subspace_similarity(U: Tensor, V: Tensor, rotation: Optional[Tensor] = None) -> Tensor:
    """The whole grid of the normalized subspace similarity φ of the LoRA paper (Section 7.2).

    ``φ[..., i-1, j-1] = ‖U[:, :i]ᵀ V[:, :j]‖_F² / min(i, j)`` for bases ``U: (..., n, p)`` and
    ``V: (..., n, q)`` with orthonormal columns ordered by singular value. One product and a
    two-dimensional cumulative sum: no loop over (i, j).

    With ``rotation: (..., q', q)`` the second basis is ``V @ rotation`` (the factored form
    :func:`factored_basis` returns), and is never formed: the product is ``(Uᵀ V) @ rotation``.

    Returns ``(..., p, q)`` with values in [0, 1].
    """
    if U.shape[-2] != V.shape[-2]:
        raise ValueError(
            f"subspace_similarity: U is {tuple(U.shape)} and V is {tuple(V.shape)}; both bases "
            f"must live in the same space (the second to last dimensions must agree)"
        )
    dtype = compute_dtype(U, V)
    overlap = U.to(dtype).mT @ V.to(dtype)
    if rotation is not None:
        overlap = overlap @ rotation.to(dtype)
    overlap = overlap.square()
    cumulative = overlap.cumsum(-2).cumsum(-1)
    p, q = cumulative.shape[-2:]
    i = torch.arange(1, p + 1, device=U.device, dtype=dtype)
    j = torch.arange(1, q + 1, device=U.device, dtype=dtype)
    return (cumulative / torch.minimum(i[:, None], j[None, :])).clamp(0.0, 1.0)


def column_space_similarity(X: Tensor, Y: Tensor) -> Tensor:
    """φ of the whole column spaces of ``X: (..., n, p)`` and ``Y: (..., n, q)``: the last cell of
    the φ grid of their left singular bases, ``‖Q_Xᵀ Q_Y‖_F² / min(p', q')`` (p', q' the number of
    basis vectors, ``min(n, p)`` and ``min(n, q)``), e.g. φ(A₀, A, r, r) with X = A₀ᵀ, Y = Aᵀ.

    It does not depend on how each basis is rotated, so no singular vectors and no n×r basis
    are formed: with ``X = P_X T_X⁻¹ R_X`` (see :func:`~lora_monitor.functional.thin_qr.orthogonal_factor`) it is
    ``‖T_X⁻ᵀ (P_Xᵀ P_Y) T_Y⁻¹‖_F²``, one n×p by n×q product and r×r solves. Returns ``(...)`` in
    [0, 1]; NaN where X or Y holds NaN or Inf.
    """
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(
            f"column_space_similarity: X is {tuple(X.shape)} and Y is {tuple(Y.shape)}; both must "
            f"live in the same space (the second to last dimensions must agree)"
        )
    dtype = compute_dtype(X, Y)
    p_x, t_x, _, _, finite_x = thin_qr.orthogonal_factor(X.to(dtype), with_q=True)
    p_y, t_y, _, _, finite_y = thin_qr.orthogonal_factor(Y.to(dtype), with_q=True)
    # (T_X⁻ᵀ P_Xᵀ P_Y T_Y⁻¹)ᵀ = ((P_Xᵀ P_Y) T_Y⁻¹)ᵀ T_X⁻¹
    overlap = thin_qr.solve(t_x, thin_qr.solve(t_y, p_x.mT @ p_y, left=False).mT, left=False)
    similarity = overlap.square().sum((-2, -1)) / min(p_x.shape[-1], p_y.shape[-1])
    nan = torch.full((), float("nan"), dtype=dtype, device=similarity.device)
    return torch.where(finite_x & finite_y, similarity.clamp(0.0, 1.0), nan)


def random_subspace_similarity(
    n: int,
    p: int,
    q: int,
    *,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Closed-form expected φ of two independent uniformly random nested subspaces of ℝⁿ.

    ``E‖U[:, :i]ᵀ V[:, :j]‖_F² = i·j/n`` (each unit vector of one subspace keeps j/n of its
    squared norm in the other), so ``E φ(i, j) = i·j/n / min(i, j) = max(i, j)/n``: the chance
    level of a φ grid (the paper's Figure 4, right panel, is a sample of it).

    Returns ``(p, q)`` with ``[i-1, j-1] = max(i, j)/n``; requires ``0 ≤ p, q ≤ n``.
    """
    if n < 1 or not (0 <= p <= n and 0 <= q <= n):
        raise ValueError(
            f"random_subspace_similarity: needs n ≥ 1 and 0 ≤ p, q ≤ n (a basis of ℝⁿ has at "
            f"most n vectors); got n={n}, p={p}, q={q}"
        )
    i = torch.arange(1, p + 1, device=device, dtype=dtype)
    j = torch.arange(1, q + 1, device=device, dtype=dtype)
    return torch.maximum(i[:, None], j[None, :]) / n


def sample_random_subspace_similarity(
    n: int,
    p: int,
    q: int,
    *,
    samples: int = 1,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """φ grids of independent random orthonormal bases: the paper's Figure 4, right panel.

    Each sample draws Gaussian matrices G ∈ ℝ^{n×p}, H ∈ ℝ^{n×q}; their thin QR factors Q_G, Q_H
    span uniformly random nested subspaces, and the result is ``subspace_similarity(Q_G, Q_H)``.
    Its mean tends to :func:`random_subspace_similarity`. Sampled in float32 (float64 if
    ``dtype`` is float64) and returned in ``dtype``; ``generator`` must live on ``device``.

    Returns ``(samples, p, q)``.
    """
    if n < 1 or not (0 <= p <= n and 0 <= q <= n) or samples < 0:
        raise ValueError(
            f"sample_random_subspace_similarity: needs n ≥ 1, 0 ≤ p, q ≤ n and samples ≥ 0; "
            f"got n={n}, p={p}, q={q}, samples={samples}"
        )
    work = torch.float64 if dtype == torch.float64 else torch.float32
    gaussian = torch.randn(samples, n, p + q, generator=generator, device=device, dtype=work)
    U = torch.linalg.qr(gaussian[..., :p])[0]
    V = torch.linalg.qr(gaussian[..., p:])[0]
    return subspace_similarity(U, V).to(dtype)


def shared_directions(phi: Tensor, n: int, *, false_alarm: float = 1e-3) -> Tensor:
    """How many top directions two runs share clearly above chance, read off a φ grid.

    The top-i blocks share ``O_i = i·φ(i, i)`` dimensions (the sum of the squared cosines of
    their principal angles); growing both blocks by their i-th direction adds
    ``g_i = O_i − O_{i−1} ≥ 0``. For independent uniformly random subspaces of ℝⁿ,
    ``E g_i = (2i − 1)/n`` and ``g_i`` is at most as spread as ``χ²_ν / n``, ``ν = 2i − 1``
    (the entries of ``U_iᵀ V_i`` are nearly N(0, 1/n); orthonormality only thins the tail).

    *Clearly above chance* means ``g_i ≥ (ν + 2√(νx) + 2x)/n`` with ``x = ln(m / false_alarm)``,
    ``m = min(p, q)``: by the Laurent–Massart bound ``P(χ²_ν ≥ ν + 2√(νx) + 2x) ≤ e^{−x}``,
    random subspaces get any of their m directions called shared with probability at most
    ``false_alarm``. At n = 384, m = 8 that is g₁ ≥ 0.065 (25× the chance level 1/n).

    The count is the largest such i, so that the top-i blocks hold every shared direction found:
    a block, not a single vector, is what is compared. When σ₁ ≈ σ₂ swap their directions between
    runs, g₁ ≈ 0 (φ(1, 1) ≈ 0) but g₂ ≈ 2, and the count is 2.

    Args:
        phi: ``(..., p, q)`` φ grids (:func:`subspace_similarity`) of bases of ℝⁿ.
        n: the dimension of the space the basis vectors live in.
        false_alarm: the family-wise probability of a false count on random subspaces, in (0, 1).

    Returns:
        ``(...)`` int64 in ``0..min(p, q)``; 0 for a grid holding NaN.
    """
    if not 0 < false_alarm < 1:
        raise ValueError(f"shared_directions: false_alarm must be in (0, 1), got {false_alarm}")
    m = min(phi.shape[-2:])
    if n < 1 or m < 1:
        raise ValueError(f"shared_directions: needs n ≥ 1 and a non-empty grid, got n={n}, {tuple(phi.shape)}")
    dtype = compute_dtype(phi)
    i = torch.arange(1, m + 1, device=phi.device, dtype=dtype)
    overlap = torch.diagonal(phi[..., :m, :m].to(dtype), dim1=-2, dim2=-1) * i
    gain = torch.diff(overlap, dim=-1, prepend=torch.zeros_like(overlap[..., :1]))
    nu = 2 * i - 1
    x = math.log(m / false_alarm)
    threshold = (nu + 2 * torch.sqrt(nu * x) + 2 * x) / n
    above = gain >= threshold
    # The largest i with a gain above its threshold: 1-based position of the last True, 0 if none.
    return (above * i.to(torch.int64)).amax(-1)
