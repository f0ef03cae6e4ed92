"""Thin QR of batches of tall factors (B, or Aᵀ), as exact as Householder QR on every input.

The functional layer's kernel (:mod:`lora_monitor.functional.svd` builds the factored SVD, the bases
and φ on it): each matrix of a batch takes the Gram path — one GEMM XᵀX and its Cholesky factor,
at matrix-multiply speed — where :func:`gram_cholesky` certifies that exact, and Householder QR
(LAPACK, with a power-of-two scaling and zeroing of non-finite matrices) elsewhere. Tensors in,
tensors out, on the inputs' device, no I/O.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, overload

import torch
from torch import Tensor


def _power_of_two(max_abs: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^e ≈ max_abs`` (exact power of two), clamped so that ``2^±e`` stays a normal number of
    ``dtype``; 1 for a zero (or non-finite) maximum."""
    bound = int(math.log2(torch.finfo(dtype).max)) - 20
    _, exponent = torch.frexp(max_abs)
    return torch.exp2(exponent.clamp(-bound, bound).to(dtype))


def _max_abs(X: Tensor) -> Tensor:
    """``max |X|`` over the last two dims, NaN if one entry is NaN: one pass, no |X| temporary;
    it is finite exactly where the matrix is, so it doubles as the finiteness test."""
    return torch.linalg.vector_norm(X, float("inf"), dim=(-2, -1))


def _normalized_qr(X: Tensor, max_abs: Tensor, finite: Tensor, with_q: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """Thin Householder QR of ``X: (..., n, r)`` brought to magnitude ~1 by an exact power of two
    and zeroed where ``finite`` is False (LAPACK raises on NaN/Inf): ``(Q or None, R, 2^e)``.

    The scaling keeps the r×r core product of two such factors from overflowing or
    underflowing. On the CPU, when every matrix is finite and of moderate magnitude (the usual
    case), X goes to LAPACK as it is and ``2^e = 1``: the check is free there, and it saves a
    copy as large as X (the QR copies its input anyway). Elsewhere a host round trip would cost
    more than the copy. Without ``with_q`` only R is computed (geqrf without orgqr: about half
    the cost), for the factor whose singular vectors are not needed.
    """
    power = _power_of_two(max_abs, X.dtype).expand(finite.shape)
    moderate = math.log2(torch.finfo(X.dtype).max) / 4  # float32: |e| ≤ 32
    if X.device.type == "cpu" and bool((finite & (power.log2().abs() <= moderate)).all()):
        power = torch.ones_like(power)
    else:
        X = X * (1 / power)[..., None, None]
        X.masked_fill_(~finite[..., None, None], 0.0)
    if not with_q:
        return None, torch.linalg.qr(X, mode="r")[1], power
    Q, R = torch.linalg.qr(X)
    return Q, R, power


#: The Gram path takes a factor X only where every eigenvalue of XᵀX lies within this factor of
#: their mean, so that κ(X)² ≤ 4 (see :func:`gram_cholesky`).
GRAM_SPREAD = 2.0


def exact_matmul(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` are computed in float32 here and now, not in
    TF32 or bfloat16: ``torch.set_float32_matmul_precision("high"/"medium")``, a backend's
    ``fp32_precision`` (``"tf32"``, ``"bf16"``), the legacy ``allow_tf32`` flags, and an autocast
    region of this thread (Lightning's ``precision="bf16-mixed"``, a plain loop's
    ``torch.autocast``) all round them. Any doubt reads as no. Only reads the settings."""
    if device.type in ("cpu", "cuda") and _autocast_enabled(device.type):
        return False
    try:
        # torch's stubs do not declare these newer settings.
        backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul  # type: ignore[attr-defined]
        precision = backend.fp32_precision
        if precision == "none":  # not set for this backend: the global setting applies
            precision = torch.backends.fp32_precision  # type: ignore[attr-defined]
        return precision in ("none", "ieee")
    except (AttributeError, RuntimeError):  # a torch without the per-backend settings
        try:
            return torch.get_float32_matmul_precision() == "highest"
        except RuntimeError:
            return False


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def gram_cholesky(X: Tensor) -> tuple[Optional[Tensor], Tensor]:
    """``(R, exact)`` for ``X: (N, n, r)``: R upper-triangular with ``RᵀR = XᵀX`` (Cholesky of the
    Gram matrix, one GEMM), and ``exact: (N,)`` where ``Q = X R⁻¹`` and R are as accurate as a
    Householder QR's, so that they may replace it. R is None where no matrix can take the Gram
    path: an empty batch, r = 0, r > n (XᵀX is singular), or matrix products rounded below the
    dtype's precision (:func:`exact_matmul`).

    A Gram matrix squares the condition number: ``Q = X R⁻¹`` loses orthogonality by about
    ``ε_G·κ(X)²``, ε_G the relative rounding error of the product XᵀX (a few units of roundoff:
    measured 4–7 u for n = 64…16384), and forming it with R⁻¹ loses about ``u·κ(X)·√r`` more; R
    carries the same relative error. ``exact`` is certified per matrix, from the Gram matrix
    itself, at matrix-multiply cost: the mean squared column norm t (the mean eigenvalue) lies
    well inside the dtype's range (its squares can neither overflow nor underflow), and
    ``XᵀX − (t/2)·I`` and ``2t·I − XᵀX`` both have Cholesky factors, i.e. every eigenvalue lies in
    [t/2, 2t] and κ(X)² ≤ 4: the Gram path then errs by at most four Gram roundings (measured
    at 4096 × 64: ‖QᵀQ − I‖ 4·10⁻⁷, Householder 8·10⁻⁷; factored_svd's U and V 1.4·10⁻⁶ on
    either path). Zero, rank-deficient, badly conditioned (B soon after its zero
    initialization), non-finite and extreme factors fail the test, and go to Householder QR.
    """
    count, n, r = X.shape
    if not (count and 0 < r <= n and (X.dtype == torch.float64 or exact_matmul(X.device))):
        return None, torch.zeros(count, dtype=torch.bool, device=X.device)
    G = X.mT @ X
    mean = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    limit = 2.0 ** (math.frexp(torch.finfo(G.dtype).max)[1] // 2 - 4)  # float32: 2^60
    in_range = (mean >= 1 / limit) & (mean <= limit)  # False for NaN and Inf
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    # LAPACK gets the identity instead of a matrix that failed already (NaN, Inf, zero).
    G = torch.where(in_range[:, None, None], G, eye)
    shift = torch.where(in_range, mean, 1.0)[:, None, None] * eye
    # One batched call: the factor itself, and the two certificates (only their success counts).
    factors, info = torch.linalg.cholesky_ex(
        torch.stack([G, G - shift / GRAM_SPREAD, shift * GRAM_SPREAD - G]), upper=True
    )
    return factors[0], in_range & (info == 0).all(0)


@overload
def orthogonal_factor(X: Tensor, with_q: Literal[True]) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]: ...


@overload
def orthogonal_factor(X: Tensor, with_q: bool) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor]: ...


def orthogonal_factor(X: Tensor, with_q: bool) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor]:
    """Thin QR of ``X: (..., n, r)`` (in the compute dtype), by whichever path is exact for each
    matrix of the batch: ``(P, T, R, 2^e, finite)`` with ``X = 2^e·Q R`` and ``Q = P T⁻¹``
    orthonormal.

    Where the Gram path is exact (:func:`gram_cholesky`), P is X itself and T = R: Q is never
    formed, so that a caller multiplies X by ``T⁻¹ W`` (r×r) once, or not at all (φ against a
    reference needs ``Uᵀ X``, which is cheaper still). Elsewhere it is a Householder QR
    (:func:`_normalized_qr`, with its power-of-two scaling and zeroing of non-finite matrices),
    P its Q and T the identity. T is None when every matrix took the Householder path, P is None
    without ``with_q``. ``finite`` is False where X holds NaN or Inf.

    Deciding costs one host round trip (which matrices go to LAPACK); the Householder path runs
    on those matrices only.
    """
    batch, (n, r) = X.shape[:-2], X.shape[-2:]
    flat = X.reshape(-1, n, r)
    count = flat.shape[0]
    R, exact = gram_cholesky(flat)
    householder = (~exact).nonzero().squeeze(-1)
    if len(householder) == count:
        max_abs = _max_abs(flat)
        finite = torch.isfinite(max_abs)
        P, R, power = _normalized_qr(flat, max_abs, finite, with_q)
        T: Optional[Tensor] = None
    else:
        assert R is not None  # some matrices took the Gram path
        P, gram_R = (flat if with_q else None), R
        power = torch.ones(count, dtype=X.dtype, device=X.device)
        finite = torch.ones(count, dtype=torch.bool, device=X.device)
        if len(householder):
            rest = flat[householder]
            max_abs = _max_abs(rest)
            rest_finite = torch.isfinite(max_abs)
            rest_q, rest_r, rest_power = _normalized_qr(rest, max_abs, rest_finite, with_q)
            eye = torch.eye(r, dtype=X.dtype, device=X.device).expand(len(householder), r, r)
            R = gram_R.index_copy(0, householder, rest_r)
            gram_R = gram_R.index_copy(0, householder, eye)
            power = power.index_copy(0, householder, rest_power)
            finite = finite.index_copy(0, householder, rest_finite)
            if with_q:
                assert rest_q is not None
                P = flat.index_copy(0, householder, rest_q)
        T = gram_R

    def unflatten(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.reshape(*batch, *t.shape[1:])

    return unflatten(P), unflatten(T), R.reshape(*batch, *R.shape[1:]), power.reshape(batch), finite.reshape(batch)


def solve(T: Optional[Tensor], W: Tensor, left: bool = True) -> Tensor:
    """``T⁻¹ W`` (``W T⁻¹`` without ``left``) for the T of :func:`orthogonal_factor`
    (upper-triangular; None: the identity)."""
    return W if T is None else torch.linalg.solve_triangular(T, W, upper=True, left=left)
