"""The package's import graph: no cycle, and each layer imports only the layers below it.

Every import counts, those inside functions and under ``TYPE_CHECKING`` included: a lazy
import still ties two modules together for a reader and a maintainer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_monitor"

#: The layers, from the maths up (the package docstring lists them in this order).
LAYERS = ("functional", "adapters", "analysis", "outputs", "engine", "integrations", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports (``from lora_monitor.x import y`` counts as
    importing ``lora_monitor.x.y`` when that is a module, else ``lora_monitor.x``)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return len(LAYERS)  # the package root and ``python -m``: above everything
    return LAYERS.index(parts[1])


def test_the_graph_is_read():
    graph = import_graph()
    assert "lora_monitor.engine" in graph["lora_monitor.integrations.lightning"]
    assert "lora_monitor.functional.svd" in graph["lora_monitor.analysis.device"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_layer_imports_only_the_layers_below_it():
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_every_module_belongs_to_a_layer():
    for module in import_graph():
        _layer(module)  # raises ValueError for a module outside the layers


#: What a front-end may use of its engine: the front-end contract of ``lora_monitor.engine.monitor``.
ENGINE_CONTRACT = {
    "attach",
    "start",
    "wants_probe_batch",
    "capture_probe_batch",
    "refuse_probe",
    "after_optimizer_step",
    "finish",
    "close",
    "state_dict",
    "load_state_dict",
    "options",
    "latest_analysis",
    "recommendation",
}
#: And what it may import of the engine layer: the engine, its options and warning, where it runs.
ENGINE_IMPORTS = {
    "lora_monitor.engine": {"LoRAMonitor", "MonitorOptions", "MonitorKwargs", "AnalysisWarning", "spells_out_options"},
    "lora_monitor.engine.distributed": {"RankContext"},
}


@pytest.mark.parametrize("path", sorted((PACKAGE / "integrations").glob("*.py")), ids=lambda p: p.name)
def test_front_ends_use_the_engine_contract_only(path):
    source = path.read_text()
    used = set(re.findall(r"(?<!lora_monitor)\.engine\.(\w+)", source))
    assert used <= ENGINE_CONTRACT, sorted(used - ENGINE_CONTRACT)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_monitor.engine"):
            names = {alias.name for alias in node.names}
            assert names <= ENGINE_IMPORTS.get(node.module or "", set()), (node.module, names)
