"""φ, spectra, amplification and intruder dimensions under each peft variant, against dense
computations on small shapes: ΔW (or DoRA's directional term) formed from the live peft
layer's own tensors, decomposed by a full SVD, φ as the LoRA paper defines it. And what a
reference whose update cannot be known (DoRA without W₀) does: said, never s·B·A."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import SEPARATE, base_model, peft_model

from lora_monitor.adapters import find_lora_factors, load_adapter
from lora_monitor.snapshots import Snapshot, analyze, new_notes

ARCH = SEPARATE["llama"]


def _layers(model) -> dict[tuple[int, str], torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    names = {"q_proj": "q", "v_proj": "v"}
    return {
        (int(next(p for p in name.split(".") if p.isdigit())), names[name.rsplit(".", 1)[-1]]): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _perturb(model, seed: int, std: float = 0.05) -> None:
    """A training-like move of every trainable tensor (B leaves zero, DoRA's m moves too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


def dense_phi(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖X[:, :i]ᵀ Y[:, :j]‖_F² / min(i, j), the paper's definition, by a double loop."""
    grid = torch.empty(X.shape[1], Y.shape[1], dtype=torch.float64)
    for i in range(1, X.shape[1] + 1):
        for j in range(1, Y.shape[1] + 1):
            grid[i - 1, j - 1] = (X[:, :i].T @ Y[:, :j]).square().sum() / min(i, j)
    return grid


def dora_directional(layer) -> torch.Tensor:
    """D·s·B·A with D = diag(m / ‖row of W₀ + s·B·A‖), from the layer's own tensors."""
    W0 = layer.get_base_layer().weight.detach().double()
    low_rank = layer.get_delta_weight("default").detach().double()  # peft: s·B·A for DoRA too
    m = layer.lora_magnitude_vector["default"].weight.detach().double().view(-1)
    return (m / torch.linalg.vector_norm(W0 + low_rank, dim=1))[:, None] * low_rank


def test_dora_reference_restored_from_a_checkpoint_keeps_its_scale(tmp_path):
    """A DoRA "first" reference restored from the monitor's state (no W₀ in it) is compared in
    ΔW's bases by its directional term D·s·B·A, as the uninterrupted run compares it."""
    from lora_monitor.engine import LoRAMonitor

    model = peft_model(ARCH, base_model(ARCH), use_dora=True).double()
    _perturb(model, 0)
    with torch.no_grad():  # a row scale far from 1, so that D·B and B span other columns
        for layer in _layers(model).values():
            layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.2, 3.0, layer.out_features, dtype=torch.float64))
    reference_terms = {key: dora_directional(layer) for key, layer in _layers(model).items()}
    uninterrupted = LoRAMonitor(log_dir=tmp_path / "a", every_n_steps=1, basis="delta_w_left")
    uninterrupted.attach(model)
    uninterrupted.start(0)
    uninterrupted.step(1)  # the reference "first"
    state = uninterrupted.state_dict()
    _perturb(model, 1)
    uninterrupted.step(2)
    resumed = LoRAMonitor(log_dir=tmp_path / "b", every_n_steps=1, basis="delta_w_left")
    resumed.attach(model)
    resumed.load_state_dict(state)
    resumed.step(2)
    for monitor in (uninterrupted, resumed):
        monitor.close()
    for key, layer in _layers(model).items():
        r = layer.r["default"]
        expected = dense_phi(
            torch.linalg.svd(reference_terms[key])[0][:, :r], torch.linalg.svd(dora_directional(layer))[0][:, :r]
        )
        for monitor in (uninterrupted, resumed):
            torch.testing.assert_close(monitor.latest_analysis[key].phi.double(), expected, rtol=0, atol=1e-8)


def test_a_reference_whose_update_is_unknown_gets_no_delta_w_phi_and_says_so(tmp_path):
    """Saved adapters compared without a base model (the CLI's compare): a DoRA reference has no
    W₀, so its ΔW bases cannot be known; φ in them is left out with a note (once), not computed
    from s·B·A. φ in A still is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in (("dora", {"use_dora": True}), ("plain", {})):
            model = peft_model(ARCH, base_model(ARCH), **kwargs)
            _perturb(model, 2)
            model.save_pretrained(str(tmp_path / name))
    reference = load_adapter(tmp_path / "dora").factors
    current = Snapshot(1, load_adapter(tmp_path / "plain").factors)
    given: set[str] = set()
    for _ in range(2):
        analyses = analyze(current, reference, "delta_w_left")
        assert all(a.phi is None and a.delta_w_known for a in analyses.values())
        notes = new_notes(analyses, given)
    assert notes == []  # said once: the second snapshot repeats nothing
    (note,) = {n for a in analyses.values() for n in a.notes}
    assert note.startswith("the reference is DoRA and its ΔW cannot be computed (DoRA rescales the rows of W₀")
    assert "φ in basis 'delta_w_left' is not computed" in note
    assert all(a.phi is not None for a in analyze(current, reference, "A").values())
