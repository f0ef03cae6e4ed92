"""lora_monitor.engine.options: bad options are refused when a front-end is built, each in its own
kind of error (Lightning's ``MisconfigurationException``, transformers' ``ValueError``); every
front-end takes the same options with the same defaults, its docstring names each, and the
docs' option table is the dataclass."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import Unpack

import lora_monitor
from lora_monitor import LoRASubspaceCallback, LoRASubspaceMonitor
from lora_monitor.engine import MonitorKwargs, MonitorOptions


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


#: Every front-end, the engine itself included: each spells the options out in its own signature.
FRONT_ENDS = ("LoRAMonitor", "LoRASubspaceMonitor", "LoRASubspaceCallback", "LoRAAcceleratorMonitor")
OPTIONS = {f.name: f.default for f in dataclasses.fields(MonitorOptions) if f.name != "owner"}


OPTION_TYPES = {name: kind for name, kind in typing.get_type_hints(MonitorOptions).items() if name != "owner"}


def test_the_keyword_arguments_type_is_the_dataclass():
    assert typing.get_type_hints(MonitorKwargs) == OPTION_TYPES


def options_taken(front_end) -> dict[str, tuple[object, object]]:
    """``name → (type, default)`` of the options ``front_end``'s constructor takes: spelled out
    in its signature (Lightning's, for LightningCLI), or as ``**options: Unpack[MonitorKwargs]``,
    whose defaults are the dataclass's."""
    parameters = inspect.signature(front_end.__init__).parameters
    hints = typing.get_type_hints(front_end.__init__)
    taken = {p: (hints[p], parameters[p].default) for p in OPTIONS if p in parameters}
    for parameter in parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            assert hints[parameter.name] == Unpack[MonitorKwargs]
            taken |= {name: (OPTION_TYPES[name], default) for name, default in OPTIONS.items()}
    return taken


@pytest.mark.parametrize("name", FRONT_ENDS)
def test_every_front_end_takes_every_option_with_its_default(name):
    front_end = getattr(lora_monitor, name)
    assert options_taken(front_end) == {name: (OPTION_TYPES[name], default) for name, default in OPTIONS.items()}
    documented = front_end.__doc__ if name != "LoRAMonitor" else front_end.__doc__.split("Args:")[1]
    assert [option for option in OPTIONS if option not in documented] == []


def test_the_option_table_of_the_docs_is_the_dataclass():
    table = (Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.MULTILINE))
    assert {name: rows.get(name) for name in OPTIONS} == {
        name: repr(default).replace("'", '"') for name, default in OPTIONS.items()
    }
