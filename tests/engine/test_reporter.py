"""lora_monitor.engine.reporter: a problem in one snapshot of one module is an AnalysisWarning naming
the layer and the step, the rest is still logged and training goes on (unless ``strict=True``);
a figure that cannot be drawn costs only the image."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from lora_monitor import AnalysisWarning, LoRAMonitorError, LoRASubspaceMonitor
from lora_monitor.outputs.tags import heatmap_tag, scalar_tag
from tests.helpers.events import analysis_warnings, logged_steps, read_events, scalar_series
from tests.helpers.lightning import AtStep, CausalLMModule, make_trainer
from tests.helpers.models import llama_lora_module, tiny_llama_lora


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


def test_a_figure_that_cannot_be_drawn_costs_only_the_image(tmp_path, broken_figures):
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first")
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with pytest.warns(AnalysisWarning, match=r"step 4: drawing the figures failed with RuntimeError"):
        trainer.fit(CausalLMModule(tiny_llama_lora(rank=4)))
    assert trainer.global_step == 4
    events = read_events(trainer.logger.log_dir)
    assert events.Tags()["images"] == []  # neither heatmaps nor the overview
    assert sorted(scalar_series(events, scalar_tag("phi_top", (0, "q")))) == [4]

    strict = LoRASubspaceMonitor(every_n_steps=2, reference="first", strict=True)
    with pytest.raises(LoRAMonitorError, match="drawing the figures failed"):
        make_trainer(tmp_path / "strict", [strict], max_steps=4).fit(CausalLMModule(tiny_llama_lora(rank=4)))
