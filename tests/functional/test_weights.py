"""lora_monitor.functional.weights: the amplification factor and intruder dimensions against W₀, by
dense SVDs and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_monitor.functional import amplification_factor, factored_svd, intruder_dimensions
from tests.helpers.linalg import F64, orthonormal, randn, separated_factors


def amplification_dense(W0, delta, r):
    U, S, Vh = np.linalg.svd(delta, full_matrices=True)
    U, V = U[:, :r], Vh[:r].T
    return np.linalg.norm(delta, "fro") / np.linalg.norm(U.T @ W0 @ V, "fro")


def test_amplification_factor_matches_dense():
    d, k = 14, 11
    W0 = randn(d, k, seed=29)
    B, A = separated_factors(d, k, [5.0, 2.0, 1.0], seed=30)
    U, S, Vh = factored_svd(B, A, 0.8)
    got = amplification_factor(U, S, Vh, W0)
    expected = amplification_dense(W0.numpy(), (0.8 * B @ A).numpy(), 3)
    assert got.dtype == F64 and got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_amplification_factor_batched_and_planted():
    d, r, k = 10, 3, 8
    W0 = randn(2, d, k, seed=31)
    B, A = randn(2, d, r, seed=32), randn(2, r, k, seed=33)
    U, S, Vh = factored_svd(B, A, 2.0)
    got = amplification_factor(U, S, Vh, W0)
    for b in range(2):
        expected = amplification_dense(W0[b].numpy(), (2.0 * B[b] @ A[b]).numpy(), r)
        assert float(got[b]) == pytest.approx(expected, rel=1e-10)
    # ΔW = c·(W₀'s top singular direction): ‖ΔW‖ / ‖uᵀ W₀ v‖ = c / σ₁.
    u0, s0, vh0 = torch.linalg.svd(W0[0])
    Up, Sp, Vhp = factored_svd(7.0 * u0[:, :1], vh0[:1])
    assert float(amplification_factor(Up, Sp, Vhp, W0[0])) == pytest.approx(7.0 / float(s0[0]))
    zero = factored_svd(torch.zeros(d, r, dtype=F64), A[0])
    assert float(amplification_factor(*zero, W0[0])) == 0.0


def test_amplification_factor_half_precision_w0():
    W0 = randn(9, 7, seed=34).to(torch.bfloat16)
    B, A = separated_factors(9, 7, [3.0, 1.0], seed=35)
    U, S, Vh = factored_svd(B.float(), A.float())
    got = amplification_factor(U, S, Vh, W0)
    assert got.dtype == torch.float32
    expected = amplification_dense(W0.double().numpy(), (B @ A).numpy(), 2)
    assert float(got) == pytest.approx(expected, rel=1e-4)


def intruders_dense(W0, delta, top_k=10, threshold=0.5):
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    Um = np.linalg.svd(W0 + delta, full_matrices=False)[0]
    count = 0
    for i in range(min(top_k, Um.shape[1])):
        best = 0.0
        for j in range(U0.shape[1]):
            norms = np.linalg.norm(Um[:, i]) * np.linalg.norm(U0[:, j])
            cos = abs(float(Um[:, i] @ U0[:, j])) / norms
            best = max(best, cos)
        count += best < threshold
    return count


@pytest.mark.parametrize("seed", [36, 37, 38])
def test_intruder_dimensions_matches_brute_force(seed):
    d, r, k = 16, 4, 12
    W0 = randn(3, d, k, seed=seed)
    B, A = randn(3, d, r, seed=seed + 100), randn(3, r, k, seed=seed + 200)
    scale = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    U, S, Vh = factored_svd(B, A, scale)
    got = intruder_dimensions(W0, U, S, Vh, top_k=6, threshold=0.6)
    assert got.dtype == torch.int64 and got.shape == (3,)
    for b in range(3):
        delta = (scale[b] * B[b] @ A[b]).numpy()
        assert int(got[b]) == intruders_dense(W0[b].numpy(), delta, top_k=6, threshold=0.6)


def test_intruder_dimensions_planted_and_tiny():
    d, k = 20, 12
    # W₀ with a well separated spectrum: its 12 left vectors span a subspace of ℝ²⁰.
    spectrum = torch.diag(torch.linspace(12.0, 1.0, k, dtype=F64))
    W0 = orthonormal(d, k, seed=39) @ spectrum @ orthonormal(k, k, seed=40).T
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    # A direction of ℝ²⁰ outside W₀'s column space, pushed to the top of the spectrum.
    outside = randn(d, 1, seed=41)
    outside = outside - U0 @ (U0.T @ outside)
    outside = outside / outside.norm()
    B, A = 30.0 * outside, orthonormal(k, 1, seed=42).T
    U, S, Vh = factored_svd(B, A)
    planted = intruder_dimensions(W0, U, S, Vh)
    assert int(planted) >= 1
    assert int(planted) == intruders_dense(W0.numpy(), (B @ A).numpy())
    tiny = factored_svd(1e-6 * randn(d, 4, seed=43), randn(4, k, seed=44))
    assert int(intruder_dimensions(W0, *tiny)) == 0
    zero = factored_svd(torch.zeros(d, 2, dtype=F64), A.expand(2, k))
    assert int(intruder_dimensions(W0, *zero)) == 0


def test_intruder_dimensions_non_finite_gives_minus_one():
    W0 = randn(2, 8, 6, seed=45)
    U, S, Vh = factored_svd(randn(2, 8, 2, seed=46), randn(2, 2, 6, seed=47))
    W0[1, 0, 0] = float("nan")
    got = intruder_dimensions(W0.float(), U, S, Vh)
    assert got[1] == -1 and 0 <= got[0] <= 6
