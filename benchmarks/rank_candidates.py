"""Candidate single-run estimators of the LoRA rank a task needs, as pure tensor functions.

Inputs are the LoRA factors of the modules of one run, batched over modules: ``B (m, d, r)``,
``A (m, r, k)`` and the scaling s (ΔW = s·B·A), at the snapshot read and, for the estimators that
look at time, at an earlier snapshot of the same run (t/2). Every per-module estimator returns an
int64 tensor ``(m,)``; :func:`aggregate` turns it into a model-level rank. The functional probe
takes a callable ``loss_at(k)``: the loss of the model on one fixed (training) batch with every
ΔW cut to its top k directions.

They are the candidates ``benchmarks/rank_validation`` scored against known ranks; the rule
the package took from them (:mod:`lora_monitor.analysis.rank`) is max(``probe_log``, ``gap15``),
since refined to max(``probe_log``, ``gap15f``); implemented there anew, and checked against these
by the benchmark.

Candidates (named as in the benchmark's table):

- ``energy90``: the 90 %-energy rank of ΔW (the package's former rule).
- ``gd``: Gavish–Donoho optimal hard threshold for unknown noise, ``ω(β)·median σ`` with β = r/d
  (ΔW's noise lives in B, d×r: an r×d noise shape).
- ``mp``: directions above the Marchenko–Pastur bulk edge ``c·(1 + √β)``, the scale c fitted to
  the lower half of the spectrum (squared singular values against the MP quantiles).
- ``gap15`` / ``gap2``: the largest k ≤ r/2 with an eigengap σ_k/σ_{k+1} ≥ 1.5 / 2
  (:func:`spectral_gap`); ``gap15f``: ``gap15`` counting only directions that hold ≥ 1 % of
  ‖ΔW‖_F² (σ_k² ≥ 0.01·Σσ²), the package's ``RULE.gap_floor``.
- ``stab80`` / ``stab90``: the largest k (≤ r/2) such that the top-j blocks of ΔW's left singular
  vectors at t and at t/2 overlap φ(j, j) ≥ 0.8 / 0.9 for every j ≤ k (signal settles, noise
  keeps rotating).
- ``incr``: directions shared, clearly above chance (``functional.shared_directions``), by ΔW(t/2)
  and the part of the update made since, s·(B_t − B_{t/2})·A_t: the noise of the two is
  independent (fresh gradient noise), the signal is in both; read as the paper's overlap rank.
- ``growth``: the leading directions whose σ_i grew from t/2 to t by ≥ 25 % more than the
  median direction's (signal grows like t, noise like √t, the bulk all alike).
- ``probe90`` / ``probe95`` (:func:`functional_probe`): the smallest k whose joint truncation
  keeps 90 / 95 % of the loss reduction ``loss(0) − loss(full)`` on the probe batch;
  ``probe_log``: 95 % of the reduction in log loss (the benchmark's own knee rule, applied to
  the probe batch and to the update so far), measured to the lowest loss read on the way up the
  grid (the package's probe since 7 December 2026; before, to loss(r)).
- with a reference run (another seed): ``ref_dw``, ``ref_A``: the overlap rank of the directions
  shared clearly above chance in ΔW's left singular vectors / in A's right singular vectors
  (the paper's method, as the package's former reference rule read it: :func:`overlap_rank`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from lora_monitor import functional as F

ENERGY = 0.9


def svd(B: Tensor, A: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """ΔW = s·B·A's thin SVD from its factors (batched), float64 for the small spectra."""
    return F.factored_svd(B.double(), A.double(), scaling)


# ---------------------------------------------------------------------------- spectrum only


def energy90(S: Tensor, energy: float = ENERGY) -> Tensor:
    return F.energy_rank(S, energy).long()


def gd_omega(beta: float) -> float:
    """Gavish & Donoho (2014) ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43, the optimal hard threshold
    in units of the median singular value when the noise level is unknown (β ≤ 1)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gavish_donoho(S: Tensor, d: int) -> Tensor:
    """Number of singular values above ``ω(β)·median σ``, β = r/d (r = the number of values)."""
    r = S.shape[-1]
    tau = gd_omega(r / d) * S.median(-1).values
    return (S > tau[..., None]).sum(-1)


@lru_cache(maxsize=64)
def mp_quantiles(beta: float, n: int) -> Tensor:
    """The (i − ½)/n quantiles, i = 1..n, of the Marchenko–Pastur law of ratio β ≤ 1 (unit
    variance): the eigenvalues of XXᵀ/d for X ∈ ℝ^{r×d} with N(0, 1) entries, β = r/d."""
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    x = torch.linspace(a, b, 20001, dtype=torch.float64)
    density = torch.sqrt(((b - x) * (x - a)).clamp_min(0)) / (2 * math.pi * beta * x)
    steps = (density[1:] + density[:-1]) / 2 * torch.diff(x)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
    cdf = cdf / cdf[-1]
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    idx = torch.searchsorted(cdf, p).clamp(1, x.numel() - 1)
    w = (p - cdf[idx - 1]) / (cdf[idx] - cdf[idx - 1])
    return x[idx - 1] + w * (x[idx] - x[idx - 1])


def mp_edge(S: Tensor, d: int, fit_fraction: float = 0.5) -> Tensor:
    """Number of singular values above the Marchenko–Pastur bulk edge ``c·(1 + √β)``, β = r/d,
    with the noise scale c² fitted (least squares, σ² against MP quantiles) to the lowest
    ``fit_fraction`` of the spectrum, where signal directions are not."""
    r = S.shape[-1]
    beta = r / d
    q = mp_quantiles(beta, r).to(S.dtype)  # ascending
    lam = S.flip(-1).square()  # ascending
    n = max(1, int(r * fit_fraction))
    c2 = (lam[..., :n] * q[:n]).sum(-1) / q[:n].square().sum()
    edge = c2.sqrt() * (1 + math.sqrt(beta))
    return (S > edge[..., None]).sum(-1)


def spectral_gap(S: Tensor, ratio: float = 1.5, floor: float = 0.0) -> Tensor:
    """The largest k ≤ r/2 with an eigengap ``σ_k / σ_{k+1} ≥ ratio`` and ``σ_k² ≥ floor·Σσ²``
    (0 if none). ΔW's noise
    is anisotropic (gradient noise has the covariance of the activations and back-propagated
    errors), so its spectrum is steep but smooth — no Marchenko–Pastur bulk — and a learnt
    direction shows as a gap above it. Davis–Kahan: the top-k block is determined when the gap
    is large next to the perturbation (≈ σ_{k+1}); a ratio of 2 is that bound, 1.5 a looser one.
    Capped at r/2: the smallest singular values of B·A (near zero) have large ratios that say
    nothing; with ``floor``, to directions holding that share of ‖ΔW‖_F² (a short noise tail has
    gaps of its own among directions that hold almost nothing)."""
    m = max(1, S.shape[-1] // 2)
    tiny = torch.finfo(S.dtype).tiny
    gaps = S[..., :m] / S[..., 1 : m + 1].clamp_min(tiny) if S.shape[-1] > 1 else torch.zeros_like(S)
    found = gaps >= ratio
    if floor:
        found &= S[..., : gaps.shape[-1]].square() >= floor * S.square().sum(-1, keepdim=True)
    i = torch.arange(1, gaps.shape[-1] + 1, device=S.device)
    return (found * i).amax(-1)


# ------------------------------------------------------------------------------ over time


def stability(U: Tensor, U_prev: Tensor, threshold: float) -> Tensor:
    """The leading run of settled blocks: the largest k ≤ r/2 with φ(U[:, :j], U_prev[:, :j]) ≥
    threshold for every j ≤ k (0 if φ(1, 1) is below), U the left singular vectors of ΔW at t,
    U_prev at t/2. Capped at r/2: the two whole r-dimensional column spaces of B overlap by
    construction (B_t = B_{t/2} + its increments), so φ(r, r) says nothing."""
    phi = F.subspace_similarity(U, U_prev)
    m = max(1, min(phi.shape[-2:]) // 2)
    diag = torch.diagonal(phi[..., :m, :m], dim1=-2, dim2=-1)
    return torch.cumprod((diag >= threshold).to(torch.int64), -1).sum(-1)


def overlap_rank(phi: Tensor, n: int, energy: float = ENERGY, false_alarm: float = 1e-3) -> Tensor:
    """The package's former rule with a reference (an overlap rank over
    ``functional.shared_directions``), batched: among the ``shared`` directions found clearly
    above chance, the smallest k whose top-k blocks hold ``energy`` of the overlap beyond chance,
    ``E_k = k·φ(k, k) − k²/n``; 0 if nothing is shared."""
    shared = F.shared_directions(phi, n, false_alarm=false_alarm)
    m = min(phi.shape[-2:])
    i = torch.arange(1, m + 1, dtype=phi.dtype, device=phi.device)
    excess = i * torch.diagonal(phi[..., :m, :m], dim1=-2, dim2=-1) - i.square() / n
    excess = torch.where(i <= shared[..., None], excess, torch.full_like(excess, -math.inf))
    best = excess.amax(-1, keepdim=True)
    first = (excess >= energy * best).to(torch.int64).argmax(-1) + 1
    return torch.where(shared > 0, first, torch.zeros_like(first))


def increment_shared(B: Tensor, A: Tensor, B_prev: Tensor, A_prev: Tensor, scaling: float) -> Tensor:
    """Overlap rank (:func:`overlap_rank`) between ΔW(t/2)'s left singular vectors and those of
    the B-part of the update since, s·(B_t − B_{t/2})·A_t: fresh noise against old noise, the
    same signal in both (a split-half of one run instead of a second run)."""
    U_prev = svd(B_prev, A_prev, scaling)[0]
    U_inc = svd(B - B_prev, A, scaling)[0]
    return overlap_rank(F.subspace_similarity(U_prev, U_inc), B.shape[-2])


def growth(S: Tensor, S_prev: Tensor, excess: float = 0.25) -> Tensor:
    """The number of leading directions whose σ_i(t)/σ_i(t/2) exceeds the median direction's
    ratio by the factor ``1 + excess``."""
    g = S / S_prev.clamp_min(torch.finfo(S.dtype).tiny)
    bulk = g.median(-1, keepdim=True).values
    fast = g >= (1 + excess) * bulk
    # leading run of True: position of the first False
    leading = torch.cumprod(fast.to(torch.int64), -1).sum(-1)
    return leading


def spectral_candidates(B: Tensor, A: Tensor, scaling: float, B_prev: Tensor, A_prev: Tensor) -> dict[str, Tensor]:
    """Every single-run per-module candidate except the probe: name → ``(m,)`` int64."""
    U, S, _ = svd(B, A, scaling)
    U_prev, S_prev, _ = svd(B_prev, A_prev, scaling)
    d = B.shape[-2]
    return {
        "energy90": energy90(S),
        "gd": gavish_donoho(S, d),
        "mp": mp_edge(S, d),
        "gap15": spectral_gap(S, 1.5),
        "gap15f": spectral_gap(S, 1.5, floor=0.01),
        "gap2": spectral_gap(S, 2.0),
        "stab80": stability(U, U_prev, 0.8),
        "stab90": stability(U, U_prev, 0.9),
        "incr": increment_shared(B, A, B_prev, A_prev, scaling),
        "growth": growth(S, S_prev),
    }


def reference_candidates(
    B: Tensor, A: Tensor, B_ref: Tensor, A_ref: Tensor, scaling: float, scaling_ref: float
) -> dict[str, Tensor]:
    """The paper's method against another run: overlap rank in ΔW's left basis and in A's."""
    U = svd(B, A, scaling)[0]
    U_ref = svd(B_ref, A_ref, scaling_ref)[0]
    VA = F.singular_basis(B.double(), A.double(), scaling, "A")
    VA_ref = F.singular_basis(B_ref.double(), A_ref.double(), scaling_ref, "A")
    return {
        "ref_dw": overlap_rank(F.subspace_similarity(U, U_ref), B.shape[-2]),
        "ref_A": overlap_rank(F.subspace_similarity(VA, VA_ref), A.shape[-1]),
    }


# --------------------------------------------------------------------------- functional probe


def functional_probe(
    loss_at: Callable[[int], float],
    r: int,
    keep: float = 0.9,
    grid: Optional[Sequence[int]] = None,
    log: bool = False,
    to_lowest: Optional[float] = None,
) -> int:
    """The smallest k (on ``grid``, capped at r) whose joint truncation of every ΔW to its top k
    directions keeps ``keep`` of the loss reduction of the whole update on the probe batch:
    ``loss(k) ≤ loss(r) + (1 − keep)·(loss(0) − loss(r))``; 0 when the update does not reduce
    the loss. With ``log``, the reduction is measured in log loss (the benchmark's knee rule:
    ``log loss(k) ≤ log loss(r) + (1 − keep)·(log loss(0) − log loss(r))``). Scanned upwards from
    k = 1.

    With ``to_lowest`` (a share, the package's ``RULE.keep_high``), the reduction is measured to
    the lowest loss met instead of loss(r), as the knee rule measures it to the lowest point of
    its curve, and the grid is read upwards as the package reads it: until some k read keeps
    ``to_lowest`` of the reduction to the lowest loss so far and k's loss is not a new lowest."""
    loss0, full = loss_at(0), loss_at(r)
    if loss0 - full <= 0 or full <= 0:
        return 0
    ks = sorted({k for k in (grid or range(1, r + 1)) if 0 < k < r})
    if to_lowest is None:
        bar = full * (loss0 / full) ** (1 - keep) if log else full + (1 - keep) * (loss0 - full)
        return next((k for k in ks if loss_at(k) <= bar), r)
    read = {r: full}

    def bar(share: float) -> float:
        lowest = min(read.values())
        return lowest * (loss0 / lowest) ** (1 - share) if log else lowest + (1 - share) * (loss0 - lowest)

    for k in ks:
        before = min(read.values())
        read[k] = loss_at(k)
        if read[k] >= before and any(j <= k and x <= bar(to_lowest) for j, x in read.items()):
            break
    return next(k for k in sorted(read) if read[k] <= bar(keep))


# ------------------------------------------------------------------------------ aggregation


def aggregate(values: Tensor) -> dict:
    """Model-level readings of a per-module estimate: ``max`` (one r serves every layer: the
    largest need), ``second`` (the 2nd largest module: robust to one odd module), ``median``."""
    v = sorted((int(x) for x in values.tolist()), reverse=True)
    return {"max": v[0], "second": v[1] if len(v) > 1 else v[0], "median": float(statistics.median(v))}
