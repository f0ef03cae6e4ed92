"""The callback's docstring example is runnable, as Lightning's own callbacks' examples are."""

import doctest

import lora_monitor.callback


def test_callback_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example's TensorBoardLogger("runs") writes nothing before fit
    result = doctest.testmod(lora_monitor.callback, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0
