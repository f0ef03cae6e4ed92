"""The package root: importing ``lora_monitor`` or its engine loads no framework; each front-end (and
its framework) loads on first use of its name."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "statement",
    [
        "import lora_monitor",
        "from lora_monitor import LoRAMonitor",
        "import lora_monitor.engine, lora_monitor.outputs.writers",
    ],
)
def test_the_engine_imports_no_framework(statement):
    frameworks = "('lightning', 'transformers', 'peft', 'trl')"
    script = f"{statement}\nimport sys\nprint(sorted(m for m in {frameworks} if m in sys.modules))"
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
