"""Scalar summaries of a spectrum: how many directions an update uses, by several measures.

Each takes singular values ``(..., m)`` (any order, non-negative) and returns ``(...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_monitor.functional.svd import compute_dtype


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


def gap_rank(S: Tensor, ratio: float = 1.5, floor: float = 0.0) -> Tensor:
    """The largest k ≤ m/2 with a spectral gap ``σ_k / σ_{k+1} ≥ ratio`` and ``σ_k² ≥ floor ·
    Σσ²`` (0 if none): how many leading directions stand clear of the rest.

    A LoRA update's noise (the gradients' noise, shaped by the activations) gives a steep but
    smooth spectrum, no flat bulk a threshold could find; a direction the task needs stands
    above it by a gap. Davis–Kahan: the top-k block is determined when the gap is large next
    to the perturbation; ``ratio`` 1.5 is a looser form of that bound. Capped at half the
    spectrum: the last singular values of B·A (near zero) have large ratios that say nothing;
    and, with ``floor``, to directions holding a share of the energy: a short, ragged noise tail
    (a small r on a small model) has gaps of its own among directions that hold almost none.

    Args:
        S: singular values ``(..., m)``, in decreasing order.
        ratio: the least σ_k / σ_{k+1} that counts as a gap, > 1.
        floor: the least share of Σσ² that σ_k² must hold for its gap to count, in [0, 1).

    Returns:
        ``(...)`` int64 in ``0..m/2``; 0 for a spectrum of fewer than 2 values, all zero, or
        holding NaN.
    """
    if not ratio > 1:
        raise ValueError(f"gap_rank: ratio must be above 1, got {ratio}")
    if not 0 <= floor < 1:
        raise ValueError(f"gap_rank: floor must be in [0, 1), got {floor}")
    m = S.shape[-1] // 2
    if m < 1:
        return torch.zeros(S.shape[:-1], dtype=torch.int64, device=S.device)
    S = S.to(compute_dtype(S))
    above, below = S[..., :m], S[..., 1 : m + 1]
    gaps = (above >= ratio * below) & (above > 0)  # σ_{k+1} = 0 after a nonzero σ_k: a gap
    if floor:
        gaps &= above.square() >= floor * S.square().sum(-1, keepdim=True)
    k = torch.arange(1, m + 1, device=S.device)
    return (gaps * k).amax(-1)
