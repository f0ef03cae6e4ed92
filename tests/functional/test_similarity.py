"""lora_monitor.functional.similarity: φ against its definition, its chance level, and the count of
shared directions on random subspaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_monitor.functional import (
    random_subspace_similarity,
    sample_random_subspace_similarity,
    shared_directions,
    subspace_similarity,
)
from tests.helpers.dense import dense_phi
from tests.helpers.linalg import F64, gen, orthonormal, randn


def test_subspace_similarity_matches_definition():
    U, V = orthonormal(20, 6, seed=20), orthonormal(20, 9, seed=21)
    V[:, 0] = U[:, 1]  # some shared direction so values are not all tiny
    V = torch.linalg.qr(V)[0]
    phi = subspace_similarity(U, V)
    assert phi.shape == (6, 9) and phi.dtype == F64
    np.testing.assert_allclose(phi.numpy(), dense_phi(U, V).numpy(), rtol=0, atol=1e-12)
    batched = subspace_similarity(torch.stack([U, U]), torch.stack([V, V]))
    np.testing.assert_allclose(batched[1].numpy(), dense_phi(U, V).numpy(), rtol=0, atol=1e-12)


def test_subspace_similarity_of_a_basis_with_itself_is_one():
    U = orthonormal(15, 7, seed=22)
    np.testing.assert_allclose(subspace_similarity(U, U).numpy(), 1.0, atol=1e-12)


def test_subspace_similarity_of_orthogonal_bases_is_zero():
    Q = orthonormal(12, 8, seed=23)
    np.testing.assert_allclose(subspace_similarity(Q[:, :3], Q[:, 3:]).numpy(), 0.0, atol=1e-12)


def test_subspace_similarity_rejects_different_spaces():
    with pytest.raises(ValueError, match="same space"):
        subspace_similarity(torch.zeros(5, 2), torch.zeros(6, 2))


def test_random_bases_average_phi_is_max_ij_over_n():
    n, p, q, samples = 200, 6, 8, 400
    U = torch.linalg.qr(randn(samples, n, p, seed=24))[0]
    V = torch.linalg.qr(randn(samples, n, q, seed=25))[0]
    phi = subspace_similarity(U, V)
    assert ((phi >= 0) & (phi <= 1)).all()
    i = np.arange(1, p + 1)[:, None]
    j = np.arange(1, q + 1)[None, :]
    expected = np.maximum(i, j) / n
    # φ(1, 1) ~ Beta(1/2, (n-1)/2): relative sd of the mean ≈ sqrt(2/samples) ≈ 7 %.
    np.testing.assert_allclose(phi.mean(0).numpy(), expected, rtol=0.25)


def test_random_subspace_similarity_closed_form():
    grid = random_subspace_similarity(10, 3, 4, dtype=F64)
    expected = [[max(i, j) / 10 for j in range(1, 5)] for i in range(1, 4)]
    np.testing.assert_allclose(grid.numpy(), expected, rtol=0, atol=1e-15)
    assert random_subspace_similarity(4, 4, 4).dtype == torch.float32
    with pytest.raises(ValueError):
        random_subspace_similarity(3, 4, 1)


def test_sample_random_subspace_similarity_mean_matches_closed_form():
    n, p, q = 64, 8, 5
    samples = sample_random_subspace_similarity(n, p, q, samples=600, generator=gen(26), dtype=F64)
    assert samples.shape == (600, p, q) and samples.dtype == F64
    assert ((samples >= 0) & (samples <= 1)).all()
    np.testing.assert_allclose(
        samples.mean(0).numpy(), random_subspace_similarity(n, p, q, dtype=F64).numpy(), rtol=0.2
    )
    again = sample_random_subspace_similarity(n, p, q, samples=600, generator=gen(26), dtype=F64)
    torch.testing.assert_close(samples, again, rtol=0, atol=0)
    half = sample_random_subspace_similarity(n, 3, 3, samples=2, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 3, 3)


def test_shared_directions_false_alarm_rate_on_random_subspaces():
    generator = torch.Generator().manual_seed(0)
    for n, p, q in [(384, 8, 64), (64, 8, 8), (32, 4, 16)]:
        phi = sample_random_subspace_similarity(n, p, q, samples=300, generator=generator)
        # At most 10⁻³ by the bound (in fact far less): no false count in 300 draws.
        assert int((shared_directions(phi, n) > 0).sum()) == 0
