"""target_modules' default follows peft (issue 22): None, or peft's own "all-linear", means every
LoRA module the adapter trains; a list narrows it, as before."""

from __future__ import annotations

import pytest

from lora_monitor.engine import MonitorOptions


@pytest.mark.parametrize("value", [None, "all-linear"])
def test_every_trained_module_by_default(value):
    options = MonitorOptions(target_modules=value)
    assert options.target_modules is None and options.watches_all_trained


@pytest.mark.parametrize("value, expected", [(("q", "v"), ("q", "v")), (["gate_proj"], ("gate_proj",)), ("q", ("q",))])
def test_a_list_narrows_it(value, expected):
    options = MonitorOptions(target_modules=value)
    assert options.target_modules == expected and not options.watches_all_trained


def test_the_default_is_none():
    assert MonitorOptions().target_modules is None
