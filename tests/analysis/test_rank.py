"""lora_monitor.analysis.rank: the rank recommendation on synthetic adapters whose answer is known
(planted directions standing out of noise), with and without a functional probe, the range and
strength said beside it, and the cautions of a run too early to tell.

The adapters are LoRA factors built from planted structure; the analysis is the package's real
one (:func:`lora_monitor.analysis.analyze`), so the test covers the path from factors to text.
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.adapters import LoRAFactors
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.probe import read_probe
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.functional import random_subspace_similarity
from lora_monitor.outputs.rank_text import advice, report_markdown, summary_line
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora

D = K = 256
LAYERS = range(3)
PROJECTIONS = ("q", "v")


def _orthonormal(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64))[0]


def planted_adapter(
    planted_U: torch.Tensor,
    planted_V: torch.Tensor,
    sigma: list[float],
    rank: int,
    seed: int,
    noise: float = 0.3,
) -> dict:
    """Factors of rank ``rank`` whose ΔW = U diag(σ) Vᵀ + noise, the noise drawn from ``seed``.

    The planted directions are the first rows of A / columns of B (with A's row norms σ, so
    that A's and ΔW's singular vectors both order them by σ); the other ``rank − len(σ)``
    directions are independent Gaussian noise of norm ≈ ``noise`` per row.
    """
    factors = {}
    for layer in LAYERS:
        for projection in PROJECTIONS:
            generator = torch.Generator().manual_seed(1000 * seed + 10 * layer + len(projection) + ord(projection[0]))
            planted = len(sigma)
            A = torch.randn(rank, K, generator=generator, dtype=torch.float64) * noise / K**0.5
            B = torch.randn(D, rank, generator=generator, dtype=torch.float64) * noise / D**0.5
            A[:planted] = torch.tensor(sigma, dtype=torch.float64)[:, None] * planted_V[:, :planted].T
            B[:, :planted] = planted_U[:, :planted]
            factors[layer, projection] = LoRAFactors(
                module_name=f"model.layers.{layer}.{projection}_proj",
                layer=layer,
                projection=projection,
                lora_A=A.float(),
                lora_B=B.float(),
                scaling=1.0,
            )
    return factors


@pytest.fixture(scope="module")
def planted_directions():
    generator = torch.Generator().manual_seed(7)
    return _orthonormal(D, 8, generator), _orthonormal(K, 8, generator)


def _probe(scale: float, r: int):
    """A probe reading whose log loss falls as 1 − exp(−k/scale): directions of shrinking worth."""
    return read_probe(lambda k: 1e-3 * math.exp(-3 * (1 - math.exp(-k / scale))), r)


SIGMA = [10.0, 8.0, 6.0, 4.0]


def test_planted_rank_4_inside_rank_64_is_read_off_the_spectral_gaps(planted_directions):
    U, V = planted_directions
    current = planted_adapter(U, V, SIGMA, rank=64, seed=2)
    recommendation = recommend_rank(analyze(Snapshot(step=100, factors=current)))
    assert [m.delta_w_gap_rank for m in recommendation.modules] == [4] * 6
    assert recommendation.projections == {"q": 4, "v": 4} and recommendation.rank == 4
    # Without a probe the gaps alone are weak evidence, and no range is claimed.
    assert recommendation.weak and recommendation.cautions[0].startswith("spectrum only")
    assert recommendation.low is None and recommendation.high is None
    assert not recommendation.compared and all(m.shared_directions is None for m in recommendation.modules)
    report = report_markdown(recommendation)
    assert "suggested LoRA rank 4 (r = 64;" in report and "layer_02.v" in report
    assert "lora-monitor truncate ADAPTER_DIR --rank 4 -o OUT_DIR" in report
    assert "read the suggestion again later" in advice(recommendation)


def test_a_probe_that_agrees_makes_the_evidence_consistent_with_a_range(planted_directions):
    U, V = planted_directions
    current = planted_adapter(U, V, SIGMA, rank=64, seed=2)
    probe = _probe(scale=1.5, r=64)  # keeps 93 % at k = 4, 96 % at 5, 98 % at 6
    assert (probe.low, probe.rank, probe.high) == (4, 5, 6)
    recommendation = recommend_rank(analyze(Snapshot(step=100, factors=current)), probe=probe)
    assert (recommendation.low, recommendation.rank, recommendation.high) == (4, 5, 6)
    assert not recommendation.weak
    assert summary_line(recommendation) == (
        "suggested LoRA rank 5 (likely 4–6, r = 64; functional probe 5, ΔW's spectral gaps q 4 / v 4; "
        "evidence consistent)"
    )
    assert "| k (every ΔW cut to)" in report_markdown(recommendation)


def test_the_probe_and_the_gaps_far_apart_is_weak_and_the_larger_wins(planted_directions):
    U, V = planted_directions
    current = planted_adapter(U, V, SIGMA, rank=64, seed=2)
    recommendation = recommend_rank(analyze(Snapshot(step=100, factors=current)), probe=_probe(scale=0.25, r=64))
    assert recommendation.rank == 4 and recommendation.weak
    assert any("the probe reads 1 and ΔW's spectral gaps 4" in c for c in recommendation.cautions)


def test_a_probe_that_needs_every_direction_says_r_may_be_too_small(planted_directions):
    U, V = planted_directions
    current = planted_adapter(U, V, [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0], rank=8, seed=2)
    recommendation = recommend_rank(analyze(Snapshot(step=100, factors=current)), probe=_probe(scale=40, r=8))
    assert recommendation.too_small and recommendation.rank == 8
    assert "r may be too small" in summary_line(recommendation)
    assert "Train again with a larger r (e.g. r = 16)" in advice(recommendation)


@pytest.mark.parametrize(("scale", "used", "said"), [(1.2, 4, False), (1.5, 5, True), (2.0, 6, True)])
def test_r_may_be_too_small_once_the_probe_needs_more_than_half_of_r(planted_directions, scale, used, said):
    # At r = 8: a probe needing 4 directions leaves r twice what the update uses, 5 or 6 do not.
    U, V = planted_directions
    current = planted_adapter(U, V, [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0], rank=8, seed=2)
    recommendation = recommend_rank(analyze(Snapshot(step=100, factors=current)), probe=_probe(scale=scale, r=8))
    assert recommendation.probe.rank == used and recommendation.too_small == said
    assert ("r may be too small" in summary_line(recommendation)) == said
    assert any(f"the probe needs {used} of the r = 8 directions" in c for c in recommendation.cautions) == said
    assert ("Train again with a larger r (e.g. r = 16)" in advice(recommendation)) == said


def test_an_update_that_has_not_lowered_the_probe_loss_is_too_early(planted_directions):
    U, V = planted_directions
    current = planted_adapter(U, V, SIGMA, rank=64, seed=2)
    flat = read_probe(lambda k: 1.0, 64)
    recommendation = recommend_rank(analyze(Snapshot(step=100, factors=current)), probe=flat)
    assert recommendation.rank == 4 and recommendation.low is None and recommendation.weak
    assert recommendation.cautions[0].startswith("too early: the update has not lowered")


def test_pure_noise_supports_no_rank_and_phi_against_another_run_is_shown_beside(planted_directions):
    U, V = planted_directions
    # No planted direction: two independent rank-64 updates of noise.
    reference = planted_adapter(U, V, [], rank=64, seed=1)
    current = planted_adapter(U, V, [], rank=64, seed=2)
    analyses = analyze(Snapshot(step=100, factors=current), reference, "A")
    for analysis in analyses.values():
        assert analysis.shared_directions == 0
        # φ sits at the random level max(i, j)/n (within noise), far below 0.5.
        assert float((analysis.phi - random_subspace_similarity(K, 64, 64)).abs().max()) < 0.1
    recommendation = recommend_rank(analyses, reference_is_run=True)
    assert recommendation.rank is None and recommendation.projections == {"q": None, "v": None}
    assert recommendation.compared and all(m.shared_directions == 0 for m in recommendation.modules)
    assert "no LoRA rank is supported" in summary_line(recommendation)
    report = report_markdown(recommendation)
    assert "Nothing to act on yet" in report and "shown beside, not used for the rank" in report


def test_one_answer_with_or_without_a_reference_run(planted_directions):
    """The same update gives the same rank read alone (``inspect``) and beside another run
    (``compare``): φ is shown, never used."""
    U, V = planted_directions
    reference = planted_adapter(U, V, SIGMA, rank=8, seed=1)
    current = planted_adapter(U, V, SIGMA, rank=64, seed=2)
    alone = recommend_rank(analyze(Snapshot(step=100, factors=current)))
    beside = recommend_rank(analyze(Snapshot(step=100, factors=current), reference, "A"), reference_is_run=True)
    assert alone.rank == beside.rank == 4 and beside.compared and not alone.compared
    assert all(m.shared_directions == 4 for m in beside.modules)
    assert "| shared directions" in report_markdown(beside) and "| shared directions" not in report_markdown(alone)


def test_an_early_run_is_reported_as_weak_evidence(tmp_path):
    # Two optimizer steps at a tiny learning rate: B has barely left zero, A its random init.
    model = tiny_llama_lora(rank=4, randomize_B=False)
    monitor = LoRASubspaceMonitor(every_n_steps=1, reference="first")
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(CausalLMModule(model, lr=1e-5))
    assert monitor.recommendation.weak
    assert "ΔW is still tiny next to W₀" in " ".join(monitor.recommendation.cautions)
    # φ against the run's own first snapshot is stability, not a second run: never shown beside.
    assert not monitor.recommendation.compared
    assert all(m.shared_directions is None for m in monitor.recommendation.modules)
