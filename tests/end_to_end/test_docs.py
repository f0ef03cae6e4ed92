"""The front-ends' and the engine's docstring examples are runnable, as Lightning's own
callbacks' examples are."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "module, examples",
    [
        ("lora_monitor.integrations.lightning", 5),
        ("lora_monitor.engine.monitor", 8),
    ],
)
def test_docstring_examples_run(module, examples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their runs under the working directory
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= examples
    assert result.failed == 0
