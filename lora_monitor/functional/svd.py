"""The SVD of a LoRA update ΔW = s·B·A from its factors, never forming ΔW, and its bases.

Notation (see ``docs/maths.md``): B ∈ ℝ^{d×r} (peft's ``lora_B``), A ∈ ℝ^{r×k} (``lora_A``), s the
``scaling``. Cost O((d + k)·r²) instead of O(d·k·min(d, k)).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from lora_monitor.functional import thin_qr
from lora_monitor.functional.bases import Basis, basis_info

Scaling = Union[float, Tensor]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the analysis runs in: float64 if any input is float64, or if float32 matrix
    products on the inputs' device are rounded below float32 now (TF32, bfloat16 matmul
    precision, autocast: :func:`~lora_monitor.functional.thin_qr.exact_matmul`); else float32.

    float64 products are never rounded that way, so the numbers do not depend on a global
    switch the user set for training, and the user's settings are never touched (changing them
    from the analysis' worker thread would change the training thread's products too).
    """
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    devices = {t.device for t in tensors}
    if any(device.type in ("cpu", "cuda") and not thin_qr.exact_matmul(device) for device in devices):
        return torch.float64
    return torch.float32


def factored_svd(B: Tensor, A: Tensor, scaling: Scaling = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``scaling · B @ A`` computed from its factors, never forming the product.

    B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), then the small SVD R_B R_Aᵀ = U_c Σ V_cᵀ gives
    ΔW = Q_B U_c (s·Σ) (Q_A V_c)ᵀ. Cost O((d + k)·r²) and memory O((d + k)·r) instead of
    O(d·k·min(d, k)) and d·k. Each QR comes from the factor's Gram matrix where that is exact
    (well-conditioned factors, the usual case: two GEMMs per factor in all, ``U = B (R_B⁻¹ U_c)``),
    else from Householder QR (see :func:`~lora_monitor.functional.thin_qr.gram_cholesky`).

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
    if not basis_info(basis).of_update:
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
    well-conditioned (:func:`~lora_monitor.functional.thin_qr.gram_cholesky`), nothing n×r is formed at
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
    info = basis_info(basis)
    dtype = compute_dtype(B, A)
    B, A = B.to(dtype), A.to(dtype)
    scaling = torch.as_tensor(scaling, dtype=dtype, device=B.device)
    on_b = info.space == "output"
    p_b, t_b, r_b, exp_b, finite_b = thin_qr.orthogonal_factor(B, with_q=on_b)
    p_a, t_a, r_a, exp_a, finite_a = thin_qr.orthogonal_factor(A.mT, with_q=not on_b)
    finite = finite_b & finite_a & torch.isfinite(scaling)
    Q, T = (p_b, t_b) if on_b else (p_a, t_a)
    assert Q is not None  # formed for the factor the basis lives on
    core = r_b @ r_a.mT
    magnitude = scaling.abs()[..., None] * exp_b[..., None] * exp_a[..., None]
    if info.of_update:
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
