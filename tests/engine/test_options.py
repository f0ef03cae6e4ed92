"""lora_monitor.engine.options: bad options are refused when a front-end is built, each in its own
kind of error (Lightning's ``MisconfigurationException``, transformers' ``ValueError``)."""

from __future__ import annotations

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lora_monitor import LoRASubspaceCallback, LoRASubspaceMonitor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(basis="C"), "basis"),
        (dict(target_modules=[]), "target_modules"),
        (dict(layers=["1"]), "layers"),
        (dict(reference=3), "reference"),
        (dict(adapter_dir=3), "adapter_dir"),
    ],
)
def test_constructor_validates_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LoRASubspaceMonitor(**kwargs)


def test_asynchronous_must_be_a_bool_or_none():
    with pytest.raises(MisconfigurationException, match="asynchronous"):
        LoRASubspaceMonitor(asynchronous="yes")


def test_bad_option_is_a_clear_error_before_training():
    with pytest.raises(ValueError, match=r"LoRASubspaceCallback: every_n_steps must be a positive integer, got 0"):
        LoRASubspaceCallback(every_n_steps=0)
