"""lora_monitor.analysis.device: the batched work on the model's device: cached reference bases give
the uncached analysis, and half-precision factors are analyzed in float32."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.analysis import ReferenceBases, Snapshot, analyze
from lora_monitor.functional import BASES, singular_basis, subspace_similarity
from tests.helpers.dense import dense_basis, dense_phi
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
