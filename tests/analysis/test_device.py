"""lora_monitor.analysis.device: the batched work on the model's device: cached reference bases give
the uncached analysis, half-precision factors are analyzed in float32, and the numbers do not
depend on the float32 matmul precision the user set for training."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from peft import PeftModel

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.adapters import find_lora_factors
from lora_monitor.analysis import ReferenceBases, Snapshot, analyze
from lora_monitor.functional import BASES, singular_basis, subspace_similarity
from lora_monitor.functional.thin_qr import exact_matmul
from tests.helpers.dense import base_weights, dense_basis, dense_phi, dense_updates
from tests.helpers.events import analysis_warnings
from tests.helpers.factors import factors_without_base
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import llama_lora_module, tiny_llama_lora


@pytest.mark.parametrize("basis", BASES)
def test_cached_reference_bases_give_the_uncached_analysis(basis):
    snapshot = Snapshot.capture(factors_without_base(6, 0), step=3)
    reference = factors_without_base(2, 1)
    bases = ReferenceBases.compute(reference, snapshot.factors, basis)
    cached = analyze(snapshot, reference, basis, reference_bases=bases)
    plain = analyze(snapshot, reference, basis)
    for key, analysis in plain.items():
        torch.testing.assert_close(cached[key].phi, analysis.phi)
        torch.testing.assert_close(cached[key].singular_values, analysis.singular_values)
        # and against the dense φ of the explicit bases
        f, r = snapshot.factors[key], reference[key]
        dense = subspace_similarity(
            singular_basis(r.lora_B, r.lora_A, r.scaling, basis), singular_basis(f.lora_B, f.lora_A, f.scaling, basis)
        )
        torch.testing.assert_close(analysis.phi, dense)
    with pytest.raises(ValueError, match="basis"):
        analyze(snapshot, reference, "A" if basis != "A" else "B", reference_bases=bases)


def test_half_precision_factors_are_analysed_in_float32(tmp_path):
    # A reference saved from a float16 model, a model trained in bfloat16.
    reference_model = tiny_llama_lora(rank=4, seed=1).to(torch.float16)
    reference_model.save_pretrained(str(tmp_path / "fp16"))
    model = tiny_llama_lora(rank=4).to(torch.bfloat16)
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference=tmp_path / "fp16", basis="delta_w_left")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=2).fit(CausalLMModule(model))
    assert analysis_warnings(caught) == []

    def exact(model: PeftModel, key) -> tuple[torch.Tensor, ...]:
        # ΔW from the half-precision factors in float64 (peft's get_delta_weight rounds B @ A
        # to the factors' dtype).
        layer = llama_lora_module(model, *key)
        A, B = (f["default"].weight.detach().double() for f in (layer.lora_A, layer.lora_B))
        return layer.scaling["default"] * B @ A, A, B

    assert set(monitor.latest_analysis) == {(layer, p) for layer in range(2) for p in ("q", "v")}
    for key, analysis in monitor.latest_analysis.items():
        assert analysis.phi.dtype == analysis.singular_values.dtype == torch.float32
        current, reference = exact(model, key), exact(reference_model, key)
        expected = dense_phi(dense_basis(*reference, "delta_w_left"), dense_basis(*current, "delta_w_left"))
        torch.testing.assert_close(analysis.phi.double(), expected, atol=1e-5, rtol=0)
        sigma = torch.linalg.svdvals(current[0])
        torch.testing.assert_close(analysis.singular_values.double(), sigma[:4], rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _legacy_matmul_precision(value: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _backend_precision(backend: Any, value: str) -> Iterator[None]:
    before = backend.fp32_precision
    backend.fp32_precision = value
    try:
        yield
    finally:
        backend.fp32_precision = before


#: The switches a user sets for training that round float32 matrix products: Lightning's start-up
#: tip, the newer per-backend API, and the autocast region of a mixed-precision loop.
REDUCED_PRECISION: dict[str, Callable[[str], contextlib.AbstractContextManager[Any]]] = {
    "set_float32_matmul_precision_medium": lambda device: _legacy_matmul_precision("medium"),
    "set_float32_matmul_precision_high": lambda device: _legacy_matmul_precision("high"),
    "backend_fp32_precision": lambda device: _backend_precision(
        torch.backends.cuda.matmul if device == "cuda" else torch.backends.mkldnn.matmul,
        "tf32" if device == "cuda" else "bf16",
    ),
    "autocast_bf16": lambda device: torch.autocast(device, dtype=torch.bfloat16),
}


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
        ),
    ],
)
@pytest.mark.parametrize("setting", sorted(REDUCED_PRECISION))
def test_numbers_do_not_depend_on_the_users_matmul_precision(setting, device):
    # Every number of the analysis (φ, the spectrum, the bases' spectra, amplification, relative
    # norm) against the dense float64 path, while the user's setting rounds float32 products to
    # TF32 / bfloat16 (on AMX CPUs and on GPUs with TF32 they really are rounded): the analysis
    # notices and computes in float64, and leaves the setting as the user set it.
    model, reference_model = tiny_llama_lora(rank=4).to(device), tiny_llama_lora(rank=4, seed=1).to(device)
    snapshot = Snapshot.capture(find_lora_factors(model), step=1)
    with REDUCED_PRECISION[setting](device):
        assert not exact_matmul(torch.device(device))  # the setting does round float32 products
        analyses = analyze(snapshot, find_lora_factors(reference_model), "delta_w_left", initial=None)
        still_set = not exact_matmul(torch.device(device))
    assert still_set and exact_matmul(torch.device(device))  # untouched while analyzing, restored by the test
    current, reference, W0s = dense_updates(model), dense_updates(reference_model), base_weights(model)
    for key, analysis in analyses.items():
        delta, W0 = current[key][0], W0s[key]
        expected_phi = dense_phi(
            dense_basis(*reference[key], "delta_w_left"), dense_basis(*current[key], "delta_w_left")
        )
        torch.testing.assert_close(analysis.phi.double().cpu(), expected_phi.cpu(), atol=1e-4, rtol=0)
        U, S, Vh = torch.linalg.svd(delta)
        torch.testing.assert_close(analysis.singular_values.double().cpu(), S[:4].cpu(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(analysis.basis_singular_values.double().cpu(), S[:4].cpu(), rtol=1e-4, atol=1e-7)
        amplification = float(torch.linalg.norm(S) / torch.linalg.norm(U[:, :4].T @ W0 @ Vh[:4].T))
        assert analysis.delta_w_amplification == pytest.approx(amplification, rel=1e-4)
        assert analysis.delta_w_relative_norm == pytest.approx(
            float(torch.linalg.norm(S) / torch.linalg.norm(W0)), rel=1e-4
        )
