"""Bad input and faults: what the user must fix is raised at setup; a problem in one snapshot of
one module is an AnalysisWarning naming the layer and the step, the rest is still logged and
training goes on (unless ``strict=True``).

Setup errors of ``load_adapter`` and ``find_lora_factors`` themselves are tested in
``test_adapters.py``; here they go through a real ``Trainer.fit``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

from lora_monitor import AnalysisWarning, LoRAMonitorError, LoRASubspaceMonitor
from lora_monitor.outputs.tags import heatmap_tag, scalar_tag
from tests.helpers.dense import dense_basis, dense_phi, dense_updates
from tests.helpers.events import logged_steps, read_events
from tests.helpers.lightning import AtStep, CausalLMModule, CountingModule, make_trainer
from tests.helpers.models import llama_lora_module, tiny_llama_lora


def analysis_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]


# ------------------------------------------------------------------------ faulty factors


def corrupt(module: CausalLMModule) -> None:
    """NaN in layer 0's lora_A of q, Inf in layer 1's lora_B of v, B = 0 in layer 0's v."""
    with torch.no_grad():
        llama_lora_module(module.model, 0, "q").lora_A["default"].weight[0, 0] = math.nan
        llama_lora_module(module.model, 1, "v").lora_B["default"].weight[0, 0] = math.inf
        llama_lora_module(module.model, 0, "v").lora_B["default"].weight.zero_()


def faulty_run(root: Path, strict: bool):
    # basis="delta_w_right": a zero ΔW has no singular vectors in it (in basis "A" it does).
    monitor = LoRASubspaceMonitor(every_n_steps=1, reference="first", basis="delta_w_right", strict=strict)
    trainer = make_trainer(root, [AtStep({2: corrupt}), monitor], max_steps=2)
    trainer.fit(CausalLMModule(tiny_llama_lora(rank=4)))
    return trainer, monitor


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, monitor = faulty_run(tmp_path_factory.mktemp("faulty"), strict=False)
    return read_events(trainer.logger.log_dir), monitor, analysis_warnings(caught)


@pytest.mark.parametrize(
    "key, problem",
    [
        ((0, "q"), "LoRA factors hold NaN or Inf"),
        ((1, "v"), "LoRA factors hold NaN or Inf"),
        ((0, "v"), "ΔW is exactly zero, so its singular vectors are undefined"),
    ],
    ids=["nan-in-A", "inf-in-B", "zero-B"],
)
def test_faulty_module_warns_with_layer_and_step(faulty, key, problem):
    events, monitor, messages = faulty
    layer, projection = key
    expected = f"step 2, layer {layer} projection '{projection}': {problem}"
    assert [m for m in messages if expected in m], messages
    # Step 1, before the fault, is clean for every module.
    assert not [m for m in messages if "step 1" in m]
    assert monitor.latest_analysis[key].phi is None
    assert 2 not in logged_steps(events, scalar_tag("phi_top", key))


def test_the_rest_is_still_logged_after_a_fault(faulty):
    events, monitor, messages = faulty
    assert len(messages) == 3
    healthy = (1, "q")
    assert logged_steps(events, scalar_tag("phi_top", healthy)) == {2}
    assert monitor.latest_analysis[healthy].phi.isfinite().all()
    # A zero ΔW still has a norm and a top singular value: zero.
    zero = {e.step: e.value for e in events.Scalars(scalar_tag("delta_w_norm", (0, "v")))}
    assert zero[2] == 0.0
    # NaN factors log no scalar at all rather than a NaN that breaks plots.
    assert logged_steps(events, scalar_tag("delta_w_norm", (0, "q"))) == {1}
    # Layer 0 has no healthy module left at step 2 (q NaN, v zero): no heatmap; layer 1 has one.
    assert heatmap_tag(0) not in events.Tags()["images"]
    assert [image.step for image in events.Images(heatmap_tag(1))] == [2]


def test_strict_turns_the_warning_into_an_error(tmp_path):
    with pytest.raises(LoRAMonitorError, match=r"step 2, layer 0 projection 'q': LoRA factors hold NaN"):
        faulty_run(tmp_path, strict=True)


# ------------------------------------------------------------------------ half precision


# ------------------------------------------------------------------ adapter changes mid-run


def test_merged_or_unloaded_adapter_mid_run_warns_and_training_goes_on(tmp_path):
    actions = {
        2: lambda module: module.model.merge_adapter(),
        3: lambda module: module.model.unmerge_adapter(),
        4: lambda module: module.model.base_model.unload(),
    }
    monitor = LoRASubspaceMonitor(every_n_steps=1, log_images=False)
    trainer = make_trainer(tmp_path, [AtStep(actions), monitor], max_steps=5)
    model = tiny_llama_lora(rank=4)
    # lm_head trains too (as with modules_to_save), so the steps with the adapter merged or
    # unloaded, which give LoRA no gradient, still have something to train.
    model.base_model.model.lm_head.weight.requires_grad_(True)
    module = CountingModule(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)

    assert module.steps_run == 5 and trainer.global_step == 5
    messages = analysis_warnings(caught)
    assert len(messages) == 3
    assert "step 2: no snapshot taken" in messages[0] and "merged into the base weights" in messages[0]
    for step, message in zip((4, 5), messages[1:]):
        assert f"step {step}: no snapshot taken" in message and "merged and unloaded" in message
    events = read_events(trainer.logger.log_dir)
    # Snapshots resume once the adapter is unmerged: step 3 compares with step 1.
    assert logged_steps(events, scalar_tag("delta_w_norm", (0, "q"))) == {1, 3}
    assert logged_steps(events, scalar_tag("phi_top", (0, "q"))) == {3}


def test_the_active_adapter_or_the_named_one_is_monitored(tmp_path):
    model = tiny_llama_lora(rank=4)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("other")  # "other" trains, "default" is frozen
    active = LoRASubspaceMonitor(every_n_steps=2, log_images=False)
    named = LoRASubspaceMonitor(every_n_steps=2, adapter_name="default", log_images=False)
    make_trainer(tmp_path, [active, named], max_steps=2).fit(CausalLMModule(model))

    for monitor, adapter, rank in ((active, "other", 2), (named, "default", 4)):
        for key, analysis in monitor.latest_analysis.items():
            delta = llama_lora_module(model, key[0], key[1]).get_delta_weight(adapter).detach().double()
            assert analysis.singular_values.numel() == rank
            assert analysis.scalars["delta_w_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    # The trained adapter moved off peft's zero-B init.
    assert all(a.scalars["delta_w_norm"] > 0 for a in active.latest_analysis.values())


# ------------------------------------------------------------------ reference adapters


def save(model: PeftModel, directory: Path, **kwargs) -> Path:
    model.save_pretrained(str(directory), **kwargs)
    return directory


def without_weights(directory: Path) -> Path:
    (directory / "adapter_model.safetensors").unlink()
    return directory


def emptied(directory: Path) -> Path:
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def truncated(directory: Path) -> Path:
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return directory


@pytest.mark.parametrize(
    "make_reference, match",
    [
        (lambda d: save(tiny_llama_lora(num_layers=1), d), r"no module for keys \[\(1, 'q'\), \(1, 'v'\)\]"),
        (lambda d: save(tiny_llama_lora(num_layers=3), d), r"layers \[0, 1, 2\] but the model in layers \[0, 1\]"),
        (
            lambda d: save(tiny_llama_lora(target_modules=("q_proj", "k_proj")), d),
            r"no module for keys \[\(0, 'v'\), \(1, 'v'\)\].*target_modules",
        ),
        (lambda d: without_weights(save(tiny_llama_lora(), d)), r"no adapter_model.safetensors nor adapter_model.bin"),
        (lambda d: emptied(save(tiny_llama_lora(), d)), r"adapter_model.safetensors is empty"),
        (lambda d: truncated(save(tiny_llama_lora(), d)), r"corrupt or truncated"),
    ],
    ids=["fewer-layers", "more-layers", "other-projections", "no-weights", "empty-weights", "corrupt-weights"],
)
def test_unusable_reference_is_rejected_at_setup(tmp_path, make_reference, match):
    reference = make_reference(tmp_path / "reference")
    module = CountingModule(tiny_llama_lora())
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor(reference=reference)], max_steps=1)
    with pytest.raises(LoRAMonitorError, match=match):
        trainer.fit(module)
    assert module.steps_run == 0


@pytest.mark.parametrize("basis, matrix", [("B", "lora_B"), ("delta_w_left", "ΔW")])
def test_reference_saved_before_training_is_rejected_at_setup(tmp_path, basis, matrix):
    # peft's initialization: lora_B = 0, so B's and ΔW's singular vectors do not exist.
    untrained = save(tiny_llama_lora(randomize_B=False), tmp_path / "untrained")
    module = CountingModule(tiny_llama_lora())
    monitor = LoRASubspaceMonitor(reference=untrained, basis=basis)
    with pytest.raises(
        LoRAMonitorError,
        match=rf"cannot be compared in basis '{basis}': layer 0 projection 'q': {matrix} is exactly zero.*save it after training",
    ):
        make_trainer(tmp_path, [monitor], max_steps=1).fit(module)
    assert module.steps_run == 0


def test_reference_saved_as_bin_works(tmp_path):
    reference_model = tiny_llama_lora(rank=4, seed=1)
    directory = save(reference_model, tmp_path / "bin", safe_serialization=False)
    assert (directory / "adapter_model.bin").is_file()
    assert not (directory / "adapter_model.safetensors").exists()
    model = tiny_llama_lora(rank=4)
    monitor = LoRASubspaceMonitor(every_n_steps=1, reference=directory, log_images=False)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(CausalLMModule(model))
    current, reference = dense_updates(model), dense_updates(reference_model)
    for key, analysis in monitor.latest_analysis.items():
        expected = dense_phi(dense_basis(*reference[key], "A"), dense_basis(*current[key], "A"))
        torch.testing.assert_close(analysis.phi.double(), expected, atol=1e-5, rtol=0)
