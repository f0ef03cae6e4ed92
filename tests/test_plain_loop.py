"""A plain PyTorch loop with :class:`LoRAMonitor`: the same tags as the Lightning callback, the
same numbers, state for resume, and not one import of Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_monitor import LoRAMonitor, LoRASubspaceMonitor
from tests.helpers.events import read_events
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize(
    "statement",
    ["import lora_monitor", "from lora_monitor import LoRAMonitor", "import lora_monitor.engine, lora_monitor.outputs.writers"],
)
def test_the_engine_imports_no_framework(statement):
    script = f"{statement}\nimport sys\nprint(sorted(m for m in ('lightning', 'transformers', 'peft', 'trl') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_front_ends_load_on_first_use():
    script = (
        "import sys, lora_monitor\n"
        "before = 'lightning' in sys.modules\n"
        "lora_monitor.LoRASubspaceMonitor\n"
        "print(before, 'lightning' in sys.modules, lora_monitor.LoRASubspaceCallback.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "lora_monitor.integrations.transformers"]


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
