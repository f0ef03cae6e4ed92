"""The LoRA rank a snapshot's analysis suggests, with its evidence: logic only (the report's text is
:mod:`lora_monitor.outputs.report`).

The evidence, strongest first:

1. **Directions shared with another run** (another rank or seed, given as the reference):
   :attr:`ModuleAnalysis.shared_directions`, the number of top directions whose top-k blocks
   overlap clearly above the random-subspace level (the precise rule is in
   :func:`lora_monitor.functional.shared_directions`). Directions found again by an independent
   run are what the data supports; the rest of a rank-64 update is, as the LoRA paper reads its
   Figure 3, mostly noise. Blocks are compared, never single vectors: when σ₁ ≈ σ₂ the top two
   directions swap between runs, φ(1, 1) ≈ 0 and yet the top-2 block is shared. The module's
   rank is the smallest k whose top-k blocks hold 90 % of the overlap beyond chance,
   k·φ(k, k) − k²/n, found within those directions.
2. **The spectrum of ΔW** alone (no reference): the rank holding 90 % of ‖ΔW‖_F². It cannot
   tell a reproducible direction from noise, and says so.

A rank is suggested per module, per projection (the largest over layers: one LoRA ``r`` must
hold every layer's update) and for the model (the largest over projections). The report says
plainly when the evidence is weak: too early (ΔW tiny next to W₀, or A still close to its
random initialization), a spectral gap too small to order the directions at the cut, or a
comparison whose smaller rank is fully shared (that rank may be too small).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import median
from typing import Optional

import torch
from torch import Tensor

from lora_monitor.adapters import ModuleKey
from lora_monitor.analysis.results import ModuleAnalysis
from lora_monitor.functional.bases import basis_info
from lora_monitor.functional.spectra import effective_rank, energy_rank, frobenius_norm, stable_rank

#: σ_k / σ_{k+1} below this (a gap under 10 %): directions k and k+1 are too close to be
#: ordered, so a cut between them, or φ(1, 1) when k = 1, is not meaningful.
GAP_RATIO = 1.1
#: Median ‖ΔW‖_F / ‖W₀‖_F below this: B has barely left its zero initialization.
EARLY_RELATIVE_NORM = 1e-3
#: Median φ(A₀, A, r, r) above this: A's row space is still mostly its random initialization.
EARLY_INIT_SIMILARITY = 0.5
#: The share of ‖ΔW‖_F² the spectral rank holds.
ENERGY = 0.9


def _few(modules: list, describe) -> str:
    """The first four modules described, and how many more there are."""
    listed = ", ".join(describe(m) for m in modules[:4])
    return listed + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")


def layer_name(key: ModuleKey) -> str:
    layer, projection = key
    return f"layer_{layer:02d}.{projection}"


def _gap(spectrum: Optional[Tensor], k: int) -> Optional[float]:
    """σ_k / σ_{k+1} (1-based k), None where the spectrum has no σ_{k+1}; inf after a zero."""
    if spectrum is None or k < 1 or spectrum.numel() <= k:
        return None
    below = float(spectrum[k])
    return float(spectrum[k - 1]) / below if below > 0 else float("inf")


def _overlap_rank(phi: Tensor, shared: int, n: int) -> int:
    """The smallest k whose top-k blocks hold 90 % of the overlap beyond chance found within
    the ``shared`` directions: ``E_k = k·φ(k, k) − k²/n`` (dimensions shared beyond what random
    subspaces share), k = the first with ``E_k ≥ 0.9 · max_{i ≤ shared} E_i``; 0 if nothing is
    shared. Like the energy rank, but of the overlap: a long tail of slightly shared directions
    (updates that live in one common, larger subspace) does not push the rank up."""
    if shared == 0:
        return 0
    i = torch.arange(1, shared + 1, dtype=phi.dtype)
    excess = i * torch.diagonal(phi)[:shared] - i.square() / n
    return int((excess < ENERGY * excess.max()).logical_not().nonzero()[0, 0]) + 1


def _smallest_gap(analysis: ModuleAnalysis, k: int) -> Optional[float]:
    """The smaller σ_k / σ_{k+1} of the two runs' basis spectra (the one that can swap)."""
    gaps = [
        g
        for g in (
            _gap(analysis.basis_singular_values, k),
            _gap(analysis.reference_basis_singular_values, k),
        )
        if g is not None
    ]
    return min(gaps) if gaps else None


@dataclass(frozen=True)
class ModuleEvidence:
    """What one module says about the rank.

    Attributes:
        key: ``(layer, projection)``.
        rank, reference_rank: r of the update and of the reference (None without one).
        shared_directions: directions shared with the reference clearly above chance (None
            without φ).
        block_overlap: φ(k, k) at the suggested k: how much of the top-k blocks is shared
            (None when nothing is shared); chance is k/n.
        phi_top: φ(1, 1), chance 1/n (``chance_top``).
        delta_w_norm, delta_w_sigma_max: ‖ΔW‖_F and ΔW's σ₁.
        delta_w_energy_rank, delta_w_effective_rank, delta_w_stable_rank: of ΔW's spectrum.
        delta_w_top_gap: σ₁/σ₂ of ΔW (None with a single singular value; inf after a zero).
        top_gap: with a reference, σ₁/σ₂ of the spectra of the basis matrix (A, B or ΔW), the
            smaller of the two runs' (the top directions of either can swap); else None.
        cut_gap: σ_k/σ_{k+1} at the suggested k of the matrix the cut is made in: the basis
            matrix, smaller of the two runs', with a reference; ΔW without one.
        delta_w_relative_norm, a_init_similarity: ‖ΔW‖_F/‖W₀‖_F and φ(A₀, A, r, r), None when
            unknown.
        suggested: the rank this module supports: with a reference, the smallest k whose top-k
            blocks hold 90 % of the overlap beyond chance within the ``shared`` directions; else
            the energy rank.
    """

    key: ModuleKey
    rank: int
    reference_rank: Optional[int]
    shared_directions: Optional[int]
    block_overlap: Optional[float]
    phi_top: Optional[float]
    chance_top: Optional[float]
    delta_w_norm: float
    delta_w_sigma_max: float
    delta_w_energy_rank: int
    delta_w_effective_rank: float
    delta_w_stable_rank: float
    delta_w_top_gap: Optional[float]
    top_gap: Optional[float]
    cut_gap: Optional[float]
    delta_w_relative_norm: Optional[float]
    a_init_similarity: Optional[float]
    suggested: int

    @classmethod
    def from_analysis(cls, analysis: ModuleAnalysis, use_phi: bool = True) -> ModuleEvidence:
        spectrum = analysis.singular_values
        phi = analysis.phi if use_phi else None
        shared = analysis.shared_directions if phi is not None else None
        energy = int(energy_rank(spectrum, ENERGY))
        if phi is None or shared is None or analysis.dimension is None:
            suggested = energy
        else:
            suggested = _overlap_rank(phi, shared, analysis.dimension)
        return cls(
            key=analysis.key,
            rank=spectrum.numel(),
            reference_rank=None if phi is None else phi.shape[0],
            shared_directions=shared,
            block_overlap=float(phi[suggested - 1, suggested - 1]) if phi is not None and suggested else None,
            phi_top=None if phi is None else float(phi[0, 0]),
            chance_top=None if phi is None or analysis.dimension is None else 1.0 / analysis.dimension,
            delta_w_norm=float(frobenius_norm(spectrum)),
            delta_w_sigma_max=float(spectrum[0]) if spectrum.numel() else 0.0,
            delta_w_energy_rank=energy,
            delta_w_effective_rank=float(effective_rank(spectrum)),
            delta_w_stable_rank=float(stable_rank(spectrum)),
            delta_w_top_gap=_gap(spectrum, 1),
            top_gap=_smallest_gap(analysis, 1) if phi is not None else None,
            cut_gap=None
            if not suggested
            else (_smallest_gap(analysis, suggested) if phi is not None else _gap(spectrum, suggested)),
            delta_w_relative_norm=analysis.delta_w_relative_norm,
            a_init_similarity=analysis.a_init_similarity,
            suggested=suggested,
        )


@dataclass(frozen=True)
class RankRecommendation:
    """The suggested LoRA rank, per projection and for the model, with the evidence.

    Attributes:
        basis: the basis φ was computed in.
        compared: True when the evidence is a comparison with a reference run.
        modules: the evidence of each module, by key order.
        projections: projection → suggested rank (None: no rank is supported).
        rank: the suggested rank for the whole model (None: no rank is supported).
        cautions: why the evidence is weak, one sentence each (empty when it is not).
        skipped: modules left out (their analysis had problems), with the reason.
    """

    basis: str
    compared: bool
    modules: list[ModuleEvidence]
    projections: dict[str, Optional[int]]
    rank: Optional[int]
    cautions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def weak(self) -> bool:
        return bool(self.cautions) or not self.compared


def _cautions(modules: list[ModuleEvidence], basis: str, compared: bool) -> list[str]:
    cautions = []
    if not compared:
        cautions.append(
            "spectrum only: no other run to compare with (a snapshot of the same run does not "
            "count), and the 90 %-energy rank cannot tell a direction that another run would "
            "find again from noise; compare with an adapter of another seed or rank "
            "(reference=<adapter directory>)"
        )
    norms = [m.delta_w_relative_norm for m in modules if m.delta_w_relative_norm is not None]
    if norms and median(norms) < EARLY_RELATIVE_NORM:
        cautions.append(
            f"too early: ΔW is still tiny next to W₀ (median ‖ΔW‖_F/‖W₀‖_F = {median(norms):.1e} "
            f"< {EARLY_RELATIVE_NORM:g}): B has barely left its zero initialization; train longer"
        )
    similarities = [m.a_init_similarity for m in modules if m.a_init_similarity is not None]
    if similarities and median(similarities) > EARLY_INIT_SIMILARITY and basis in ("A", "delta_w_right"):
        cautions.append(
            f"too early: A is still close to its random initialization (median φ(A₀, A, r, r) = "
            f"{median(similarities):.2f} > {EARLY_INIT_SIMILARITY}), so input-space φ mostly "
            f"shows the initialization; train longer or use basis 'delta_w_left'"
        )
    ties = [m for m in modules if m.top_gap is not None and m.top_gap < GAP_RATIO]
    if ties:
        matrix = basis_info(basis).matrix
        listed = _few(ties, lambda m: f"{layer_name(m.key)} ({matrix} σ₁/σ₂ = {m.top_gap:.3f})")
        cautions.append(
            f"{matrix}'s σ₁ ≈ σ₂ (gap under {GAP_RATIO - 1:.0%}) in {listed}: the top direction is "
            f"not determined and can swap with the second between runs, so φ(1, 1) says little "
            f"there; the suggestion reads the top-k blocks φ(k, k) instead"
        )
    cuts = [m for m in modules if m.suggested and m.cut_gap is not None and m.cut_gap < GAP_RATIO]
    if cuts:
        matrix = basis_info(basis).matrix if compared else "ΔW"
        listed = _few(cuts, lambda m: f"{layer_name(m.key)} (k = {m.suggested}, {matrix} σ_k/σ_k+1 = {m.cut_gap:.3f})")
        cautions.append(
            f"the gap in the spectrum at the suggested cut is too small to order the directions "
            f"in {listed}: rank k and k + 1 cannot be told apart there"
        )
    diffuse = [m for m in modules if m.block_overlap is not None and m.block_overlap < 0.5]
    if diffuse:
        listed = _few(
            diffuse, lambda m: f"{layer_name(m.key)} (φ({m.suggested}, {m.suggested}) = {m.block_overlap:.2f})"
        )
        cautions.append(
            f"partly shared: the top-k blocks share less than half of their dimensions in "
            f"{listed}: far above chance, but the runs agree on a direction only in part; "
            f"the suggested rank marks where the shared overlap ends, not a crisp cut"
        )
    full = [
        m
        for m in modules
        if m.shared_directions
        and m.reference_rank is not None
        and m.shared_directions == min(m.rank, m.reference_rank) > 1
    ]
    if full:
        cautions.append(
            f"every direction of the smaller rank is shared in {', '.join(layer_name(m.key) for m in full[:4])}"
            f"{' and more' if len(full) > 4 else ''}: the smaller rank may be too small, compare "
            f"with a larger one"
        )
    return cautions


def recommend_rank(
    analyses: Mapping[ModuleKey, ModuleAnalysis], basis: str, *, reference_is_run: bool = True
) -> RankRecommendation:
    """Suggest a LoRA rank from the analysis of one snapshot (or one pair of saved adapters).

    Args:
        analyses: :func:`lora_monitor.analysis.analyze`'s result, with φ against a reference
            run (another rank or seed) for the strongest evidence, or without.
        basis: the basis φ was computed in.
        reference_is_run: False when φ compares two snapshots of the same run (the monitor's
            ``reference="first"`` or ``"previous"``): what a run shares with its own past says
            it is stable, not that another run would find it, so φ is left out and the
            spectra decide.

    Returns:
        The :class:`RankRecommendation`; ``rank`` is None when no module supports any rank.
    """
    usable = {k: a for k, a in analyses.items() if not a.problems}
    skipped = [f"{layer_name(k)}: {'; '.join(a.problems)}" for k, a in sorted(analyses.items()) if a.problems]
    # Compare only when every usable module has φ: a half-compared model would mix two rules.
    compared = reference_is_run and bool(usable) and all(a.phi is not None for a in usable.values())
    modules = [ModuleEvidence.from_analysis(usable[k], use_phi=compared) for k in sorted(usable)]
    projections: dict[str, Optional[int]] = {}
    for m in modules:
        best = projections.get(m.key[1])
        value = m.suggested or None
        projections[m.key[1]] = value if best is None else max(best, value or 0)
    supported = [r for r in projections.values() if r]
    return RankRecommendation(
        basis=basis,
        compared=compared,
        modules=modules,
        projections=projections,
        rank=max(supported) if supported else None,
        cautions=_cautions(modules, basis, compared),
        skipped=skipped,
    )
