"""lora_monitor.analysis.rank: the rank recommendation on synthetic adapters whose answer is known,
and the cautions of a run too early to tell.

The adapters are LoRA factors built from planted structure; the analysis is the package's real
one (:func:`lora_monitor.analysis.analyze`), so the test covers the path from factors to text.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.adapters import LoRAFactors
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.rank import GAP_RATIO, recommend_rank
from lora_monitor.functional import random_subspace_similarity
from lora_monitor.outputs.report import report_markdown, summary_line
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


@pytest.mark.parametrize("basis", ["A", "delta_w_left", "delta_w_right"])
def test_planted_rank_4_inside_rank_64_is_recovered(planted_directions, basis):
    U, V = planted_directions
    sigma = [10.0, 8.0, 6.0, 4.0]
    reference = planted_adapter(U, V, sigma, rank=64, seed=1)
    current = planted_adapter(U, V, sigma, rank=64, seed=2)
    analyses = analyze(Snapshot(step=100, factors=current), reference, basis)

    for analysis in analyses.values():
        assert analysis.shared_directions == 4
    recommendation = recommend_rank(analyses, basis)
    assert recommendation.compared
    assert recommendation.rank == 4
    assert recommendation.projections == {"q": 4, "v": 4}
    assert all(m.block_overlap > 0.95 for m in recommendation.modules)
    report = report_markdown(recommendation)
    assert "suggested LoRA rank 4" in report
    assert "layer_02.v" in report


def test_pure_noise_supports_no_rank(planted_directions):
    U, V = planted_directions
    # No planted direction: two independent rank-64 updates of noise.
    reference = planted_adapter(U, V, [], rank=64, seed=1)
    current = planted_adapter(U, V, [], rank=64, seed=2)
    analyses = analyze(Snapshot(step=100, factors=current), reference, "A")

    for analysis in analyses.values():
        assert analysis.shared_directions == 0
        # φ sits at the random level max(i, j)/n (within noise), far below 0.5.
        chance = random_subspace_similarity(K, 64, 64)
        assert float((analysis.phi - chance).abs().max()) < 0.1
    recommendation = recommend_rank(analyses, "A")
    assert recommendation.rank is None
    assert recommendation.projections == {"q": None, "v": None}
    assert "no LoRA rank is supported" in summary_line(recommendation)
    assert "agree on nothing" in report_markdown(recommendation)


def test_swapped_top_directions_are_read_as_a_shared_block(planted_directions):
    """σ₁ ≈ σ₂: the two runs order their top two directions differently."""
    U, V = planted_directions
    reference = planted_adapter(U, V, [5.0, 4.95, 2.0], rank=16, seed=1)
    # The same directions with the first two swapped: U[:, 1] now leads.
    swapped_U = U[:, [1, 0, 2]]
    swapped_V = V[:, [1, 0, 2]]
    current = planted_adapter(swapped_U, swapped_V, [5.0, 4.95, 2.0], rank=16, seed=2)
    analyses = analyze(Snapshot(step=100, factors=current), reference, "A")

    for analysis in analyses.values():
        assert float(analysis.phi[0, 0]) < 0.01  # single vectors: nothing in common
        assert float(analysis.phi[1, 1]) > 0.99  # the top-2 blocks: the same plane
        assert analysis.shared_directions == 3
    recommendation = recommend_rank(analyses, "A")
    assert recommendation.rank == 3
    assert all(m.top_gap < GAP_RATIO for m in recommendation.modules)
    report = report_markdown(recommendation)
    assert "σ₁ ≈ σ₂" in report and "blocks" in report
    assert "Evidence is weak" in report


def test_cut_inside_a_cluster_of_equal_singular_values_is_flagged(planted_directions):
    U, V = planted_directions
    # Directions 2 and 3 (σ = 6, 5.9) are shared, the third of the cluster (5.8) is not: the
    # shared count stops inside the cluster and rank 2 vs 3 cannot be told apart.
    reference = planted_adapter(U, V, [10.0, 6.0, 5.9], rank=16, seed=1)
    current = planted_adapter(U, V, [10.0, 6.0], rank=16, seed=2)
    unshared = 5.8 * _orthonormal(K, 1, torch.Generator().manual_seed(3))[:, 0]
    current = {key: replace(f, lora_A=_with_row(f.lora_A, 2, unshared)) for key, f in current.items()}
    analyses = analyze(Snapshot(step=100, factors=current), reference, "A")
    recommendation = recommend_rank(analyses, "A")
    assert recommendation.rank == 2
    assert any("too small to order the directions" in c for c in recommendation.cautions)


def _with_row(A: torch.Tensor, row: int, values: torch.Tensor) -> torch.Tensor:
    A = A.clone()
    A[row] = values.to(A.dtype)
    return A


def test_spectrum_only_recommendation_says_it_is_weak(planted_directions):
    U, V = planted_directions
    current = planted_adapter(U, V, [10.0, 8.0, 6.0, 5.0], rank=64, seed=2)
    recommendation = recommend_rank(analyze(Snapshot(step=1, factors=current)), "A")
    assert not recommendation.compared and recommendation.weak
    # σ² = 100 + 64 + 36 + 25 (+ tiny noise): the top 3 hold 89 % of ‖ΔW‖², the top 4 over 90 %.
    for f in current.values():
        energy = torch.linalg.svdvals((f.lora_B @ f.lora_A).double()).square().cumsum(0)
        assert int((energy < 0.9 * energy[-1]).sum()) + 1 == 4
    assert recommendation.rank == 4
    assert recommendation.cautions[0].startswith("spectrum only")


def test_an_early_run_is_reported_as_weak_evidence(tmp_path):
    # Two optimizer steps at a tiny learning rate: B has barely left zero, A its random init.
    model = tiny_llama_lora(rank=4, randomize_B=False)
    monitor = LoRASubspaceMonitor(every_n_steps=1, reference="first")
    trainer = make_trainer(tmp_path, [monitor], max_steps=2)
    trainer.fit(CausalLMModule(model, lr=1e-5))
    cautions = " ".join(monitor.recommendation.cautions)
    assert "ΔW is still tiny next to W₀" in cautions
    assert "A is still close to its random initialization" in cautions
    assert monitor.recommendation.weak
    # φ against the run's own first snapshot is stability, not a second run: spectra decide.
    assert not monitor.recommendation.compared
    assert all(m.shared_directions is None for m in monitor.recommendation.modules)
