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
        (dict(probe_budget=-0.01), "probe_budget must be a share of training"),
        (dict(probe_budget="1%"), "probe_budget"),
        (dict(probe_budget=True), "probe_budget"),
        (dict(probe_budget=float("nan")), "probe_budget"),
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
    """``name → (type, default)`` of the options ``front_end``'s constructor takes, as
    ``inspect.signature`` (``help()``, notebooks' call tips) shows them; its source names them
    too, for IDEs and type checkers: spelled out (Lightning's, for LightningCLI) or as
    ``**options: Unpack[MonitorKwargs]``."""
    parameters = inspect.signature(front_end.__init__).parameters
    hints = typing.get_type_hints(front_end.__init__)
    in_source = set(hints) & set(OPTIONS) or (set(OPTIONS) if Unpack[MonitorKwargs] in hints.values() else set())
    assert in_source == set(OPTIONS)
    return {p: (hints.get(p, parameters[p].annotation), parameters[p].default) for p in OPTIONS if p in parameters}


@pytest.mark.parametrize("name", FRONT_ENDS)
def test_every_front_end_takes_every_option_with_its_default(name):
    front_end = getattr(lora_monitor, name)
    assert options_taken(front_end) == {name: (OPTION_TYPES[name], default) for name, default in OPTIONS.items()}


#: Each option's help, the one text of it (``MonitorOptions``' field metadata).
HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(MonitorOptions) if f.name != "owner"}
#: What a front-end's docstring says of the options it documents as the engine's.
AS_THE_ENGINE = "as :class:`lora_monitor.LoRAMonitor`."
#: The options a front-end documents in its own words: where its framework gives the probe's loss.
OWN_WORDS = {("LoRASubspaceMonitor", "functional_probe"), ("LoRASubspaceCallback", "functional_probe")}


def docstring_args(doc: str) -> dict[str, str]:
    """``name → description`` (spaces normalized) of a Google-style docstring's ``Args:``; an
    entry naming several (``a, b,\n c: as ...``) gives each the same description."""
    section = doc.split("Args:\n")[1].split("\n\n")[0]
    entries: list[str] = []
    for line in section.splitlines():
        starts = len(line) - len(line.lstrip()) == 8 and not (entries and entries[-1].endswith(","))
        entries.append(line.strip()) if starts else entries.__setitem__(-1, f"{entries[-1]} {line.strip()}")
    args = {}
    for entry in entries:
        names, description = entry.split(": ", 1)
        args |= {name.strip(): " ".join(description.split()) for name in names.split(",")}
    return args


@pytest.mark.parametrize("name", FRONT_ENDS)
def test_every_front_end_documents_every_option_as_its_help_says(name):
    args = docstring_args(getattr(lora_monitor, name).__doc__)
    for option, help_text in HELP.items():
        if (name, option) in OWN_WORDS:
            assert option in args, option
        elif name == "LoRAMonitor":
            assert args.get(option) == " ".join(help_text.split()), option
        else:
            assert args.get(option) == AS_THE_ENGINE, option


def markdown(text: str) -> str:
    """reST as the docs write it: ``code`` and :role:`target` become `code`."""
    return re.sub(r":\w+:`~?([^`]+)`", r"``\1``", text).replace("``", "`")


def test_the_option_table_of_the_docs_is_the_dataclass():
    table = (Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    rows = {
        name: (default, meaning)
        for name, default, meaning in re.findall(r"^\| `(\w+)` \| `([^`]*)` \| (.*) \|$", table, re.M)
    }
    assert {name: rows.get(name) for name in OPTIONS} == {
        name: (repr(default).replace("'", '"'), markdown(HELP[name])) for name, default in OPTIONS.items()
    }


def test_options_are_taken_one_by_one_or_as_options_not_both():
    with pytest.raises(TypeError, match="pass options= or the options one by one"):
        lora_monitor.LoRAMonitor(options=MonitorOptions(), every_n_steps=10)
