"""lora_monitor.engine.monitor: :class:`LoRAMonitor`'s lifecycle. A plain PyTorch loop writes the
same tags as the Lightning callback, the same numbers, state for resume, and not one import of
Lightning; an adapter merged or unloaded mid-run costs its snapshots only; the active adapter, or
the one named, is monitored."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from lora_monitor import LoRAMonitor, LoRASubspaceMonitor
from lora_monitor.outputs.tags import scalar_tag
from tests.helpers.events import analysis_warnings, logged_steps, read_events
from tests.helpers.lightning import AtStep, CausalLMModule, CountingModule, make_trainer
from tests.helpers.models import llama_lora_module, tiny_llama_lora

ROOT = Path(__file__).resolve().parents[2]
EVERY, STEPS = 2, 6

PLAIN_LOOP = """
import json, sys
import torch
sys.path.insert(0, {root!r})
from lora_monitor import LoRAMonitor
from tests.helpers.models import tiny_llama_lora

model = tiny_llama_lora(rank=4, num_layers=2, randomize_B=False)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
generator = torch.Generator().manual_seed(0)
with LoRAMonitor(model, log_dir={log_dir!r}, every_n_steps={every}) as monitor:
    for step in range(1, {steps} + 1):
        tokens = torch.randint(0, 64, (8, 16), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step)
heavy = sorted(m for m in ("lightning", "pytorch_lightning", "lightning_fabric") if m in sys.modules)
print(json.dumps(heavy))
"""


def _tags(log_dir: Path) -> dict[str, list[int]]:
    events = read_events(log_dir)
    tags = events.Tags()
    scalars = {t: sorted(e.step for e in events.Scalars(t)) for t in tags["scalars"] if t.startswith("lora_monitor")}
    images = {t: sorted(e.step for e in events.Images(t)) for t in tags["images"]}
    return {**scalars, **images}


def test_plain_loop_writes_the_lightning_tags_without_importing_lightning(tmp_path):
    plain_dir = tmp_path / "plain"
    script = PLAIN_LOOP.format(root=str(ROOT), log_dir=str(plain_dir), every=EVERY, steps=STEPS)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert "LoRAMonitor: " in result.stdout  # the recommendation's console line

    monitor = LoRASubspaceMonitor(every_n_steps=EVERY)
    trainer = make_trainer(tmp_path / "lightning", [monitor], max_steps=STEPS)
    trainer.fit(CausalLMModule(tiny_llama_lora(rank=4, num_layers=2, randomize_B=False)))
    lightning_tags = _tags(Path(trainer.logger.log_dir))
    assert _tags(plain_dir) == lightning_tags
    assert lightning_tags  # neither run wrote nothing


def _train(monitor: LoRAMonitor, model, steps: range) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 64, (8, 16), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step)


def test_state_dict_resumes_a_plain_loop(tmp_path):
    model = tiny_llama_lora(rank=4, num_layers=2, randomize_B=False)
    start = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    whole = LoRAMonitor(model, every_n_steps=EVERY)
    _train(whole, model, range(1, 7))
    expected = {key: a.phi for key, a in whole.latest_analysis.items()}

    model = tiny_llama_lora(rank=4, num_layers=2, randomize_B=False)
    model.load_state_dict(start, strict=False)
    first_half = LoRAMonitor(model, every_n_steps=EVERY)
    _train(first_half, model, range(1, 4))
    state = first_half.state_dict()
    trained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    # Another model object, other LoRA init; the trained factors and the monitor state restored.
    model = tiny_llama_lora(rank=4, num_layers=2, randomize_B=False, seed=5)
    model.load_state_dict(trained, strict=False)
    resumed = LoRAMonitor(model, every_n_steps=EVERY)
    resumed.load_state_dict(state)
    _train(resumed, model, range(4, 7))
    for key, phi in expected.items():
        torch.testing.assert_close(resumed.latest_analysis[key].phi, phi, rtol=1e-4, atol=1e-6)


def test_step_before_the_model_is_known_is_a_clear_error():
    with pytest.raises(ValueError, match=r"step\(\) before the model is known"):
        LoRAMonitor(every_n_steps=2).step(1)


def test_log_dir_and_writer_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="log_dir= or writer=, not both"):
        LoRAMonitor(log_dir=tmp_path, writer=object())


def test_an_error_in_the_loop_propagates_and_what_was_analysed_is_written(tmp_path):
    from lora_monitor.outputs.tags import scalar_tag

    model = tiny_llama_lora(rank=4, num_layers=2, randomize_B=False)
    with pytest.raises(RuntimeError, match="the data loader died"):
        with LoRAMonitor(model, log_dir=tmp_path, every_n_steps=2) as monitor:
            _train(monitor, model, range(1, 5))
            raise RuntimeError("the data loader died")
    events = read_events(tmp_path)
    assert sorted(e.step for e in events.Scalars(scalar_tag("delta_w_norm", (0, "q")))) == [2, 4]
    assert monitor.recommendation is None  # no end-of-training report for a run that failed


def test_merged_or_unloaded_adapter_mid_run_warns_and_training_goes_on(tmp_path):
    actions = {
        2: lambda module: module.model.merge_adapter(),
        3: lambda module: module.model.unmerge_adapter(),
        4: lambda module: module.model.base_model.unload(),
    }
    # No probe: it would call the counting training_step between optimizer steps.
    monitor = LoRASubspaceMonitor(every_n_steps=1, log_images=False, functional_probe=False)
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
