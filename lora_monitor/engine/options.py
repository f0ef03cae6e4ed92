"""The monitor's options: one dataclass, validated on construction (as peft's configs are)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

from typing_extensions import TypedDict

from lora_monitor.functional.bases import BASES, Basis

#: ``"first"``, ``"previous"`` or the path of an adapter directory saved by ``save_pretrained``.
Reference = Union[Literal["first", "previous"], str, os.PathLike]

#: ``target_modules``' default, as peft spells it: every LoRA module the adapter trains
#: (``None``, or the string ``"all-linear"``, peft's own name for every linear layer).
ALL_TRAINED = "all-linear"


class MonitorKwargs(TypedDict, total=False):
    """The options as keyword arguments, for the front-ends that take them with arguments of
    their own (``**options: Unpack[MonitorKwargs]``, PEP 692): their names and types, which IDEs
    and type checkers read; defaults and help are :class:`MonitorOptions`' (a test keeps the
    two equal). Lightning's callback spells them out instead, for LightningCLI."""

    every_n_steps: int
    reference: Reference
    target_modules: Optional[Union[str, Sequence[str]]]
    layers: Optional[Sequence[int]]
    basis: Basis
    adapter_name: Optional[str]
    log_images: bool
    strict: bool
    intruder_top_k: Optional[int]
    asynchronous: Optional[bool]
    functional_probe: bool
    adapter_dir: Optional[Union[str, os.PathLike]]


@dataclass(frozen=True)
class MonitorOptions:
    """What to watch and how; validated on construction, with messages that say what to pass.

    The fields are the monitor's arguments (see :class:`LoRAMonitor`). ``owner`` names the
    front-end in messages.
    """

    every_n_steps: int = 50
    reference: Reference = "first"
    target_modules: Optional[Union[str, Sequence[str]]] = None
    layers: Optional[Sequence[int]] = None
    basis: Basis = "A"
    adapter_name: Optional[str] = None
    log_images: bool = True
    strict: bool = False
    intruder_top_k: Optional[int] = None
    asynchronous: Optional[bool] = None
    functional_probe: bool = True
    adapter_dir: Optional[Union[str, os.PathLike]] = None
    owner: str = "LoRAMonitor"

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"{self.owner}: {message}")

        every = self.every_n_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            fail(f"every_n_steps must be a positive integer, got {every!r}")
        reference = self.reference
        if not isinstance(reference, (str, os.PathLike)) or str(reference) == "":
            fail(
                "reference must be 'first', 'previous' or the path of an adapter directory saved "
                f"with save_pretrained, got {reference!r}"
            )
        targets = self.target_modules
        if targets == ALL_TRAINED:
            targets = None
        elif isinstance(targets, str):
            targets = (targets,)
        if targets is not None and (not targets or not all(isinstance(t, str) and t for t in targets)):
            fail(
                "target_modules must be None (every LoRA module of the adapter), 'all-linear' (the "
                "same) or a non-empty list of projection names such as ['q', 'v'] or ['q_proj', "
                f"'gate_proj'], got {self.target_modules!r}"
            )
        layers = self.layers
        if layers is not None and (
            not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        ):
            fail(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if self.basis not in BASES:
            fail(f"basis must be one of {', '.join(map(repr, BASES))}, got {self.basis!r}")
        top_k = self.intruder_top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            fail(
                "intruder_top_k must be None (off) or a positive number of singular vectors to "
                f"check, such as 10; got {top_k!r}"
            )
        if not isinstance(self.functional_probe, bool):
            fail(f"functional_probe must be True or False, got {self.functional_probe!r}")
        if self.adapter_dir is not None and (
            not isinstance(self.adapter_dir, (str, os.PathLike)) or not str(self.adapter_dir)
        ):
            fail(
                "adapter_dir must be None or the directory this run saves its adapter to "
                f"(model.save_pretrained(adapter_dir)), got {self.adapter_dir!r}"
            )
        if self.asynchronous is not None and not isinstance(self.asynchronous, bool):
            fail(
                "asynchronous must be True, False or None (on when the LoRA factors are on a CUDA "
                f"device), got {self.asynchronous!r}"
            )
        # Normal forms: a tuple of targets, a list of layers, a Path for a directory.
        object.__setattr__(self, "target_modules", None if targets is None else tuple(targets))
        if layers is not None:
            object.__setattr__(self, "layers", list(layers))
        if reference not in ("first", "previous"):
            object.__setattr__(self, "reference", Path(reference))

    @classmethod
    def of(cls, arguments: dict[str, Any], owner: str) -> MonitorOptions:
        """The options among a front-end's constructor ``arguments`` (its ``locals()``): for
        Lightning's callback, which spells them out in its signature for LightningCLI (the
        others take ``**options: Unpack[MonitorKwargs]``)."""
        names = [f.name for f in fields(cls) if f.name != "owner" and f.name in arguments]
        return cls(owner=owner, **{name: arguments[name] for name in names})

    @property
    def compares_runs(self) -> bool:
        """True when the reference is another run (an adapter directory), not this run's past."""
        return isinstance(self.reference, Path)

    @property
    def watches_all_trained(self) -> bool:
        """True at the default: every LoRA module the adapter trains is monitored (the φ
        heatmaps then draw q and v only, the paper's choice)."""
        return self.target_modules is None

    def identity(self) -> dict[str, Any]:
        """The options that tell two monitors of one run apart (their checkpoint state keys)."""
        return {
            "reference": str(self.reference),
            "basis": self.basis,
            "target_modules": self.target_modules,
            "adapter_name": self.adapter_name,
        }
