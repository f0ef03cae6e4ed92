"""lora_monitor.functional.svd: the SVD of ΔW = s·B·A from its factors, and the bases φ is computed
in, against dense float64 SVDs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_monitor.functional import BASES, factored_basis, factored_svd, singular_basis, subspace_similarity
from tests.helpers.linalg import F64, assert_orthonormal_columns, dense_svd, projector, randn, separated_factors


def test_factored_svd_matches_dense_svd_float64():
    sigmas = [9.0, 5.0, 3.0, 1.5, 0.5]
    B, A = separated_factors(12, 10, sigmas, seed=3)
    U, S, Vh = factored_svd(B, A, 0.75)
    dU, dS, dVh = dense_svd(0.75 * B @ A)
    assert U.dtype == S.dtype == Vh.dtype == F64
    assert U.shape == (12, 5) and S.shape == (5,) and Vh.shape == (5, 10)
    np.testing.assert_allclose(S.numpy(), dS[:5], rtol=0, atol=1e-10)
    np.testing.assert_allclose(S.numpy(), 0.75 * np.array(sigmas), rtol=0, atol=1e-10)
    # Vectors agree up to sign: |diag(Uᵀ U_dense)| = 1, and the projectors coincide.
    np.testing.assert_allclose(np.abs(np.diag(U.numpy().T @ dU[:, :5])), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.abs(np.diag(Vh.numpy() @ dVh[:5].T)), 1.0, atol=1e-10)
    np.testing.assert_allclose(projector(U.numpy()), projector(dU[:, :5]), atol=1e-10)
    # And they reconstruct ΔW.
    torch.testing.assert_close((U * S) @ Vh, 0.75 * B @ A, atol=1e-12, rtol=0)


def test_factored_svd_batched_shapes_and_values():
    d, r, k = 7, 4, 6
    B = randn(2, 3, d, r, seed=1)
    A = randn(2, 3, r, k, seed=2)
    U, S, Vh = factored_svd(B, A, 2.0)
    assert U.shape == (2, 3, d, r) and S.shape == (2, 3, r) and Vh.shape == (2, 3, r, k)
    for a in range(2):
        for b in range(3):
            dS = dense_svd(2.0 * B[a, b] @ A[a, b])[1]
            np.testing.assert_allclose(S[a, b].numpy(), dS[:r], rtol=0, atol=1e-10)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, 2.0 * B @ A, atol=1e-12, rtol=0)


def test_factored_svd_negative_scaling():
    B, A = randn(8, 3, seed=4), randn(3, 5, seed=5)
    U, S, Vh = factored_svd(B, A, -1.5)
    assert (S >= 0).all()
    np.testing.assert_allclose(S.numpy(), dense_svd(-1.5 * B @ A)[1][:3], atol=1e-10, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, -1.5 * B @ A, atol=1e-12, rtol=0)


def test_factored_svd_tensor_scaling_per_batch_entry():
    B, A = randn(2, 3, 6, 4, seed=6), randn(2, 3, 4, 5, seed=7)
    scaling = torch.tensor([[0.5, -2.0, 1.0], [3.0, -0.25, 0.0]], dtype=F64)
    U, S, Vh = factored_svd(B, A, scaling)
    delta = scaling[..., None, None] * B @ A
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, delta, atol=1e-12, rtol=0)
    for a in range(2):
        for b in range(3):
            np.testing.assert_allclose(S[a, b].numpy(), dense_svd(delta[a, b])[1][:4], atol=1e-10)
    assert (S[1, 2] == 0).all()


def test_factored_svd_zero_B_gives_zero_spectrum_without_nan():
    U, S, Vh = factored_svd(torch.zeros(2, 9, 4), torch.randn(2, 4, 7))
    assert (S == 0).all()
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert_orthonormal_columns(U, 1e-5)
    assert_orthonormal_columns(Vh.mT, 1e-5)


def test_factored_svd_rank_deficient_B():
    B = randn(10, 4, seed=8)
    B[:, 2] = B[:, 0]  # repeated column
    B[:, 3] = 0.0  # zero column
    A = randn(4, 9, seed=9)
    U, S, Vh = factored_svd(B, A)
    dS = dense_svd(B @ A)[1][:4]
    np.testing.assert_allclose(S.numpy(), dS, atol=1e-10, rtol=0)
    assert S[2:].abs().max() < 1e-10
    assert_orthonormal_columns(U, 1e-10)
    assert_orthonormal_columns(Vh.mT, 1e-10)
    torch.testing.assert_close((U * S) @ Vh, B @ A, atol=1e-12, rtol=0)


def test_factored_svd_nan_factor_gives_nan_spectrum_without_raising():
    B, A = randn(3, 6, 2, seed=10), randn(3, 2, 5, seed=11)
    B[1, 0, 0] = float("nan")
    A[2, 1, 3] = float("inf")
    U, S, Vh = factored_svd(B, A)
    assert torch.isnan(S[1]).all() and torch.isnan(S[2]).all()
    np.testing.assert_allclose(S[0].numpy(), dense_svd(B[0] @ A[0])[1][:2], atol=1e-10)
    _, S_nan_scaling, _ = factored_svd(B[0], A[0], float("nan"))
    assert torch.isnan(S_nan_scaling).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factored_svd_half_precision_computed_in_float32(dtype):
    B, A = separated_factors(16, 12, [4.0, 2.0, 1.0], seed=12)
    Bh, Ah = B.to(dtype), A.to(dtype)
    U, S, Vh = factored_svd(Bh, Ah, 0.5)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    # The float64 reference of the same (rounded) factors.
    dU, dS, dVh = dense_svd(0.5 * Bh.double() @ Ah.double())
    np.testing.assert_allclose(S.double().numpy(), dS[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(projector(U.double().numpy()), projector(dU[:, :3]), atol=1e-5)
    np.testing.assert_allclose(projector(Vh.double().numpy().T), projector(dVh[:3].T), atol=1e-5)


@pytest.mark.parametrize(("d", "r", "k"), [(3, 6, 8), (8, 6, 3), (2, 5, 2), (1, 4, 7)])
def test_factored_svd_rank_larger_than_a_side(d, r, k):
    B, A = randn(2, d, r, seed=13), randn(2, r, k, seed=14)
    U, S, Vh = factored_svd(B, A, 1.25)
    m = min(d, r, k)
    assert U.shape == (2, d, m) and S.shape == (2, m) and Vh.shape == (2, m, k)
    for b in range(2):
        np.testing.assert_allclose(S[b].numpy(), dense_svd(1.25 * B[b] @ A[b])[1][:m], atol=1e-10)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, 1.25 * B @ A, atol=1e-12, rtol=0)
    assert_orthonormal_columns(U, 1e-10)
    assert_orthonormal_columns(Vh.mT, 1e-10)


def test_factored_svd_extreme_magnitudes_do_not_overflow_the_core():
    # Finite factors whose naive r×r core product overflows (float32) or underflows (float64).
    B, A = separated_factors(6, 5, [3.0, 1.0], seed=15)
    U, S, Vh = factored_svd((B * 1e20).float(), (A * 1e20).float())
    assert torch.isinf(S[0]) and not torch.isnan(S).any()
    expected = projector(dense_svd(B @ A)[0][:, :2])
    np.testing.assert_allclose(projector(U.double().numpy()), expected, atol=1e-5)
    U, S, Vh = factored_svd(B * 1e-200, A * 1e-200, 1e300)
    np.testing.assert_allclose(S.numpy() / 1e-100, [3.0, 1.0], rtol=1e-10)


def test_factored_svd_rejects_mismatched_rank():
    with pytest.raises(ValueError, match="rank dimensions"):
        factored_svd(torch.zeros(4, 3), torch.zeros(2, 5))


@pytest.mark.parametrize("basis", BASES)
def test_singular_basis_matches_dense_svd(basis):
    d, r, k = 11, 4, 9
    B, A = separated_factors(d, k, [6.0, 3.0, 2.0, 1.0], seed=16)
    # Make A and B individually well separated too (separated_factors mixes the spectrum).
    A = torch.diag(torch.tensor([2.0, 1.5, 1.0, 0.5], dtype=F64)) @ A
    B = B + 0.1 * randn(d, r, seed=17)
    got = singular_basis(B, A, -0.5, basis)
    if basis == "A":
        expected = dense_svd(A)[2].T
    elif basis == "B":
        expected = dense_svd(B)[0]
    elif basis == "delta_w_left":
        expected = dense_svd(-0.5 * B @ A)[0][:, :r]
    else:
        expected = dense_svd(-0.5 * B @ A)[2][:r].T
    assert got.shape == expected.shape
    assert_orthonormal_columns(got, 1e-10)
    np.testing.assert_allclose(np.abs(np.diag(got.numpy().T @ expected)), 1.0, atol=1e-9)
    np.testing.assert_allclose(projector(got.numpy()), projector(expected), atol=1e-10)


def test_singular_basis_batched_and_unknown():
    B, A = randn(2, 3, 8, 4, seed=18), randn(2, 3, 4, 6, seed=19)
    assert singular_basis(B, A, basis="A").shape == (2, 3, 6, 4)
    assert singular_basis(B, A, basis="B").shape == (2, 3, 8, 4)
    assert singular_basis(B, A, basis="delta_w_left").shape == (2, 3, 8, 4)
    assert singular_basis(B, A, basis="delta_w_right").shape == (2, 3, 6, 4)
    with pytest.raises(ValueError, match="unknown basis"):
        singular_basis(B, A, basis="C")  # type: ignore[arg-type]


@pytest.mark.parametrize("basis", BASES)
def test_factored_basis_matches_dense_svd(basis):
    generator = torch.Generator().manual_seed(0)
    B = torch.randn(2, 12, 4, generator=generator, dtype=torch.float64)
    A = torch.randn(2, 4, 10, generator=generator, dtype=torch.float64)
    S, Q, W, basis_S = factored_basis(B, A, -0.5, basis)
    dense = torch.linalg.svd(-0.5 * B @ A)
    torch.testing.assert_close(S, dense.S[:, :4])
    factor = {"A": A, "B": B}.get(basis)
    torch.testing.assert_close(basis_S, S if factor is None else torch.linalg.svdvals(factor))
    vectors = {
        "A": torch.linalg.svd(A).Vh.mT,
        "B": torch.linalg.svd(B).U,
        "delta_w_left": dense.U,
        "delta_w_right": dense.Vh.mT,
    }[basis][..., :4]
    # Same vectors up to sign: |cosine| 1 column by column; and the factored φ is the dense one.
    torch.testing.assert_close((Q @ W * vectors).sum(-2).abs(), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(subspace_similarity(vectors, Q, W), subspace_similarity(vectors, Q @ W))
    torch.testing.assert_close(singular_basis(B, A, -0.5, basis), Q @ W)


def test_factored_basis_nan_factor_gives_nan_without_raising():
    B, A = torch.randn(3, 8, 2), torch.randn(3, 2, 6)
    B[1, 0, 0] = float("nan")
    S, _, _, basis_S = factored_basis(B, A, 1.0, "delta_w_left")
    assert torch.isnan(S[1]).all() and torch.isnan(basis_S[1]).all()
    assert torch.isfinite(S[[0, 2]]).all()
    torch.testing.assert_close(S[[0, 2]], factored_svd(B[[0, 2]], A[[0, 2]])[1])
