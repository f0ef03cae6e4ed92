"""Random matrices of known structure, and dense float64 references, for the maths tests."""

from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


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
