"""The maths of the LoRA paper's Section 7, as pure tensor functions.

Tensors in, tensors out: batched over any leading dimensions, computed on the inputs' device,
no I/O, and no knowledge of peft or Lightning. Half-precision inputs are computed in float32.

Notation (see ``MATHS.md``): ΔW = s·B·A with B ∈ ℝ^{d×r} (peft's ``lora_B``), A ∈ ℝ^{r×k}
(``lora_A``) and s the ``scaling``.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from lora_monitor import thin_qr

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
    O(d·k·min(d, k)) and d·k. Each QR comes from the factor's Gram matrix where that is exact
    (well-conditioned factors, the usual case: two GEMMs per factor in all, ``U = B (R_B⁻¹ U_c)``),
    else from Householder QR (see :func:`~lora_monitor.thin_qr.gram_cholesky`).

    Args:
        B: ``(..., d, r)``.
        A: ``(..., r, k)``.
        scaling: a number, or a tensor broadcastable to the batch shape ``(...)``.

    Returns:
        ``(U, S, Vh)`` with ``U: (..., d, m)``, ``S: (..., m)`` in decreasing order and
        ``Vh: (..., m, k)``, ``m = min(d, r, k)``, in float32 (float64 if an input is float64).
        A zero or rank-deficient factor gives zero singular values (never NaN); a matrix
        whose factors hold NaN or Inf gets NaN singular values instead of an exception. Finite
        factors of any magnitude are handled (each is scaled by a power of two first); a
        singular value beyond the dtype's range comes out Inf.
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
    # Each factor is brought to magnitude ~1 (by an exact power of two, where it is not already
    # well inside the dtype's range), so that the r×r core product neither overflows (NaN
    # spectrum for finite factors) nor underflows (zero spectrum and arbitrary vectors for a
    # nonzero ΔW); the powers are put back on the singular values. LAPACK's SVD raises on
    # non-finite input: those matrices are zeroed, their spectrum NaN.
    p_b, t_b, r_b, exp_b, finite_b = thin_qr.orthogonal_factor(B, with_q=True)
    p_a, t_a, r_a, exp_a, finite_a = thin_qr.orthogonal_factor(A.mT, with_q=True)
    finite = finite_b & finite_a & torch.isfinite(scaling)
    u_core, s_core, vh_core = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    # A negative scaling flips the left vectors so that singular values stay non-negative; the
    # sign and R⁻¹ go on the r×r factors, so that each side costs one product with its factor.
    sign = torch.where(scaling < 0, -1.0, 1.0).to(dtype)[..., None, None]
    U = p_b @ thin_qr.solve(t_b, u_core * sign)
    Vh = thin_qr.solve(t_a, vh_core.mT).mT @ p_a.mT
    S = s_core * scaling.abs()[..., None] * exp_b[..., None] * exp_a[..., None]
    nan = torch.full((), float("nan"), dtype=dtype, device=S.device)
    S = torch.where(finite[..., None], S, nan)
    return U, S, Vh


def singular_basis(B: Tensor, A: Tensor, scaling: Scaling = 1.0, basis: Basis = "A") -> Tensor:
    """Orthonormal singular vectors of one side of a LoRA update, ordered by singular value.

    Returns ``(..., n, m)``: columns are the singular vectors, ``n = k`` for ``"A"`` and
    ``"delta_w_right"``, ``n = d`` for ``"B"`` and ``"delta_w_left"``.
    """
    if basis in ("A", "B"):
        # One factor alone: its own QR, no identity partner (whose QR would be wasted work).
        factor = A.mT if basis == "A" else B
        P, T, R, _, _ = thin_qr.orthogonal_factor(factor.to(compute_dtype(factor)), with_q=True)
        return P @ thin_qr.solve(T, _factor_rotation(R)[0])
    _, Q, W, _ = factored_basis(B, A, scaling, basis)
    return Q @ W


def _factor_rotation(R: Tensor) -> tuple[Tensor, Tensor]:
    """For a factor ``X = Q R`` (B, or Aᵀ): ``(W, σ)`` with X's singular vectors ``Q @ W`` (the
    left ones of B, the right ones of A) and its singular values σ, from the r×r SVD of R."""
    u, sigma, _ = torch.linalg.svd(R, full_matrices=False)
    return u, sigma


def factored_basis(
    B: Tensor, A: Tensor, scaling: Scaling = 1.0, basis: Basis = "A"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ΔW's singular values and one singular basis kept factored, from one QR per factor.

    The analysis of a snapshot needs the spectrum of ΔW and the basis φ is computed in, never
    ΔW's vectors on both sides. Only the factor the basis lives on (B for ``"B"`` and
    ``"delta_w_left"``, A for ``"A"`` and ``"delta_w_right"``) keeps an n×r matrix; the other one
    is reduced to its r×r triangle R. The basis is returned as ``Q @ W`` without multiplying it
    out: :func:`subspace_similarity` takes ``W`` as ``rotation``, so that φ against a reference
    basis costs ``(Uᵀ Q) W``, O(n·r·p), instead of forming the n×r basis. Where the factor is
    well-conditioned (:func:`~lora_monitor.thin_qr.gram_cholesky`), nothing n×r is formed at
    all: Q is the factor itself and W carries R⁻¹, so the whole analysis costs two Gram matrices
    and r×r work.

    Returns:
        ``(S, Q, W, basis_S)``: ``S (..., m)`` ΔW's singular values as :func:`factored_svd`
        gives them; ``Q (..., n, r)`` (the factor's Householder Q, or for a matrix on the Gram
        path the factor itself, in the compute dtype) and ``W (..., r, m)`` with ``Q @ W ==
        singular_basis(B, A, scaling, basis)`` (up to the sign of each column), orthonormal;
        ``basis_S (..., m)`` the singular values that order the basis (of A, of B, or S itself
        for ΔW's bases). All NaN where a factor or the scaling is not finite.
    """
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"factored_basis: B is {tuple(B.shape)} and A is {tuple(A.shape)}; the rank "
            f"dimensions (B's last, A's second to last) must agree"
        )
    if basis not in BASES:
        raise ValueError(f"unknown basis {basis!r}; expected one of {', '.join(map(repr, BASES))}")
    dtype = compute_dtype(B, A)
    B, A = B.to(dtype), A.to(dtype)
    scaling = torch.as_tensor(scaling, dtype=dtype, device=B.device)
    on_b = basis in ("B", "delta_w_left")
    p_b, t_b, r_b, exp_b, finite_b = thin_qr.orthogonal_factor(B, with_q=on_b)
    p_a, t_a, r_a, exp_a, finite_a = thin_qr.orthogonal_factor(A.mT, with_q=not on_b)
    finite = finite_b & finite_a & torch.isfinite(scaling)
    Q, T = (p_b, t_b) if on_b else (p_a, t_a)
    core = r_b @ r_a.mT
    magnitude = scaling.abs()[..., None] * exp_b[..., None] * exp_a[..., None]
    if basis.startswith("delta_w"):
        u_core, s_core, vh_core = torch.linalg.svd(core, full_matrices=False)
        # A negative scaling flips the left vectors, as factored_svd does.
        sign = torch.where(scaling < 0, -1.0, 1.0).to(dtype)[..., None, None]
        W = u_core * sign if on_b else vh_core.mT
        S = s_core * magnitude
        basis_S = S
    else:
        S = torch.linalg.svdvals(core) * magnitude
        W, sigma = _factor_rotation(r_b if on_b else r_a)
        basis_S = sigma * (exp_b if on_b else exp_a)[..., None]
    nan = torch.full((), float("nan"), dtype=dtype, device=S.device)
    S, basis_S = torch.where(finite[..., None], S, nan), torch.where(finite[..., None], basis_S, nan)
    return S, Q, thin_qr.solve(T, W), basis_S


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
    are formed: with ``X = P_X T_X⁻¹ R_X`` (see :func:`~lora_monitor.thin_qr.orthogonal_factor`) it is
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


def _normalized_spectrum(S: Tensor) -> tuple[Tensor, Tensor]:
    """``(|S| / max|S|, max|S|)`` over the last dim in the compute dtype; ``|S|`` where max is 0.

    Dividing by the largest value first keeps the squares from overflowing or underflowing.
    """
    S = S.to(compute_dtype(S)).abs()
    top = S.amax(-1, keepdim=True)
    x = S / torch.where(top > 0, top, torch.ones((), dtype=S.dtype, device=S.device))
    return x, top.squeeze(-1)


def energy_rank(S: Tensor, energy: float = 0.9) -> Tensor:
    """Smallest k with ``Σ_{i≤k} σᵢ² ≥ energy · Σᵢ σᵢ²`` (σ sorted decreasingly here).

    Args:
        S: singular values ``(..., m)``, non-negative (taken in absolute value), any order.
        energy: the fraction of ``‖ΔW‖_F²`` to hold, in (0, 1].

    Returns:
        ``(...)`` int64 in ``1..m``; 0 for an all-zero or non-finite spectrum.
    """
    if isinstance(energy, (int, float)) and not 0 < energy <= 1:
        raise ValueError(f"energy_rank: energy must be in (0, 1], got {energy}")
    x, top = _normalized_spectrum(S)
    cumulative = x.sort(-1, descending=True).values.square().cumsum(-1)
    rank = (cumulative < energy * cumulative[..., -1:]).sum(-1) + 1
    valid = torch.isfinite(top) & (top > 0)
    return torch.where(valid, rank, torch.zeros((), dtype=rank.dtype, device=rank.device))


def effective_rank(S: Tensor) -> Tensor:
    """Effective rank ``exp(−Σᵢ pᵢ log pᵢ)``, ``pᵢ = σᵢ / Σⱼ σⱼ`` (Roy & Vetterli 2007).

    ``0 log 0 = 0``. ``S: (..., m)`` non-negative. Returns ``(...)`` in ``[1, m]``, 0 for an
    all-zero spectrum, NaN for a spectrum holding NaN or Inf; float32 (float64 for float64 S).
    """
    x, top = _normalized_spectrum(S)
    total = x.sum(-1, keepdim=True)
    p = x / torch.where(total > 0, total, torch.ones((), dtype=x.dtype, device=x.device))
    rank = torch.exp(-torch.xlogy(p, p).sum(-1))
    return torch.where(top == 0, torch.zeros((), dtype=rank.dtype, device=rank.device), rank)


def stable_rank(S: Tensor) -> Tensor:
    """Stable rank ``Σᵢ σᵢ² / σ₁² = ‖ΔW‖_F² / ‖ΔW‖₂²``, computed as ``Σᵢ (σᵢ/σ₁)²``.

    ``S: (..., m)`` non-negative. Returns ``(...)`` in ``[1, m]``, 0 for an all-zero spectrum,
    NaN for a spectrum holding NaN or Inf.
    """
    x, top = _normalized_spectrum(S)
    rank = x.square().sum(-1)
    rank = torch.where(torch.isinf(top), torch.full_like(rank, float("nan")), rank)
    return torch.where(top == 0, torch.zeros_like(rank), rank)


def frobenius_norm(S: Tensor) -> Tensor:
    """``‖ΔW‖_F = sqrt(Σᵢ σᵢ²)`` from singular values ``S: (..., m)``, as ``σ₁·sqrt(Σ (σᵢ/σ₁)²)``
    so that squares neither overflow nor underflow. Returns ``(...)``; 0 for an all-zero
    spectrum, Inf if a singular value is Inf (NaN if one is NaN)."""
    x, top = _normalized_spectrum(S)
    norm = top * x.square().sum(-1).sqrt()
    return torch.where(torch.isinf(top), top, norm)


def amplification_factor(U: Tensor, S: Tensor, Vh: Tensor, W0: Tensor) -> Tensor:
    """How much ΔW amplifies directions W₀ already has (the LoRA paper's §7.3, Table 7).

    ``‖ΔW‖_F / ‖Uᵀ W₀ V‖_F`` with ``U, S, Vh`` the thin SVD of ΔW as :func:`factored_svd`
    returns it (U, V: its top ``m = min(d, r, k)`` left/right singular vectors) and
    ``W0: (..., d, k)`` the base weight in the same (out, in) orientation. Computed as two thin
    products ``(Uᵀ W₀) V`` — O(d·k·m), W₀ is never decomposed.

    For a rank-deficient ΔW the directions of its zero singular values are arbitrary and so is
    their share of the denominator. Returns ``(...)``: 0 when ΔW = 0, Inf when ΔW ≠ 0 but
    ``Uᵀ W₀ V = 0``; float32 (float64 if an input is float64).
    """
    dtype = compute_dtype(U, S, Vh, W0)
    projected = (U.to(dtype).mT @ W0.to(dtype)) @ Vh.to(dtype).mT
    numerator = frobenius_norm(S.to(dtype))
    denominator = frobenius_norm(projected.flatten(-2))
    ratio = numerator / denominator
    return torch.where(numerator == 0, torch.zeros_like(ratio), ratio)


def intruder_dimensions(
    W0: Tensor,
    U: Tensor,
    S: Tensor,
    Vh: Tensor,
    *,
    top_k: int = 10,
    threshold: float = 0.5,
) -> Tensor:
    """Number of intruder dimensions of W₀ + ΔW (Shuttleworth et al. 2024, arXiv 2410.21228).

    Among the ``top_k`` leading **left** singular vectors ``u'ᵢ`` of ``W = W₀ + U diag(S) Vh``,
    counts those with ``maxⱼ |u'ᵢᵀ uⱼ| < threshold`` over all left singular vectors ``uⱼ`` of W₀
    — the output-space (ℝ^d) side, as peft's mitigation code
    (``peft.tuners.lora.intruders.reduce_intruder_dimension``, ε = 0.5, top-k = 10) compares.

    Cost: unlike the rest of this module, this takes two dense SVDs
    (``torch.linalg.svd(full_matrices=False)`` of W₀ and of W₀ + ΔW, ΔW materialized),
    O(d·k·min(d, k)) time and O(d·k) memory per matrix: meant to be optional and infrequent.

    Args:
        W0: base weight ``(..., d, k)``, (out, in) orientation like ΔW.
        U, S, Vh: the thin SVD of ΔW from :func:`factored_svd`.

    Returns:
        ``(...)`` int64 in ``0..min(top_k, d, k)``; -1 where W₀ or ΔW is not finite.
    """
    if top_k < 1:
        raise ValueError(f"intruder_dimensions: top_k must be ≥ 1, got {top_k}")
    dtype = compute_dtype(W0, U, S, Vh)
    W0 = W0.to(dtype)
    merged = W0 + (U.to(dtype) * S.to(dtype)[..., None, :]) @ Vh.to(dtype)
    W0 = W0.expand_as(merged)
    finite = torch.isfinite(merged).all(-1).all(-1) & torch.isfinite(W0).all(-1).all(-1)
    zero = torch.zeros((), dtype=dtype, device=merged.device)
    # LAPACK's SVD raises on non-finite input: decompose zeros there and report -1.
    W0 = torch.where(finite[..., None, None], W0, zero)
    merged = torch.where(finite[..., None, None], merged, zero)
    base_left = torch.linalg.svd(W0, full_matrices=False)[0]
    merged_left = torch.linalg.svd(merged, full_matrices=False)[0][..., :top_k]
    best = (merged_left.mT @ base_left).abs().amax(-1)
    count = (best < threshold).sum(-1)
    return torch.where(finite, count, torch.full_like(count, -1))


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
