"""The functional layer against independent dense computations, plus a hypothesis fuzz."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lora_monitor import functional
from lora_monitor.functional import (
    BASES,
    amplification_factor,
    effective_rank,
    energy_rank,
    factored_svd,
    frobenius_norm,
    intruder_dimensions,
    random_subspace_similarity,
    sample_random_subspace_similarity,
    singular_basis,
    stable_rank,
    subspace_similarity,
    thin_qr,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matrices are tiny: intra-op threads only contend on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def orthonormal(n, p, seed=0):
    return torch.linalg.qr(randn(n, p, seed=seed))[0]


def separated_factors(d, k, sigmas, seed=0):
    """B (d×r), A (r×k) with B @ A having exactly the singular values ``sigmas`` (well apart)."""
    r = len(sigmas)
    Q1 = orthonormal(d, r, seed)
    Q2 = orthonormal(k, r, seed + 1)
    mix = orthonormal(r, r, seed + 2)  # spread the spectrum over both factors
    B = Q1 @ torch.diag(torch.tensor(sigmas, dtype=F64)) @ mix
    A = mix.T @ Q2.T
    return B, A


def dense_svd(M: torch.Tensor):
    return np.linalg.svd(M.detach().double().numpy(), full_matrices=False)


def projector(U):
    U = np.asarray(U)
    return U @ U.swapaxes(-1, -2)


def assert_orthonormal_columns(U, atol):
    eye = torch.eye(U.shape[-1], dtype=U.dtype)
    torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- factored_svd


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


# ----------------------------------------------------------------------------- singular_basis


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


# ----------------------------------------------------------------------------- φ


def phi_double_loop(U, V):
    U, V = U.numpy(), V.numpy()
    p, q = U.shape[1], V.shape[1]
    out = np.empty((p, q))
    for i in range(1, p + 1):
        for j in range(1, q + 1):
            out[i - 1, j - 1] = np.linalg.norm(U[:, :i].T @ V[:, :j], "fro") ** 2 / min(i, j)
    return out


def test_subspace_similarity_matches_definition():
    U, V = orthonormal(20, 6, seed=20), orthonormal(20, 9, seed=21)
    V[:, 0] = U[:, 1]  # some shared direction so values are not all tiny
    V = torch.linalg.qr(V)[0]
    phi = subspace_similarity(U, V)
    assert phi.shape == (6, 9) and phi.dtype == F64
    np.testing.assert_allclose(phi.numpy(), phi_double_loop(U, V), rtol=0, atol=1e-12)
    batched = subspace_similarity(torch.stack([U, U]), torch.stack([V, V]))
    np.testing.assert_allclose(batched[1].numpy(), phi_double_loop(U, V), rtol=0, atol=1e-12)


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


# ----------------------------------------------------------------------------- spectral scalars


def spectral_reference(sigmas, energy=0.9):
    s = sorted((abs(float(x)) for x in sigmas), reverse=True)
    total_sq = sum(x * x for x in s)
    if total_sq == 0:
        return 0, 0.0, 0.0, 0.0
    running, erank = 0.0, None
    for k, x in enumerate(s, start=1):
        running += x * x
        if running >= energy * total_sq:
            erank = k
            break
    total = sum(s)
    entropy = -sum((x / total) * math.log(x / total) for x in s if x > 0)
    return erank, math.exp(entropy), total_sq / s[0] ** 2, math.sqrt(total_sq)


@pytest.mark.parametrize(
    ("sigmas", "expected"),
    [
        ([3.0, 0.0, 0.0], (1, 1.0, 1.0, 3.0)),
        ([0.0, 0.0, 0.0], (0, 0.0, 0.0, 0.0)),
        ([2.0] * 8, (8, 8.0, 8.0, math.sqrt(32.0))),
        ([1.0, 1.0, 0.0, 0.0], (2, 2.0, 2.0, math.sqrt(2.0))),
    ],
)
def test_spectral_scalars_known_spectra(sigmas, expected):
    S = torch.tensor(sigmas, dtype=F64)
    assert energy_rank(S).dtype == torch.int64
    assert int(energy_rank(S)) == expected[0]
    assert float(effective_rank(S)) == pytest.approx(expected[1], abs=1e-12)
    assert float(stable_rank(S)) == pytest.approx(expected[2], abs=1e-12)
    assert float(frobenius_norm(S)) == pytest.approx(expected[3], abs=1e-12)
    assert spectral_reference(sigmas) == pytest.approx(expected)


def test_spectral_scalars_match_python_formulas_batched():
    S = randn(4, 3, 7, seed=27).abs() ** 3  # steep-ish, distinct values
    S[0, 0] = 0.0
    S[1, 1, 3:] = 0.0
    S = S.sort(-1, descending=True).values
    er, ef, st, fr = energy_rank(S), effective_rank(S), stable_rank(S), frobenius_norm(S)
    assert er.shape == ef.shape == st.shape == fr.shape == (4, 3)
    for a in range(4):
        for b in range(3):
            ref = spectral_reference(S[a, b].tolist())
            assert int(er[a, b]) == ref[0]
            assert float(ef[a, b]) == pytest.approx(ref[1], rel=1e-12, abs=1e-12)
            assert float(st[a, b]) == pytest.approx(ref[2], rel=1e-12, abs=1e-12)
            assert float(fr[a, b]) == pytest.approx(ref[3], rel=1e-12, abs=1e-12)
    for energy in (0.5, 0.99, 1.0):
        ref = [[spectral_reference(row, energy)[0] for row in block] for block in S.tolist()]
        assert energy_rank(S, energy).tolist() == ref
    # Order does not matter.
    shuffled = S[..., torch.randperm(7, generator=gen(28))]
    assert torch.equal(energy_rank(shuffled), er)
    torch.testing.assert_close(effective_rank(shuffled), ef)


def test_spectral_scalars_dtypes_and_extremes():
    S = torch.tensor([4.0, 2.0, 1.0], dtype=torch.bfloat16)
    for fn in (effective_rank, stable_rank, frobenius_norm):
        assert fn(S).dtype == torch.float32
    huge = torch.tensor([3e30, 4e30], dtype=torch.float32)  # squares overflow float32
    assert float(frobenius_norm(huge)) == pytest.approx(5e30, rel=1e-6)
    assert float(stable_rank(huge)) == pytest.approx(1 + 9 / 16, rel=1e-6)
    tiny = torch.tensor([3e-30, 4e-30], dtype=torch.float32)  # squares underflow float32
    assert float(frobenius_norm(tiny)) == pytest.approx(5e-30, rel=1e-6)
    assert int(energy_rank(tiny)) == 2
    nan = torch.tensor([float("nan"), 1.0])
    assert int(energy_rank(nan)) == 0 and torch.isnan(effective_rank(nan))
    with pytest.raises(ValueError):
        energy_rank(S, 0.0)


# ----------------------------------------------------------------------------- amplification


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


# ----------------------------------------------------------------------------- intruders


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


# ----------------------------------------------------------------------------- hypothesis fuzz

FUZZ_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# "well_conditioned": singular values within 1…1.2, the Gram path's territory (where d, k ≥ r).
DEGENERACIES = ["none", "well_conditioned", "zero_B", "zero_A", "rank1", "repeated_columns", "zero_row_block"]


def _tolerance(dtype):
    return 1e-9 if dtype == F64 else 1e-4


@st.composite
def lora_cases(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    d, r, k = (draw(st.integers(1, 12)) for _ in range(3))
    dtype = draw(st.sampled_from(FUZZ_DTYPES))
    # float16 tops out at 65504: keep its entries in range and carry the rest in `scaling`.
    max_exp = 3 if dtype == torch.float16 else 6
    b_scale = 10.0 ** draw(st.floats(-6, max_exp))
    a_scale = 10.0 ** draw(st.floats(-6, max_exp))
    scaling = draw(st.sampled_from([1.0, -1.0])) * 10.0 ** draw(st.floats(-6, 6))
    degeneracy = draw(st.sampled_from(DEGENERACIES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = gen(seed)
    B = torch.randn(*batch, d, r, generator=g, dtype=F64) * b_scale
    A = torch.randn(*batch, r, k, generator=g, dtype=F64) * a_scale
    if degeneracy == "well_conditioned":
        B, A = _well_conditioned(B, g), _well_conditioned(A.mT, g).mT
    elif degeneracy == "zero_B":
        B = torch.zeros_like(B)
    elif degeneracy == "zero_A":
        A = torch.zeros_like(A)
    elif degeneracy == "rank1":
        B = B[..., :1] * torch.randn(r, generator=g, dtype=F64)
    elif degeneracy == "repeated_columns":
        B = B[..., :1].expand_as(B).clone()
        A = A[..., :1].expand_as(A).clone()
    elif degeneracy == "zero_row_block":
        B[..., : (d + 1) // 2, :] = 0.0
    return B.to(dtype), A.to(dtype), scaling


def _well_conditioned(X, g):
    """X's singular vectors and magnitude with singular values spread over 1…1.2 only."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    spread = 1 + 0.2 * torch.rand(U.shape[-1], generator=g, dtype=F64)
    return (U * spread) @ Vh * X.abs().amax((-2, -1), keepdim=True)


def _expected_path(X):
    """Per matrix of ``X: (..., n, r)``, from float64 eigenvalues of its Gram matrix: True where
    the Gram path must be taken (every eigenvalue well within [t/2, 2t], t their mean), False
    where it must not (r > n, zero, rank-deficient or κ² > 4 with a margin), None in between."""
    n, r = X.shape[-2:]
    X = X.to(functional.compute_dtype(X)).to(F64).reshape(-1, n, r)
    if r == 0 or r > n:
        return [False] * X.shape[0]
    eigenvalues = torch.linalg.eigvalsh(X.mT @ X)
    t = eigenvalues.mean(-1)
    moderate = (t > 1e-15) & (t < 1e15)  # well inside the range of the Gram path's squares
    inside = moderate & (eigenvalues[:, 0] >= 0.55 * t) & (eigenvalues[:, -1] <= 1.8 * t)
    outside = (t == 0) | (eigenvalues[:, 0] <= 0.45 * t) | (eigenvalues[:, -1] >= 2.2 * t)
    return [True if i else False if o else None for i, o in zip(inside.tolist(), outside.tolist())]


def _fuzz_example(kinds, dtype=torch.float32):
    """A fixed case of the fuzz: a batch of (6, 3) × (3, 5) factors, one matrix per kind."""
    g = gen(99)
    B = torch.randn(len(kinds), 6, 3, generator=g, dtype=F64)
    A = torch.randn(len(kinds), 3, 5, generator=g, dtype=F64)
    for index, kind in enumerate(kinds):
        if kind == "well_conditioned":
            B[index], A[index] = _well_conditioned(B[index], g), _well_conditioned(A[index].T, g).T
        elif kind == "zero_B":
            B[index] = 0.0
    return B.to(dtype), A.to(dtype), -0.5


# Both paths, every run: one batch all on the Gram path, one all on Householder QR, one mixed.
@example(case=_fuzz_example(["well_conditioned"] * 2))
@example(case=_fuzz_example(["zero_B"]))
@example(case=_fuzz_example(["well_conditioned", "zero_B", "well_conditioned"], torch.bfloat16))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lora_cases())
def test_fuzz_functional_layer(case):
    B, A, scaling = case
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    # The path each factor takes, where float64 says which one it must be.
    for factor in (B, A.mT):
        flat = factor.to(functional.compute_dtype(factor)).reshape(-1, *factor.shape[-2:])
        taken = thin_qr.gram_cholesky(flat)[1]
        for took, expected in zip(taken.tolist(), _expected_path(factor)):
            assert expected is None or took == expected
    d, r, k = B.shape[-2], B.shape[-1], A.shape[-1]
    m = min(d, r, k)
    out_dtype = F64 if B.dtype == F64 else torch.float32
    tol = _tolerance(B.dtype)

    U, S, Vh = factored_svd(B, A, scaling)
    assert U.dtype == S.dtype == Vh.dtype == out_dtype
    assert U.shape[-2:] == (d, m) and S.shape[-1] == m and Vh.shape[-2:] == (m, k)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert (S >= 0).all()
    assert (S[..., :-1] >= S[..., 1:]).all()
    # Orthonormal columns where S > 0 (in fact everywhere: Householder Q times an SVD factor).
    positive = (S > 0).to(out_dtype)
    mask = positive[..., :, None] * positive[..., None, :]
    eye = torch.eye(m, dtype=out_dtype)
    assert ((U.mT @ U - eye) * mask).abs().max() <= tol
    assert ((Vh @ Vh.mT - eye) * mask).abs().max() <= tol
    # Reconstruction, relative to the rounding scale |s|·‖B‖_F·‖A‖_F (ΔW itself may cancel to 0).
    B64, A64 = B.to(F64), A.to(F64)
    delta = scaling * B64 @ A64
    scale = abs(scaling) * torch.linalg.matrix_norm(B64) * torch.linalg.matrix_norm(A64)
    err = ((U * S[..., None, :]).to(F64) @ Vh.to(F64) - delta).abs().amax((-2, -1))
    assert (err <= (1e-10 if out_dtype == F64 else 1e-5) * scale).all()

    for basis in BASES:
        base = singular_basis(B, A, scaling, basis)
        assert torch.isfinite(base).all()
        phi = subspace_similarity(base, base.flip(-1))
        assert torch.isfinite(phi).all() and (phi >= 0).all() and (phi <= 1).all()
        self_phi = subspace_similarity(base, base)
        assert (self_phi >= 0).all() and (self_phi <= 1).all()

    er, ef, sr, fn = energy_rank(S), effective_rank(S), stable_rank(S), frobenius_norm(S)
    for value in (ef, sr, fn):
        assert value.dtype == out_dtype and torch.isfinite(value).all()
    zero = S.amax(-1) == 0
    assert (er[zero] == 0).all() and (ef[zero] == 0).all() and (sr[zero] == 0).all()
    assert ((er[~zero] >= 1) & (er[~zero] <= m)).all()
    assert ((ef[~zero] >= 1 - tol) & (ef[~zero] <= m + tol * m)).all()
    assert ((sr[~zero] >= 1 - tol) & (sr[~zero] <= m + tol * m)).all()

    W0 = torch.randn(d, k, generator=gen(d * 100 + k), dtype=F64).to(B.dtype)
    amp = amplification_factor(U, S, Vh, W0)
    assert amp.dtype == out_dtype and not torch.isnan(amp).any() and (amp >= 0).all()
    intruders = intruder_dimensions(W0, U, S, Vh, top_k=4)
    assert ((intruders >= 0) & (intruders <= min(4, d, k))).all()
