"""The package root: importing ``lora_monitor`` or its engine loads no framework; each front-end (and
its framework) loads on first use of its name; the tested versions pin every requirement."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


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


def _requirements() -> dict[str, str]:
    """``name → specifier`` of every requirement of the package and its extras, but torch (the
    README installs its pinned CPU build first) and the package's own extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    found = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name not in ("lora-monitor", "torch"):
            found[name] = str(requirement.specifier)
    return found


def test_constraints_pin_every_requirement_within_its_range():
    # The README's test command installs with .ci/constraints.txt: a requirement added to
    # pyproject.toml without its tested version would float, and one pinned outside its range
    # would make pip fail before any test runs.
    pinned = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pinned[canonicalize_name(name)] = version.strip()
    assert "torch" not in pinned  # a pinned CPU build would refuse a user's CUDA build of the same version
    for name, specifier in _requirements().items():
        assert name in pinned, f"{name} is required by pyproject.toml but not pinned in .ci/constraints.txt"
        assert SpecifierSet(specifier).contains(pinned[name], prereleases=True), (name, specifier, pinned[name])
