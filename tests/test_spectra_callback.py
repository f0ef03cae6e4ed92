"""Spectral scalars, amplification, intruder dimensions and the rank recommendation, end to end.

A real tiny peft Llama is trained by a real Trainer; every logged number is checked against a
dense computation from peft's own ``get_delta_weight`` and the base layer's weight W₀.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.outputs.report import CAUTIONS_BELOW, summary_line
from lora_monitor.outputs.tags import OPTIONAL_SCALAR_NAMES, RECOMMENDATION_TAG, SCALAR_NAMES, scalar_tag
from tests.helpers.dense import base_weights, dense_basis, dense_phi, dense_updates
from tests.helpers.events import read_events, scalar_series
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora


def dense_shared_directions(phi: torch.Tensor, n: int, false_alarm: float = 1e-3) -> int:
    """The documented rule, written out with Python floats."""
    m = min(phi.shape)
    x = math.log(m / false_alarm)
    count = 0
    for i in range(1, m + 1):
        gain = i * float(phi[i - 1, i - 1]) - (i - 1) * (float(phi[i - 2, i - 2]) if i > 1 else 0.0)
        nu = 2 * i - 1
        if gain >= (nu + 2 * math.sqrt(nu * x) + 2 * x) / n:
            count = i
    return count


def test_spectral_scalars_amplification_and_intruders_match_dense(tmp_path, caplog):
    reference_model = tiny_llama_lora(rank=4, seed=1)
    reference_model.save_pretrained(str(tmp_path / "seed1"))
    model = tiny_llama_lora(rank=4, seed=0, randomize_B=False)
    initial_A = {key: A.clone() for key, (_, A, _) in dense_updates(model).items()}
    monitor = LoRASubspaceMonitor(every_n_steps=4, reference=tmp_path / "seed1", intruder_top_k=6)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with caplog.at_level(logging.INFO):
        trainer.fit(CausalLMModule(model))

    events = read_events(trainer.logger.log_dir)
    expected_tags = {scalar_tag(n, k) for n in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES for k in initial_A}
    assert expected_tags <= set(events.Tags()["scalars"])
    current, reference, W0s = dense_updates(model), dense_updates(reference_model), base_weights(model)
    for key, (delta, A, B) in current.items():
        logged = {name: scalar_series(events, scalar_tag(name, key))[4] for name in SCALAR_NAMES + OPTIONAL_SCALAR_NAMES}
        sigma = torch.linalg.svdvals(delta)[:4]
        energy = sigma.square().cumsum(0)
        assert logged["delta_w_energy_rank"] == int((energy < 0.9 * energy[-1]).sum()) + 1
        p = sigma / sigma.sum()
        assert logged["delta_w_effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
        assert logged["delta_w_stable_rank"] == pytest.approx(float(energy[-1] / sigma[0] ** 2), rel=1e-4)

        # §7.3: ‖ΔW‖_F / ‖Uᵀ W₀ V‖_F with U, V the top-r singular vectors of the dense ΔW.
        W0 = W0s[key]
        U, S, Vh = torch.linalg.svd(delta)
        projected = U[:, :4].T @ W0 @ Vh[:4].T
        amplification = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(projected)
        assert logged["delta_w_amplification"] == pytest.approx(float(amplification), rel=1e-4)
        relative = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(W0)
        assert logged["delta_w_relative_norm"] == pytest.approx(float(relative), rel=1e-4)

        # Shuttleworth et al.: top-6 left singular vectors of W₀ + ΔW whose best cosine with
        # any left singular vector of W₀ is below 0.5.
        base_left = torch.linalg.svd(W0).U
        merged_left = torch.linalg.svd(W0 + delta).U[:, :6]
        intruders = int(((merged_left.T @ base_left).abs().amax(1) < 0.5).sum())
        assert logged["intruder_dimensions"] == intruders

        phi = dense_phi(dense_basis(*reference[key], "A"), dense_basis(delta, A, B, "A"))
        assert logged["shared_directions"] == dense_shared_directions(phi, n=A.shape[1])
        # φ(A₀, A, r, r): the share of A's row space still spanned by its initial value.
        start, now = dense_basis(delta, initial_A[key], B, "A"), dense_basis(delta, A, B, "A")
        assert logged["a_init_similarity"] == pytest.approx(float(dense_phi(start, now)[-1, -1]), abs=1e-5)

    # The recommendation: Markdown in TensorBoard's text tab, one line in the console.
    text = events.Tensors(f"{RECOMMENDATION_TAG}/text_summary")
    assert [event.step for event in text] == [4]
    markdown = text[0].tensor_proto.string_val[0].decode()
    assert "| layer_01.v " in markdown and "shared directions" in markdown
    assert monitor.recommendation is not None and monitor.recommendation.compared
    # The report's first line is the console's, pointing below instead of at the Text tab.
    assert summary_line(monitor.recommendation, CAUTIONS_BELOW) in markdown
    assert any(
        r.getMessage() == f"LoRASubspaceMonitor: {summary_line(monitor.recommendation)}" for r in caplog.records
    )


