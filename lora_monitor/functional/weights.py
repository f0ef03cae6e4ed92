"""What an update does to the base weight W₀: amplification (the paper's §7.3) and intruder
dimensions (Shuttleworth et al. 2024). The only functions here that read W₀ (d×k), or blocks of
it (a W₀ split across processes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lora_monitor.functional.spectra import frobenius_norm
from lora_monitor.functional.svd import compute_dtype


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
    return amplification_from_projection(S, block_projection(U.to(dtype), Vh.to(dtype), W0.to(dtype)))


def block_projection(
    U: Tensor, Vh: Tensor, block: Tensor, rows: slice = slice(None), columns: slice = slice(None)
) -> Tensor:
    """``U[rows]ᵀ · block · Vh[:, columns]ᵀ``: the share of ``Uᵀ W₀ V`` that a block of W₀ holds.

    ``block`` is ``W₀[rows, columns]``; summed over blocks that tile W₀ — each process's shard
    of a W₀ split across processes — it is ``Uᵀ W₀ V`` (``(..., m, m)``), so that W₀ is never
    whole anywhere. O(rows·columns·m).
    """
    dtype = compute_dtype(U, Vh, block)
    return (U[..., rows, :].to(dtype).mT @ block.to(dtype)) @ Vh[..., :, columns].to(dtype).mT


def run_projection(U: Tensor, Vh: Tensor, values: Tensor, first: int) -> Tensor:
    """The share of ``Uᵀ W₀ V`` that a run of W₀'s entries in row-major order holds:
    ``W₀.flatten()[first : first + len(values)]`` (W₀ of ``Vh.shape[-1]`` columns), possibly
    starting and ending mid-row — how FSDP2 shards the packed storage of a 4-bit W₀.

    Unbatched: ``U (d, m)``, ``Vh (m, k)``, ``values (n,)``. Returns ``(m, m)``.
    """
    dtype = compute_dtype(U, Vh, values)
    U, Vh, values = U.to(dtype), Vh.to(dtype), values.to(dtype)
    k = Vh.shape[-1]
    total = torch.zeros(U.shape[-1], Vh.shape[-2], dtype=dtype, device=U.device)
    position, end = first, first + values.numel()
    row, column = divmod(position, k)
    if column and position < end:  # the rest of a row begun on another shard
        stop = min(end, (row + 1) * k)
        total += torch.outer(U[row], Vh[:, column : column + stop - position] @ values[: stop - first])
        position = stop
    rows = (end - position) // k
    if rows:
        start = position // k
        whole = values[position - first : position - first + rows * k].view(rows, k)
        total += (U[start : start + rows].mT @ whole) @ Vh.mT
        position += rows * k
    if position < end:  # the beginning of a row that ends on another shard
        part = values[position - first :]
        total += torch.outer(U[position // k], Vh[:, : part.numel()] @ part)
    return total


def amplification_from_projection(S: Tensor, projected: Tensor) -> Tensor:
    """``‖ΔW‖_F / ‖Uᵀ W₀ V‖_F`` from ΔW's singular values ``S (..., m)`` and the projection
    ``Uᵀ W₀ V (..., m, m)`` (:func:`block_projection`, or its sum over the blocks of W₀)."""
    dtype = compute_dtype(S, projected)
    numerator = frobenius_norm(S.to(dtype))
    ratio = numerator / frobenius_norm(projected.to(dtype).flatten(-2))
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
