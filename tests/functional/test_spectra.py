"""lora_monitor.functional.spectra: energy, effective and stable ranks and the norm of a spectrum,
against the formulas written out in Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from lora_monitor.functional import effective_rank, energy_rank, frobenius_norm, stable_rank
from tests.helpers.linalg import F64, gen, randn


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
