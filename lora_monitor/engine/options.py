"""The monitor's options: one dataclass, validated on construction (as peft's configs are)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union, get_type_hints

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
    two equal), and :func:`spells_out_options` gives such a front-end the runtime signature
    that names them all. Lightning's callback spells them out instead, for LightningCLI."""

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
    probe_budget: float
    adapter_dir: Optional[Union[str, os.PathLike]]


@dataclass(frozen=True)
class MonitorOptions:
    """What to watch and how; validated on construction, with messages that say what to pass.

    The fields are the monitor's arguments, and the one home of their names, defaults and help
    (``metadata["help"]``, as peft's configs document theirs): :class:`LoRAMonitor`'s docstring
    and ``docs/usage.md``'s table say the same (``tests/engine/test_options.py`` checks them).
    ``owner`` names the front-end in messages.
    """

    every_n_steps: int = field(
        default=50,
        metadata={
            "help": (
                "snapshot period, in optimizer steps (Lightning's ``trainer.global_step``); a last snapshot is "
                "taken when training ends."
            )
        },
    )
    reference: Reference = field(
        default="first",
        metadata={
            "help": (
                'what the current update is compared with: ``"first"`` — the first snapshot of the run; '
                '``"previous"`` — the snapshot before; or the path of an adapter directory written by peft\'s '
                "``save_pretrained`` (another rank or seed), whose shapes are checked layer by layer at setup."
            )
        },
    )
    target_modules: Optional[Union[str, Sequence[str]]] = field(
        default=None,
        metadata={
            "help": (
                'which projections to monitor. Default (None, or ``"all-linear"`` as peft spells it): every LoRA '
                "module the adapter trains, grouped by kind (q, k, v, o, gate, up, down under each architecture's"
                " names), so that the probe cuts and the answer covers the whole adapter (the φ heatmaps draw q "
                'and v). Else canonical names ``"q"``, ``"k"``, ``"v"``, ``"o"`` (matching ``q_proj``, ``query``,'
                " GPT-2's fused ``c_attn``, ...) or a module's own name, as in peft's "
                '``LoraConfig.target_modules``: ``("q", "v")`` is the paper\'s choice; the report then names the '
                "trained modules the answer does not cover."
            )
        },
    )
    layers: Optional[Sequence[int]] = field(
        default=None,
        metadata={
            "help": (
                "layer indices whose φ heatmaps are drawn; scalars and the overview cover every monitored layer. "
                "Default: four layers spread over depth, like the paper's 1/32/64/96."
            )
        },
    )
    basis: Basis = field(
        default="A",
        metadata={
            "help": (
                'the singular vectors φ is computed in (:data:`lora_monitor.functional.bases.BASES`): ``"A"`` '
                '(right singular vectors of ``lora_A``, the paper\'s choice), ``"B"`` (left singular vectors of '
                '``lora_B``), ``"delta_w_left"``, ``"delta_w_right"`` (of ΔW).'
            )
        },
    )
    adapter_name: Optional[str] = field(
        default=None,
        metadata={"help": ("the peft adapter to monitor; default the active one.")},
    )
    log_images: bool = field(
        default=True,
        metadata={"help": ("draw and log the figures (the overview and the φ heatmaps); scalars are always logged.")},
    )
    strict: bool = field(
        default=False,
        metadata={
            "help": (
                "raise instead of warning when a snapshot of a module cannot be analyzed (for tests and CI). "
                "Errors in the configuration are raised at setup either way."
            )
        },
    )
    intruder_top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "count the intruder dimensions (Shuttleworth et al. 2024) among the top ``intruder_top_k`` "
                "singular vectors of W₀ + ΔW (e.g. 10). Off (None) by default: it takes two dense SVDs (of W₀ and"
                " of W₀ + ΔW) per module and snapshot."
            )
        },
    )
    asynchronous: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "analyze and draw each snapshot in a worker thread (on a CUDA side stream on a GPU) while "
                "training goes on; the copy of the factors is still taken at its step, and its results are "
                "written from the training thread at a later step, under their own step, and all of them when "
                "training ends. Default (None): on when the monitored factors are on a CUDA device."
            )
        },
    )
    functional_probe: bool = field(
        default=True,
        metadata={
            "help": (
                "read the functional probe (:mod:`lora_monitor.analysis.probe`), the loss on one batch with every"
                " monitored ΔW cut to k directions, at snapshots as often as its share of the training time "
                "allows (``docs/performance.md``; a snapshot it skips carries the latest reading) and always when"
                " training ends; it drives the rank suggestion with ΔW's spectral gaps. Off: the suggestion rests"
                " on ΔW's spectra alone."
            )
        },
    )
    probe_budget: float = field(
        default=0.005,
        metadata={
            "help": (
                "the share of training the functional probe's readings may take before training ends, counted"
                " in forward passes of a batch (a training step counts 3, so the same run is read at the same "
                "steps on any machine): a snapshot is read when the readings so far and the next fit in it. At "
                "the default 0.5 % the first reading comes after about 530 steps at r = 8, 730 at r = 16, 1000 "
                "at r = 64, and a shorter run is read at its end only, which is always read. ``float('inf')``: "
                "every snapshot, for early answers in a short run at their cost; 0: the end only."
            )
        },
    )
    adapter_dir: Optional[Union[str, os.PathLike]] = field(
        default=None,
        metadata={
            "help": (
                "the directory this run saves its adapter to (``model.save_pretrained(adapter_dir)``), named in "
                "the end-of-fit advice so that its ``lora-monitor truncate`` command runs as printed; default a "
                "placeholder, ``ADAPTER_DIR``."
            )
        },
    )
    owner: str = field(default="LoRAMonitor", metadata={"help": "the front-end, as messages name it."})

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
        budget = self.probe_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            fail(
                "probe_budget must be a share of training, a number ≥ 0 such as 0.005 (0.5 %, the default), "
                f"0 (the probe read when training ends only) or float('inf') (at every snapshot); got {budget!r}"
            )
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


FrontEnd = TypeVar("FrontEnd", bound=type)


def spells_out_options(front_end: FrontEnd) -> FrontEnd:
    """Give ``front_end.__init__``, which takes ``**options: Unpack[MonitorKwargs]``, the runtime
    signature that names every option with its type and default (:class:`MonitorOptions`'):
    what ``help()``, notebooks' call tips and ``inspect.signature`` show, as if spelled out."""
    init: Callable[..., None] = front_end.__init__  # type: ignore[misc]
    signature = inspect.signature(init)
    types = get_type_hints(MonitorKwargs)
    options = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=types[f.name])
        for f in fields(MonitorOptions)
        if f.name != "owner" and f.default is not MISSING
    ]
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    init.__signature__ = signature.replace(parameters=[*kept, *options])  # type: ignore[attr-defined]
    return front_end
