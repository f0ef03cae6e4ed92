"""lora_monitor.analysis.update_factors: φ, spectra, amplification and intruder dimensions under each
peft variant, against dense computations on small shapes: ΔW (or DoRA's directional term)
formed from the live peft layer's own tensors, decomposed by a full SVD, φ as the LoRA paper
defines it. And what a reference or a run whose update cannot be known (DoRA without W₀, PiSSA
without its initial factors) does: said, never s·B·A."""

from __future__ import annotations

import warnings

import pytest
import torch

from lora_monitor.adapters import find_lora_factors, load_adapter
from lora_monitor.analysis import Snapshot, analyze, new_notes
from tests.helpers.architectures import SEPARATE, base_model, peft_model, quantized_llama
from tests.helpers.dense import dense_phi
from tests.helpers.models import add_lora, lora_layers_by_key

ARCH = SEPARATE["llama"]


def _perturb(model, seed: int, std: float = 0.05) -> None:
    """A training-like move of every trainable tensor (B leaves zero, DoRA's m moves too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)


def _scale_magnitudes(model, low: float, high: float) -> None:
    """Multiply each DoRA layer's magnitude vector m by a ramp from ``low`` to ``high``."""
    with torch.no_grad():
        for layer in lora_layers_by_key(model).values():
            layer.lora_magnitude_vector["default"].weight.mul_(
                torch.linspace(low, high, layer.out_features, dtype=torch.float64)
            )


def dora_directional(layer) -> torch.Tensor:
    """D·s·B·A with D = diag(m / ‖row of W₀ + s·B·A‖), from the layer's own tensors."""
    W0 = layer.get_base_layer().weight.detach().double()
    low_rank = layer.get_delta_weight("default").detach().double()  # peft: s·B·A for DoRA too
    m = layer.lora_magnitude_vector["default"].weight.detach().double().view(-1)
    return (m / torch.linalg.vector_norm(W0 + low_rank, dim=1))[:, None] * low_rank


def left_phi(X: torch.Tensor, Y: torch.Tensor, r: int) -> torch.Tensor:
    """The dense φ of the top-r left singular vectors of X and of Y."""
    return dense_phi(torch.linalg.svd(X)[0][:, :r], torch.linalg.svd(Y)[0][:, :r])


def test_dora_reference_restored_from_a_checkpoint_keeps_its_scale(tmp_path):
    """A DoRA "first" reference restored from the monitor's state (no W₀ in it) is compared in
    ΔW's bases by its directional term D·s·B·A, as the uninterrupted run compares it."""
    from lora_monitor.engine import LoRAMonitor

    model = peft_model(ARCH, base_model(ARCH), use_dora=True).double()
    _perturb(model, 0)
    _scale_magnitudes(model, 0.2, 3.0)  # a row scale far from 1, so that D·B and B span other columns
    reference_terms = {key: dora_directional(layer) for key, layer in lora_layers_by_key(model).items()}
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
    for key, layer in lora_layers_by_key(model).items():
        r = layer.r["default"]
        expected = left_phi(reference_terms[key], dora_directional(layer), r)
        for monitor in (uninterrupted, resumed):
            torch.testing.assert_close(monitor.latest_analysis[key].phi.double(), expected, rtol=0, atol=1e-8)


def test_a_saved_dora_reference_directory_is_compared_by_its_directional_term(tmp_path):
    """reference=<a saved DoRA adapter> in ΔW's bases: its D comes from the monitored model's
    frozen W₀ (the same base model), so φ equals the dense φ of the two directional terms."""
    from lora_monitor.engine import LoRAMonitor

    reference_model = peft_model(ARCH, base_model(ARCH), use_dora=True).double()
    _perturb(reference_model, 3)
    _scale_magnitudes(reference_model, 0.3, 2.5)
    reference_terms = {key: dora_directional(layer) for key, layer in lora_layers_by_key(reference_model).items()}
    reference_model.save_pretrained(tmp_path / "reference")

    model = peft_model(ARCH, base_model(ARCH), use_dora=True).double()
    _perturb(model, 4)
    monitor = LoRAMonitor(
        log_dir=tmp_path / "run", every_n_steps=1, basis="delta_w_left", reference=tmp_path / "reference"
    )
    monitor.attach(model)
    monitor.start(0)
    monitor.step(1)
    monitor.close()
    for key, layer in lora_layers_by_key(model).items():
        r = layer.r["default"]
        expected = left_phi(reference_terms[key].float().double(), dora_directional(layer), r)
        torch.testing.assert_close(monitor.latest_analysis[key].phi.double(), expected, rtol=0, atol=1e-5)


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


# ------------------------------------------------------------------------------------------
# φ, spectra, amplification and intruder dimensions of each variant against dense ones

#: Variants on Llama (float64, so that the comparison is to rounding), and how each is built.
DENSE_VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "adalora": {"config_class": "AdaLoraConfig", "init_r": 4, "target_r": 2, "total_step": 10},
}


def _variant_model(variant: str, tmp_path):
    """``(pretrained base, peft model, dtype)``; QLoRA's base is a 4-bit Llama (float32)."""
    if variant == "qlora":
        from peft import LoraConfig

        pretrained, quantized = quantized_llama(tmp_path, 4)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        return pretrained, add_lora(quantized, config, seed=1), torch.float32
    kwargs = dict(DENSE_VARIANTS[variant])
    if kwargs.get("config_class") == "AdaLoraConfig":
        from peft import AdaLoraConfig

        kwargs["config_class"] = AdaLoraConfig
    pretrained = base_model(ARCH)
    model = peft_model(ARCH, pretrained, **kwargs).double()  # PiSSA and OLoRA start in float32
    return pretrained.double(), model, torch.float64


def _dense_state(layers, pretrained, variant: str) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Per module, from peft's own tensors: A as the model applies it (AdaLoRA's E ⊙ A), the
    pretrained W₀, ΔW = merged − pretrained (a deep copy merged; QLoRA: peft's delta weight,
    since merging into 4 bits would re-quantize) and the matrix φ in ΔW's bases reads (DoRA:
    its directional term D·s·B·A)."""
    from peft.utils.integrations import dequantize_module_weight

    base = dict(pretrained.named_modules())
    state = {}
    for key, layer in layers.items():
        A = layer.lora_A["default"]
        A = (A * layer.lora_E["default"]) if variant == "adalora" else A.weight
        path = next(n for n, m in base.items() if n.endswith(_SUFFIX[key]))
        if variant == "qlora":
            W0 = dequantize_module_weight(layer.get_base_layer()).detach().double()
            delta = layer.get_delta_weight("default").detach().double()
        else:
            W0 = base[path].weight.detach().double()
            delta = None
        # Copies: the model is float64 already, and _perturb moves its tensors in place.
        state[key] = {"A": A.detach().double().clone(), "W0": W0.clone(), "delta": delta, "path": path}
    return state


#: The pretrained module of each key (Llama's q_proj and v_proj of both layers).
_SUFFIX = {(layer, p): f"layers.{layer}.self_attn.{p}_proj" for layer in (0, 1) for p in ("q", "v")}


def _dense(model, pretrained, variant: str) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    import copy

    layers = lora_layers_by_key(model)
    state = _dense_state(layers, pretrained, variant)
    if variant != "qlora":
        merged = dict(copy.deepcopy(model).merge_and_unload().named_modules())
        for values in state.values():
            values["delta"] = merged[values["path"]].weight.detach().double() - values["W0"]
    for key, values in state.items():
        values["phi_matrix"] = dora_directional(layers[key]).clone() if variant == "dora" else values["delta"]
    return state


def _capture(model) -> Snapshot:
    return Snapshot.capture(find_lora_factors(model), 0)


def _dense_intruders(W0: torch.Tensor, merged: torch.Tensor, top_k: int) -> int:
    """Shuttleworth et al.: top-k left singular vectors of W₀ + ΔW with no |cosine| ≥ 0.5 to
    any left singular vector of W₀."""
    base = torch.linalg.svd(W0)[0]
    new = torch.linalg.svd(merged)[0][:, :top_k]
    return int(((new.T @ base).abs().amax(1) < 0.5).sum())


@pytest.mark.parametrize("variant", sorted(DENSE_VARIANTS) + ["qlora"])
def test_phi_spectra_amplification_and_intruders_equal_dense_ones(tmp_path, variant):
    pretrained, model, dtype = _variant_model(variant, tmp_path)
    initial = _capture(model)
    _perturb(model, 1)
    reference, dense_reference = _capture(model), _dense(model, pretrained, variant)
    _perturb(model, 2)
    current, dense_current = _capture(model), _dense(model, pretrained, variant)
    tolerance = {"rtol": 1e-6, "atol": 1e-8} if dtype == torch.float64 else {"rtol": 2e-3, "atol": 2e-4}
    for basis in ("A", "delta_w_left"):
        analyses = analyze(current, reference.factors, basis, initial=initial.factors, intruder_top_k=4)
        for key, analysis in analyses.items():
            ref, cur = dense_reference[key], dense_current[key]
            if basis == "A":  # A's right singular vectors (AdaLoRA: of E ⊙ A), r of them
                r = cur["A"].shape[0]
                X, Y = torch.linalg.svd(ref["A"])[2][:r].T, torch.linalg.svd(cur["A"])[2][:r].T
            else:  # ΔW's left singular vectors (DoRA: of D·s·B·A), as many as its rank
                r = 2 * cur["A"].shape[0] if variant in ("pissa", "olora") else cur["A"].shape[0]
                X, Y = torch.linalg.svd(ref["phi_matrix"])[0][:, :r], torch.linalg.svd(cur["phi_matrix"])[0][:, :r]
            torch.testing.assert_close(
                analysis.phi.double(), dense_phi(X, Y), **tolerance, msg=f"{variant} {basis} {key}"
            )
    for key, analysis in analyses.items():
        delta, W0 = dense_current[key]["delta"], dense_current[key]["W0"]
        U, S, Vh = torch.linalg.svd(delta)
        spectrum = analysis.singular_values.double()
        torch.testing.assert_close(spectrum, S[: spectrum.numel()], **tolerance)
        assert (S[spectrum.numel() :] < 1e-5 * S[0]).all()  # nothing left out of the spectrum
        r = 2 * dense_current[key]["A"].shape[0] if variant in ("pissa", "olora") else dense_current[key]["A"].shape[0]
        norm = torch.linalg.matrix_norm(delta)
        amplification = norm / torch.linalg.matrix_norm(U[:, :r].T @ W0 @ Vh[:r].T)
        assert analysis.delta_w_amplification == pytest.approx(amplification.item(), rel=tolerance["rtol"] * 10)
        assert analysis.delta_w_relative_norm == pytest.approx(
            (norm / torch.linalg.matrix_norm(W0)).item(), rel=tolerance["rtol"] * 10
        )
        assert analysis.intruder_dimensions == _dense_intruders(W0, W0 + delta, 4)


def test_pissa_attached_late_says_it_cannot_know_delta_w(tmp_path):
    from lora_monitor import AnalysisWarning
    from lora_monitor.engine import LoRAMonitor

    arch = SEPARATE["llama"]
    model = peft_model(arch, base_model(arch), init_lora_weights="pissa")
    monitor = LoRAMonitor(log_dir=tmp_path, every_n_steps=1)
    monitor.attach(model)
    with pytest.warns(AnalysisWarning, match=r"initialized by pissa.*starts at step 5 without the initial factors"):
        monitor.start(5)
    with pytest.warns(AnalysisWarning, match=r"layer 0 'q'.*B₀, A₀ are not known") as caught:
        monitor.step(6)
        monitor.step(7)  # said once, not at every snapshot
    assert sum("are not known" in str(w.message) for w in caught) == 1
    monitor.close()
    analysis = monitor.latest_analysis[(0, "q")]
    assert "delta_w_norm" not in analysis.scalars and "phi_top" in analysis.scalars  # φ in A still right


def test_saved_pissa_and_dora_adapters_without_base_say_so(tmp_path):
    from lora_monitor.adapters import load_adapter
    from lora_monitor.analysis import Snapshot, analyze

    arch = SEPARATE["llama"]
    for variant, kwargs in (("pissa", {"init_lora_weights": "pissa"}), ("dora", {"use_dora": True})):
        peft_model(arch, base_model(arch), **kwargs).save_pretrained(str(tmp_path / variant))
        analysis = analyze(Snapshot(0, load_adapter(tmp_path / variant).factors))[(0, "q")]
        assert not analysis.delta_w_known and "delta_w_norm" not in analysis.scalars
        assert ("pissa initialization" if variant == "pissa" else "DoRA rescales") in analysis.notes[0]
