"""The whole functional layer under hypothesis: random shapes, dtypes, magnitudes and degenerate
factors, every output finite, in range and consistent, each factor on the QR path float64 says."""

from __future__ import annotations

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
    singular_basis,
    stable_rank,
    subspace_similarity,
    thin_qr,
)
from tests.helpers.linalg import F64, gen

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
