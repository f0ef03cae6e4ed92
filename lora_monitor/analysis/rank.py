"""The LoRA rank a run needs, with its evidence: logic only (the report's text is
:mod:`lora_monitor.outputs.rank_text`).

The rule (every constant of it: :mod:`lora_monitor.analysis.rank_rule`) was chosen, and is
checked, by ``benchmarks/rank_validation`` against tasks whose needed rank is known; how often
it is right is in docs/rank.md, "How right it is". Two readings, and the suggestion is the larger:

1. **The functional probe** (:mod:`lora_monitor.analysis.probe`): the smallest k whose joint
   truncation of every monitored ΔW keeps 95 % of the log-loss reduction on the probe batch.
   It reads the task: directions that only add noise never lower the loss.
2. **ΔW's spectral gaps** (:func:`lora_monitor.functional.gap_rank`): per module, the largest
   k ≤ r/2 with σ_k/σ_{k+1} ≥ 1.5 and σ_k² ≥ 1 % of ‖ΔW‖_F² — directions standing clear of the
   update's smooth noise spectrum; the largest over layers per projection (one ``r`` serves every layer), the largest
   over projections for the model. Free (no forward pass), and the only reading of an adapter
   saved on disk.

What the validation showed decides the strength said beside it: the probe and the gaps more
than twice apart happened only early in training (and the probe was then wrong), so that
reads as weak; without a probe the gaps alone are weak evidence (they came right later in
training than the probe). The probe needing more than half of the r directions says r may be too
small.
Directions shared with another run (the paper's φ) are shown beside, not used: in ΔW's bases
they count the update's structured noise, which two seeds share too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Optional

from torch import Tensor

from lora_monitor.adapters import ModuleKey
from lora_monitor.adapters.kinds import GROUPS, TrainedModule, block_order, module_group
from lora_monitor.analysis.probe import ProbeReading
from lora_monitor.analysis.rank_rule import RULE
from lora_monitor.analysis.results import ModuleAnalysis, spectral_statistics


def layer_name(key: ModuleKey) -> str:
    layer, projection = key
    return f"layer_{layer:02d}.{projection}"


def _ratio(spectrum: Tensor, k: int) -> Optional[float]:
    """σ_k / σ_{k+1} (1-based k), None where the spectrum has no σ_{k+1}; inf after a zero."""
    if k < 1 or spectrum.numel() <= k:
        return None
    below = float(spectrum[k])
    return float(spectrum[k - 1]) / below if below > 0 else float("inf")


@dataclass(frozen=True)
class ModuleEvidence:
    """What one module's spectrum (and, beside a reference run, φ) says.

    Attributes:
        key: ``(layer, projection)``.
        rank, reference_rank: r of the update and of the reference (None without one).
        delta_w_gap_rank: the spectral reading: the largest k ≤ r/2 with σ_k/σ_{k+1} ≥
            ``RULE.gap_ratio`` and σ_k² ≥ ``RULE.gap_floor`` · ‖ΔW‖_F².
        delta_w_gap: σ_k/σ_{k+1} at that k (None for k = 0).
        shared_directions: directions shared with another run clearly above chance (None
            without one); phi_top: φ(1, 1), chance 1/n (``chance_top``).
        delta_w_norm, delta_w_sigma_max: ‖ΔW‖_F and ΔW's σ₁.
        delta_w_energy_rank, delta_w_effective_rank, delta_w_stable_rank: of ΔW's spectrum.
        delta_w_top_gap: σ₁/σ₂ of ΔW (None with a single singular value; inf after a zero).
        delta_w_relative_norm: ‖ΔW‖_F/‖W₀‖_F, None without W₀.
    """

    key: ModuleKey
    rank: int
    reference_rank: Optional[int]
    delta_w_gap_rank: int
    delta_w_gap: Optional[float]
    shared_directions: Optional[int]
    phi_top: Optional[float]
    chance_top: Optional[float]
    delta_w_norm: float
    delta_w_sigma_max: float
    delta_w_energy_rank: int
    delta_w_effective_rank: float
    delta_w_stable_rank: float
    delta_w_top_gap: Optional[float]
    delta_w_relative_norm: Optional[float]

    @classmethod
    def from_analysis(cls, analysis: ModuleAnalysis, with_reference: bool = False) -> ModuleEvidence:
        spectrum = analysis.singular_values
        statistics = spectral_statistics(spectrum)
        gap = int(statistics["delta_w_gap_rank"])
        phi = analysis.phi if with_reference else None
        return cls(
            key=analysis.key,
            rank=spectrum.numel(),
            reference_rank=None if phi is None else phi.shape[0],
            delta_w_gap_rank=gap,
            delta_w_gap=_ratio(spectrum, gap) if gap else None,
            shared_directions=analysis.shared_directions if phi is not None else None,
            phi_top=None if phi is None else float(phi[0, 0]),
            chance_top=None if phi is None or analysis.dimension is None else 1.0 / analysis.dimension,
            delta_w_norm=statistics["delta_w_norm"],
            delta_w_sigma_max=statistics["delta_w_sigma_max"],
            delta_w_energy_rank=int(statistics["delta_w_energy_rank"]),
            delta_w_effective_rank=statistics["delta_w_effective_rank"],
            delta_w_stable_rank=statistics["delta_w_stable_rank"],
            delta_w_top_gap=_ratio(spectrum, 1),
            delta_w_relative_norm=analysis.delta_w_relative_norm,
        )


@dataclass(frozen=True)
class KindAnswer:
    """The rank one group of modules needs (attention or the MLP), read with the other whole.

    Attributes:
        group: ``"attention"`` or ``"mlp"``.
        rank: the larger of the group's probe rank and its largest spectral gap rank (None:
            nothing supports a rank).
        probe: the probe with this group's ΔW cut and the other group's whole (None without).
        spectral: the largest gap rank over the group's modules (None: no gap).
        r: the largest LoRA rank of the group's modules.
        projections: the group's projections.
    """

    group: str
    rank: Optional[int]
    probe: Optional[ProbeReading]
    spectral: Optional[int]
    r: int
    projections: tuple[str, ...]

    @property
    def too_small(self) -> bool:
        """The group's probe needs more than half the directions of its r: more might help."""
        return _needs_more(self.probe, self.r)


@dataclass(frozen=True)
class RankRecommendation:
    """The suggested LoRA rank, with its range, its strength and its evidence.

    Attributes:
        rank: the suggestion for the model: the larger of the probe's reading and the largest
            spectral reading (None: nothing supports a rank yet).
        low, high: the range it likely lies in: from the probe's rank keeping 90 % of the
            log-loss reduction to the larger of its rank keeping 98 % and the spectral reading
            (None without a probe).
        projections: projection → its spectral reading (the largest over layers; None where
            no module shows a gap).
        probe: the functional probe's reading (None where none was read).
        modules: each module's evidence, by key order.
        r: the largest LoRA rank of the modules.
        basis: the basis φ was computed in (for the tables' headers).
        compared: whether φ against another run is shown beside (never used for the rank).
        cautions: why the evidence is weak, one sentence each (empty when it is not).
        skipped: modules left out (their analysis had problems), with the reason.
        kinds: where the modules include both attention and MLP ones, each group's answer
            (:class:`KindAnswer`); :attr:`per_kind` says whether they differ enough to give each
            its own rank.
        trained: the adapter's modules with their shapes (for the per-kind ``rank_pattern`` and
            the parameters it saves; empty where not known).
        not_covered: the projections the adapter trains that the monitor was told to leave out
            (``target_modules``): the answer does not cover them.
    """

    rank: Optional[int]
    low: Optional[int]
    high: Optional[int]
    projections: dict[str, Optional[int]]
    probe: Optional[ProbeReading]
    modules: list[ModuleEvidence]
    r: int
    basis: str = "A"
    compared: bool = False
    cautions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    kinds: dict[str, KindAnswer] = field(default_factory=dict)
    trained: tuple[TrainedModule, ...] = ()
    not_covered: tuple[str, ...] = ()

    @property
    def per_kind(self) -> Optional[dict[str, int]]:
        """Each group's rank where attention and the MLP need ranks more than
        ``RULE.kind_split`` apart (``{"attention": 2, "mlp": 8}``); else None (one rank serves)."""
        ranks = {group: answer.rank for group, answer in self.kinds.items()}
        if len(ranks) < 2 or any(rank is None for rank in ranks.values()):
            return None
        known = [rank for rank in ranks.values() if rank is not None]
        if max(known) <= RULE.kind_split * min(known):
            return None
        return {group: rank for group, rank in ranks.items() if rank is not None}

    def module_ranks(self) -> dict[str, int]:
        """Each trained module's suggested rank, by path: its group's where :attr:`per_kind`
        splits them, else the model's (never above the module's own r; a module of no group gets
        the model's). Empty without a suggestion or without :attr:`trained`."""
        if self.rank is None:
            return {}
        split = self.per_kind or {}
        ranks = {}
        for module in self.trained:
            wanted = split.get(module.group or "", self.rank) if split else self.rank
            ranks[module.name] = min(wanted, module.rank)
        return ranks

    def parameters(self) -> tuple[int, int, int]:
        """LoRA parameters of the trained modules: now, at the model's suggestion for every
        module, and at :meth:`module_ranks` (equal to the second without a per-kind split)."""
        now = sum(m.parameters() for m in self.trained)
        uniform = sum(m.parameters(self.rank) for m in self.trained) if self.rank is not None else now
        ranks = self.module_ranks()
        mixed = sum(m.parameters(ranks[m.name]) for m in self.trained) if ranks else uniform
        return now, uniform, mixed

    @property
    def spectral(self) -> Optional[int]:
        """The largest spectral reading over the projections (None: no gap anywhere)."""
        return _largest(self.projections)

    @property
    def weak(self) -> bool:
        return bool(self.cautions)

    @property
    def too_small(self) -> bool:
        """The probe needs more than half of the r directions: more might help (the model's
        reading; each group's is :attr:`KindAnswer.too_small` in :attr:`kinds`)."""
        return _needs_more(self.probe, self.r)


def _needs_more(probe: Optional[ProbeReading], r: int) -> bool:
    """The probe's rank above ``RULE.too_small`` · r: r may be too small."""
    return probe is not None and probe.rank is not None and probe.rank > RULE.too_small * r


def _largest(projections: Mapping[str, Optional[int]]) -> Optional[int]:
    return max(filter(None, projections.values()), default=None)


def _kinds(
    modules: Sequence[ModuleEvidence], probe: Optional[ProbeReading], groups: Mapping[ModuleKey, str]
) -> dict[str, KindAnswer]:
    """Each group's answer, where the modules hold both attention and MLP ones."""
    members = {group: [m for m in modules if groups.get(m.key) == group] for group in GROUPS}
    if not all(members.values()):
        return {}
    answers = {}
    for group, grouped in members.items():
        reading = probe.groups.get(group) if probe is not None else None
        spectral = max((m.delta_w_gap_rank for m in grouped), default=0) or None
        rank = max(filter(None, (reading.rank if reading is not None else None, spectral)), default=None)
        projections = tuple(dict.fromkeys(m.key[1] for m in grouped))
        r = max(m.rank for m in grouped)
        answers[group] = KindAnswer(group, rank, reading, spectral, r, projections)
    return answers


def counted_directions(rank: int, r: int) -> str:
    """How many of the r directions a rank counts: "every one of the r = 8", "6 of the r = 8"."""
    return f"every one of the r = {r}" if rank >= r else f"{rank} of the r = {r}"


def _cautions(
    modules: list[ModuleEvidence], probe: Optional[ProbeReading], spectral: Optional[int], r: int
) -> list[str]:
    cautions = []
    if probe is None:
        cautions.append(
            "spectrum only: no probe reading (a saved adapter has none; live, the probe is read "
            "once its cost fits within its share of the training so far, the option probe_budget "
            "(0.5 % by default: after a few hundred steps), and always at the end — "
            "docs/performance.md; a plain loop gives LoRAMonitor(probe=...)), so the suggestion is "
            "ΔW's spectral gaps alone, which in validation came right later in training than the "
            "probe did (docs/rank.md)"
        )
    elif probe.rank is None:
        cautions.append(
            "too early: the update has not lowered the probe batch's loss yet (the probe reads no rank); train longer"
        )
    elif spectral and max(probe.rank, spectral) > RULE.disagreement * min(probe.rank, spectral):
        cautions.append(
            f"the probe reads {probe.rank} and ΔW's spectral gaps {spectral}: in validation such "
            f"a disagreement (more than {RULE.disagreement:g}×) came only early in training, when the "
            f"probe was wrong; read the suggestion again later"
        )
    if _needs_more(probe, r):
        assert probe is not None and probe.rank is not None
        cautions.append(
            f"r may be too small: the probe needs {counted_directions(probe.rank, r)} directions to keep "
            f"{100 * RULE.keep:g} % of the loss reduction, so r is less than twice what the update "
            f"uses; train with a larger r and see whether the suggestion stays at or below half of it"
        )
    norms = [m.delta_w_relative_norm for m in modules if m.delta_w_relative_norm is not None]
    if norms and median(norms) < RULE.early_relative_norm:
        cautions.append(
            f"too early: ΔW is still tiny next to W₀ (median ‖ΔW‖_F/‖W₀‖_F = {median(norms):.1e} "
            f"< {RULE.early_relative_norm:g}): B has barely left its zero initialization; train longer"
        )
    return cautions


def recommend_rank(
    analyses: Mapping[ModuleKey, ModuleAnalysis],
    *,
    probe: Optional[ProbeReading] = None,
    reference_is_run: bool = False,
    basis: str = "A",
    groups: Optional[Mapping[ModuleKey, str]] = None,
    trained: Sequence[TrainedModule] = (),
    not_covered: Sequence[str] = (),
) -> RankRecommendation:
    """Suggest a LoRA rank from one snapshot's analysis (or a saved adapter's) and, where one was
    read, the functional probe.

    Args:
        analyses: :func:`lora_monitor.analysis.analyze`'s result.
        probe: the functional probe read at the same step.
        reference_is_run: φ in ``analyses`` compares with another run (shown beside the
            suggestion); False for two snapshots of one run, whose φ is not shown.
        basis: the basis of that φ.
        groups: each module's group (``"attention"``, ``"mlp"``:
            :func:`lora_monitor.adapters.kinds.groups_of`); default: told by the projection's
            name alone. Where both groups are present, each gets its answer (``kinds``).
        trained: the adapter's modules with their shapes, for the per-kind ``rank_pattern`` and
            the parameters it saves.
        not_covered: the projections the adapter trains that were left out of ``analyses``.

    Returns:
        The :class:`RankRecommendation`; ``rank`` is None when nothing supports a rank.
    """
    usable = {k: a for k, a in analyses.items() if not a.problems}
    skipped = [f"{layer_name(k)}: {'; '.join(a.problems)}" for k, a in sorted(analyses.items()) if a.problems]
    compared = reference_is_run and bool(usable) and all(a.phi is not None for a in usable.values())
    modules = [ModuleEvidence.from_analysis(usable[k], with_reference=compared) for k in sorted(usable)]
    projections: dict[str, Optional[int]] = {}
    for m in modules:
        best = projections.get(m.key[1]) or 0
        projections[m.key[1]] = max(best, m.delta_w_gap_rank) or None
    # In block order (q, k, v, o, gate, up, down, then the others), as the line and figures list them.
    projections = dict(sorted(projections.items(), key=lambda item: block_order(item[0])))
    r = max((m.rank for m in modules), default=0)
    spectral = _largest(projections)
    probed = probe.rank if probe is not None else None
    rank = max(filter(None, (probed, spectral)), default=None)
    low = high = None
    if probe is not None and probe.rank is not None:
        low, high = probe.low, max(probe.high or probe.rank, spectral or 0)
    if groups is None:
        named = {m.key: module_group(m.key[1]) for m in modules}
        groups = {key: group for key, group in named.items() if group is not None}
    kinds = _kinds(modules, probe, groups)
    cautions = _cautions(modules, probe, spectral, r)
    for answer in kinds.values():
        if answer.too_small and not _needs_more(probe, r):
            assert answer.probe is not None and answer.probe.rank is not None
            cautions.append(
                f"r may be too small for the {answer.group} modules: cut alone, the others whole, they "
                f"need {counted_directions(answer.probe.rank, answer.r)} directions to keep "
                f"{100 * RULE.keep:g} % of the loss reduction; train them with a larger r"
            )
    return RankRecommendation(
        rank=rank,
        low=low,
        high=high,
        projections=projections,
        probe=probe,
        modules=modules,
        r=r,
        basis=basis,
        compared=compared,
        cautions=cautions,
        skipped=skipped,
        kinds=kinds,
        trained=tuple(trained),
        not_covered=tuple(not_covered),
    )
