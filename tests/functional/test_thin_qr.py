"""lora_monitor.functional.thin_qr: the Gram path of the functional layer (issue 12) against float64 dense SVDs.

Each factor's QR comes from its Gram matrix where :func:`lora_monitor.functional.thin_qr.gram_cholesky`
certifies that exact, else from Householder QR. Whichever path a matrix takes, the results must
be as exact as before: rebuilt product ≤ 1e-5 relative, UᵀU and VᵀV within 1e-4 of the identity,
φ within 1e-5, in float32, from bfloat16 inputs, batched, on well-conditioned factors, on factors
whose spectra span 10⁰…10⁻⁶ and on exactly rank-deficient ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_monitor import functional
from lora_monitor.functional import BASES, factored_basis, factored_svd, singular_basis, subspace_similarity, thin_qr

F64 = torch.float64
D, R, K = 192, 12, 160  # small: the tolerances, not the sizes, are what is tested
BATCH = 3


def with_spectrum(n: int, r: int, sigmas, generator) -> torch.Tensor:
    """An n×r float64 matrix with singular values ``sigmas`` and random singular vectors."""
    left = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=F64))[0]
    right = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=F64))[0]
    return left @ torch.diag(torch.as_tensor(sigmas, dtype=F64)) @ right.T


def well(n, r, g):
    # Distinct singular values 1 … 1.4 (κ² ≈ 2): the Gram path's territory.
    return with_spectrum(n, r, torch.linspace(1.4, 1.0, r), g)


def spanning(n, r, g, decades=6):
    return with_spectrum(n, r, torch.logspace(0, -decades, r), g)


#: σᵢ ≥ σ₁/20: the leading directions that float32 inputs determine to 1e-5 when the spectrum
#: spans decades (below, the rounding of the inputs themselves moves the vectors).
def leading(decades):
    return int((torch.logspace(0, -decades, R) >= 1 / 20).sum())


def zero_columns(n, r, g):
    X = torch.randn(n, r, generator=g, dtype=F64)
    X[:, ::3] = 0.0
    return X


# Each case: (B of one batch entry, A of one batch entry) as functions of a generator.
CASES = {
    "well_conditioned": (lambda g: 0.02 * well(D, R, g), lambda g: well(K, R, g).T),
    # The benchmark's and peft's kind of factors: Gaussian B, Kaiming-like A (κ² ≈ 1.7 … 2).
    "gaussian": (
        lambda g: 0.01 * torch.randn(D, R, generator=g, dtype=F64),
        lambda g: torch.randn(R, K, generator=g, dtype=F64) / K**0.5,
    ),
    # κ = 100 and 10⁴: the Gram path would lose orthogonality (≈ u·κ²) where it still runs.
    "B_spans_1e0_1e-2": (lambda g: spanning(D, R, g, 2), lambda g: well(K, R, g).T),
    "B_spans_1e0_1e-4": (lambda g: spanning(D, R, g, 4), lambda g: well(K, R, g).T),
    "B_spans_1e0_1e-6": (lambda g: spanning(D, R, g), lambda g: well(K, R, g).T),
    "both_span_1e0_1e-6": (lambda g: spanning(D, R, g), lambda g: spanning(K, R, g).T),
    "zero_columns": (lambda g: zero_columns(D, R, g), lambda g: well(K, R, g).T),
    "B_zero": (lambda g: torch.zeros(D, R, dtype=F64), lambda g: well(K, R, g).T),
}


def batch_of(kinds, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.stack([CASES[kind][0](g) for kind in kinds]).to(dtype)
    A = torch.stack([CASES[kind][1](g) for kind in kinds]).to(dtype)
    return B, A


def gram_path(X: torch.Tensor) -> torch.Tensor:
    """Which matrices of a batch the Gram path takes (in the compute dtype)."""
    X = X.to(functional.compute_dtype(X))
    return thin_qr.gram_cholesky(X.reshape(-1, *X.shape[-2:]))[1]


def dense(B: torch.Tensor, A: torch.Tensor, scaling: float):
    """ΔW of the (rounded) factors and its SVD, in float64."""
    delta = scaling * B.to(F64) @ A.to(F64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return delta, U, S, Vh


def assert_identity(M: torch.Tensor, atol: float) -> None:
    eye = torch.eye(M.shape[-1], dtype=F64).expand_as(M)
    torch.testing.assert_close(M.to(F64), eye, atol=atol, rtol=0)


EXPECTED_PATHS = {  # (B, Aᵀ) on the Gram path?
    "well_conditioned": (True, True),
    "gaussian": (True, True),
    "B_spans_1e0_1e-2": (False, True),
    "B_spans_1e0_1e-4": (False, True),
    "B_spans_1e0_1e-6": (False, True),
    "both_span_1e0_1e-6": (False, False),
    "zero_columns": (False, True),
    "B_zero": (False, True),
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", CASES)
def test_factored_svd_exact_on_either_path(kind, dtype):
    B, A = batch_of([kind] * BATCH, dtype)
    on_b, on_a = EXPECTED_PATHS[kind]
    assert gram_path(B).tolist() == [on_b] * BATCH and gram_path(A.mT).tolist() == [on_a] * BATCH
    scaling = -1.5
    U, S, Vh = factored_svd(B, A, scaling)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    delta, _, dS, _ = dense(B, A, scaling)
    assert_identity(U.mT @ U, 1e-4)
    assert_identity(Vh @ Vh.mT, 1e-4)
    rebuilt = (U.to(F64) * S.to(F64)[..., None, :]) @ Vh.to(F64)
    error = torch.linalg.matrix_norm(rebuilt - delta)
    norm = torch.linalg.matrix_norm(delta)
    if kind == "B_zero":
        assert (S == 0).all() and (norm == 0).all() and (error == 0).all()
    else:
        assert (error <= 1e-5 * norm).all(), (error / norm).tolist()
        torch.testing.assert_close(S.to(F64), dS[..., :R], atol=1e-5 * float(dS[..., 0].max()), rtol=0)


def reference_basis(n: int, p: int = 5) -> torch.Tensor:
    # Random orthonormal directions plus ones close to the tested basis would make φ trivial; a
    # random reference makes φ first-order sensitive to errors in the basis.
    return torch.linalg.qr(torch.randn(n, p, generator=torch.Generator().manual_seed(7), dtype=F64))[0]


def dense_basis(B, A, scaling, basis):
    if basis == "A":
        return torch.linalg.svd(A.to(F64), full_matrices=False)[2].mT
    if basis == "B":
        return torch.linalg.svd(B.to(F64), full_matrices=False)[0]
    _, U, _, Vh = dense(B, A, scaling)
    return U[..., :R] if basis == "delta_w_left" else Vh[..., :R, :].mT


def determined(kind: str, basis: str) -> int:
    """How many leading directions of ``basis`` the float32 inputs determine to 1e-5: all where
    the spectrum is well separated, the :func:`leading` ones where it spans decades, none of B's
    where B = 0."""
    if kind == "B_zero":
        return 0 if basis != "A" else R
    if kind == "zero_columns" and basis != "A":
        return R - len(range(0, R, 3))  # the nonzero singular values of a rank-deficient B
    if kind == "both_span_1e0_1e-6" or (kind.startswith("B_spans") and basis != "A"):
        return leading(int(kind[-1]))
    return R


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("kind", CASES)
def test_phi_exact_on_either_path(kind, basis, dtype):
    B, A = batch_of([kind] * BATCH, dtype, seed=1)
    scaling = 0.5
    m = determined(kind, basis)
    if m == 0:
        pytest.skip("B = 0 has no singular vectors")  # the analysis reports it: tests/engine/test_reporter.py
    S, Q, W, basis_S = factored_basis(B, A, scaling, basis)
    expected = dense_basis(B, A, scaling, basis)
    assert_identity((Q @ W).mT @ (Q @ W), 1e-4)
    torch.testing.assert_close(singular_basis(B, A, scaling, basis), Q @ W)
    U_ref = reference_basis(Q.shape[-2]).expand(BATCH, -1, -1)
    phi = subspace_similarity(U_ref, Q, W[..., :m])
    torch.testing.assert_close(phi.to(F64), subspace_similarity(U_ref, expected[..., :m]), atol=1e-5, rtol=0)
    # Against the dense basis itself: 1 everywhere (nested subspaces), second-order in the error.
    own = subspace_similarity(expected[..., :m], Q, W[..., :m])
    torch.testing.assert_close(own.to(F64), torch.ones_like(own, dtype=F64), atol=1e-5, rtol=0)
    dS = dense(B, A, scaling)[2][..., :R]
    torch.testing.assert_close(S.to(F64), dS, atol=1e-5 * float(dS[..., 0].max()), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_mixing_both_paths(dtype):
    # One call, matrices routed each their own way; results as exact as if analyzed alone.
    kinds = ["gaussian", "B_spans_1e0_1e-6", "B_zero", "well_conditioned", "zero_columns", "B_spans_1e0_1e-2"]
    B, A = batch_of(kinds, dtype, seed=2)
    assert gram_path(B).tolist() == [EXPECTED_PATHS[kind][0] for kind in kinds]
    scaling = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
    U, S, Vh = factored_svd(B, A, scaling)
    delta = dense(B, A, 1.0)[0] * scaling.to(F64)[:, None, None]
    assert_identity(U.mT @ U, 1e-4)
    assert_identity(Vh @ Vh.mT, 1e-4)
    rebuilt = (U.to(F64) * S.to(F64)[..., None, :]) @ Vh.to(F64)
    assert (torch.linalg.matrix_norm(rebuilt - delta) <= 1e-5 * torch.linalg.matrix_norm(delta)).all()
    for index in range(len(kinds)):
        alone = factored_svd(B[index], A[index], scaling[index])
        torch.testing.assert_close(S[index], alone[1], atol=1e-6 * float(alone[1][0]) + 1e-30, rtol=0)
    for basis in BASES:
        S_b, Q, W, _ = factored_basis(B, A, scaling, basis)
        torch.testing.assert_close(S_b, S)
        assert_identity((Q @ W).mT @ (Q @ W), 1e-4)
        alone = [singular_basis(B[i], A[i], scaling[i], basis) for i in range(len(kinds))]
        keep = [i for i, kind in enumerate(kinds) if kind != "B_zero" or basis == "A"]
        for i in keep:
            # Same subspaces column by column (|cosine| 1) for the well-determined directions.
            m = determined(kinds[i], basis)
            cosines = ((Q[i] @ W[i])[:, :m] * alone[i][:, :m]).sum(0).abs()
            torch.testing.assert_close(cosines, torch.ones(m), atol=1e-4, rtol=0)


def test_non_finite_and_extreme_factors_take_the_exact_path():
    B, A = batch_of(["gaussian"] * 4, torch.float32, seed=3)
    B[1, 0, 0] = float("nan")
    B[2] *= 1e19  # XᵀX would overflow float32
    B[3] *= 1e-25  # … or underflow it
    assert gram_path(B).tolist() == [True, False, False, False]
    U, S, Vh = factored_svd(B, A)
    assert torch.isnan(S[1]).all() and torch.isfinite(S[[0, 2, 3]]).all()
    for i in (0, 2, 3):
        expected = torch.linalg.svdvals(B[i].to(F64) @ A[i].to(F64))[:R]
        torch.testing.assert_close(S[i].to(F64), expected, rtol=1e-5, atol=0)
    assert_identity(U[[0, 2, 3]].mT @ U[[0, 2, 3]], 1e-4)


def test_float64_takes_the_gram_path_to_float64_accuracy():
    B, A = batch_of(["gaussian"] * 2, F64, seed=4)
    assert gram_path(B).all() and gram_path(A.mT).all()
    U, S, Vh = factored_svd(B, A, 2.0)
    delta = dense(B, A, 2.0)[0]
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, delta, atol=1e-14, rtol=0)
    assert_identity(U.mT @ U, 1e-13)


def test_reduced_precision_matmul_turns_the_gram_path_off():
    # TF32 / bfloat16 matmuls (set_float32_matmul_precision, fp32_precision, autocast) round the
    # Gram matrix at 1e-3: the certificate assumes float32 products, so it must not be used on
    # float32 input, and factored_svd computes in float64.
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        assert not thin_qr.exact_matmul(torch.device("cpu"))
        B, A = batch_of(["gaussian"] * 2, torch.float32, seed=5)
        _, T, _, _, _ = thin_qr.orthogonal_factor(B, with_q=True)
        assert T is None  # Householder for every matrix
        U, S, Vh = factored_svd(B, A)
        assert U.dtype == torch.float64  # the analysis computes in float64 while products are rounded
        assert_identity(U.mT @ U, 1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not thin_qr.exact_matmul(torch.device("cpu"))
    finally:
        backend.fp32_precision = before
    assert thin_qr.exact_matmul(torch.device("cpu"))


def test_gram_path_forms_no_basis_for_phi():
    # φ against a reference needs Uᵀ B and r×r work only: on the Gram path factored_basis hands
    # back the factor itself (no n×r product), and φ from it matches the formed basis.
    B, A = batch_of(["gaussian"] * 2, torch.float32, seed=6)
    S, Q, W, _ = factored_basis(B, A, 1.0, "delta_w_left")
    assert Q.data_ptr() == B.data_ptr()
    U_ref = reference_basis(D).float().expand(2, -1, -1)
    np.testing.assert_allclose(
        subspace_similarity(U_ref, Q, W).numpy(), subspace_similarity(U_ref, Q @ W).numpy(), atol=1e-6
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_space_similarity_is_the_last_phi_cell(dtype):
    # φ(A₀, A, r, r) without singular vectors: the last cell of the grid of the two bases, on
    # either path and mixed (well-conditioned, spanning decades, rank-deficient).
    kinds = ["gaussian", "both_span_1e0_1e-6", "well_conditioned", "zero_columns"]
    g = torch.Generator().manual_seed(8)
    X = torch.stack([CASES[kind][0](g) for kind in kinds]).to(dtype)
    rms = X.to(F64).square().mean((-2, -1), keepdim=True).sqrt()
    Y = (X.to(F64) + 0.3 * rms * torch.randn(X.shape, generator=g, dtype=F64)).to(dtype)
    assert gram_path(X).tolist() == [True, False, True, False]
    got = functional.column_space_similarity(X, Y)
    assert got.shape == (len(kinds),) and got.dtype == torch.float32
    grid = subspace_similarity(singular_basis(X, X.mT, basis="B"), singular_basis(Y, Y.mT, basis="B"))
    torch.testing.assert_close(got, grid[..., -1, -1], atol=1e-5, rtol=0)
    # float64 dense reference, where float32 determines the column spaces (well-conditioned):
    # orthonormal bases from the SVD.
    for index in (0, 2):
        ux = torch.linalg.svd(X[index].to(F64), full_matrices=False)[0]
        uy = torch.linalg.svd(Y[index].to(F64), full_matrices=False)[0]
        assert abs(float(got[index]) - float((ux.T @ uy).square().sum() / R)) <= 1e-5
    assert 0.3 < float(got[0]) < 0.99  # partly shared: not a trivial 0 or 1
    nan = X.clone()
    nan[1, 0, 0] = float("nan")
    assert torch.isnan(functional.column_space_similarity(nan, Y)[1])
    with pytest.raises(ValueError, match="same space"):
        functional.column_space_similarity(X, Y[..., :-1, :])
