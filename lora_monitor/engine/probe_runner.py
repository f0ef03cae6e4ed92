"""The functional probe run in a monitored run: :class:`ProbeRunner`, its batch, loss and schedule.

The loss on one fixed batch — a plain loop's ``probe=``, Lightning's ``training_step`` on the
first batch of the fit, the transformers model's own loss on the first batch it trains on —
read at each snapshot with every monitored ΔW cut to k directions
(:func:`lora_monitor.analysis.probe.read_probe`), in the training thread, the model in eval
mode, without gradients, the random number generators left as they were, and the factors put
back exactly.

What it costs, and how that is kept near free (``docs/performance.md``): a reading is 3–10
forward passes of the probe batch. The loss with no update (k = 0) is the frozen model's, so it
is kept while no other parameter or buffer changes (:func:`_fingerprint`). Before the end of
training the probe is read only while its readings stay within its budget of the training (the
``probe_budget`` option),
counted in forward passes (:meth:`ProbeRunner.due`; the first reading priced at the most a
reading of this adapter can take, :func:`reading_price`): the same steps on every machine; a
snapshot it skips carries the latest reading (none before the first); the end of training is
always read, so the recommendation rests on the update it names. A short fit is read at its end
only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_map

from lora_monitor.adapters import plain_lora_layers
from lora_monitor.adapters.truncation import LiveTruncation
from lora_monitor.analysis.probe import ProbeReading, read_probe
from lora_monitor.analysis.rank_rule import RULE
from lora_monitor.engine.distributed import RankContext
from lora_monitor.engine.reporter import Reporter


def loss_value(output: Any) -> float:
    """A loss as a number, from what a probe returns: a tensor, a number, a mapping holding
    ``"loss"`` (Lightning's ``training_step``), or an object with ``.loss`` (transformers)."""
    if isinstance(output, dict):
        output = output.get("loss")
    elif not isinstance(output, (torch.Tensor, float, int)) and hasattr(output, "loss"):
        output = output.loss
    if output is None:
        raise ValueError("the probe returned no loss (None, or no 'loss' in what it returned)")
    return float(output.detach()) if isinstance(output, torch.Tensor) else float(output)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, and the random generators unchanged, for a reading that must
    not change training."""
    training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        model.train(training)


def _plain(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, int, float, str, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


#: A training step's cost in forward passes of its batch (the backward pass costs about two):
#: the probe batch is a training batch, so a reading of n forward passes costs n / 3 steps.
PASSES_PER_STEP = 3.0


def reading_price(ranks: Mapping[str, int], groups: Mapping[str, str]) -> int:
    """The most forward passes a reading of modules of these ``ranks`` (module path → r) can
    take: loss(0), loss(r) and every rank of ``RULE.grid`` below r (:func:`read_probe`), and
    where they hold two groups or more (``groups``: module path → group) each group's loss(0)
    and grid below its r (:func:`read_groups`). What the first reading is priced at, before any
    reading measured one."""

    def below(r: int) -> int:
        return sum(1 for k in RULE.grid if k < r)

    price = 2 + below(max(ranks.values(), default=0))
    members: dict[str, int] = {}
    for name, r in ranks.items():
        if name in groups:
            members[groups[name]] = max(members.get(groups[name], 0), r)
    if len(members) >= 2:
        price += sum(1 + below(r) for r in members.values())
    return price


def _fingerprint(model: torch.nn.Module, cut: Collection[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """What the loss with every cut ΔW at zero depends on besides the batch: every parameter and
    buffer but the cut factors, by storage and version counter — an optimizer step, a load or
    any other in-place write bumps the counter, a ``.data`` swap or a move changes the storage.
    A trained head, peft's ``modules_to_save``, an unmonitored LoRA layer, a BatchNorm's running
    statistics all change it; frozen weights never do."""
    skip = {id(tensor) for tensor in cut}
    return tuple(
        (tensor.data_ptr(), tensor._version)
        for tensor in itertools.chain(model.parameters(), model.buffers())
        if id(tensor) not in skip
    )


class ProbeRunner:
    """Reads the probe when a snapshot is taken, if a loss is known and the run allows it.

    The loss is a plain loop's callable (:attr:`loss`), or a front-end's evaluation of one
    batch it captured (:meth:`capture`): that batch is kept in the monitor's state, so that a
    resumed run probes the batch an uninterrupted one does.

    Args:
        reporter: where the reasons the probe does not run are said (once each), and its failures.
        enabled: the monitor's ``functional_probe`` option.
        budget: its ``probe_budget``: the share of training, in forward passes, the readings
            before the end of training may take.
    """

    def __init__(self, reporter: Reporter, enabled: bool, budget: float) -> None:
        self.reporter, self.enabled, self.budget = reporter, enabled, budget
        #: The loss on the probe batch: a callable of no argument (None: not known yet).
        self.loss: Optional[Callable[[], Any]] = None
        #: The batch a front-end captured (on the host), and how it gives a loss.
        self.batch: Any = None
        self._evaluate: Optional[Callable[[Any], Any]] = None
        self._said: set[str] = set()
        #: ``loss(0)`` and what it was measured with (the loss, the batch, the fingerprint).
        self._base: Optional[tuple[tuple[Any, ...], float]] = None
        #: The step training started at; None: every snapshot is read.
        self._start_step: Optional[int] = None
        #: What the first reading is priced at (:func:`reading_price`; 0 until it is known).
        self.price = 0
        #: The forward passes the readings took so far, and the latest reading's.
        self._spent = self._cost = 0
        #: The latest reading, carried to the snapshots the schedule skips.
        self.latest: Optional[ProbeReading] = None
        #: The step of the latest snapshot the schedule skipped (its reading is :attr:`latest`'s).
        self.skipped: Optional[int] = None

    @property
    def wants_batch(self) -> bool:
        """Whether a front-end should :meth:`capture` a batch (enabled, none given yet)."""
        return self.enabled and self.loss is None and self._evaluate is None

    def capture(self, batch: Any, evaluate: Callable[[Any], Any]) -> None:
        """Probe ``evaluate(batch)`` from now on; the first batch captured (or restored) stays."""
        self._evaluate = evaluate
        if self.batch is None:
            self.batch = tree_map(lambda x: x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x, batch)

    def state_dict(self) -> dict[str, Any]:
        """The captured batch, where it is plain tensors, numbers and containers (what a
        checkpoint loads with ``weights_only=True``); else nothing, and a resumed run captures
        its own first batch."""
        return {"batch": self.batch if _plain(self.batch) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch = state.get("batch")

    def start(self, step: int) -> None:
        """Training starts at ``step``: the schedule counts the training from here."""
        if self._start_step is None:
            self._start_step = step

    def due(self, step: int, final: bool = False) -> bool:
        """Whether the probe is read at the snapshot of ``step``: at the end of training
        (``final``) always; before, when the forward passes of the readings so far and of one
        more like the latest (the first: :attr:`price`, the most it can take) stay within
        :attr:`budget` of the training since :meth:`start` (:data:`PASSES_PER_STEP` passes a
        step). Counted in forward passes, not seconds, so that the same run is read at the same
        steps on any machine: a reading of n passes every n / (budget · 3) steps, about 330 for
        n = 5 at the default 0.5 %, the first after about 730 steps for r = 16 (11 passes at
        most; ``docs/performance.md``). Without :meth:`start` (a monitor driven by hand), every
        snapshot is read."""
        if final or self._start_step is None or self.budget == math.inf:
            return True
        training = PASSES_PER_STEP * (step - self._start_step)
        return self._spent + (self._cost if self.latest is not None else self.price) <= self.budget * training

    def _loss(self, model: torch.nn.Module) -> Optional[Callable[[], Any]]:
        if self.loss is not None:
            return self.loss
        if self._evaluate is None or self.batch is None:
            return None
        evaluate, device = self._evaluate, next(model.parameters()).device
        batch = _to_device(self.batch, device)
        return lambda: evaluate(batch)

    def disable(self, reason: str) -> None:
        """No probe in this run, and why (said once)."""
        self.enabled = False
        self._note(f"the functional probe does not run: {reason}; the suggestion rests on ΔW's spectra alone")

    def _note(self, message: str) -> None:
        """Why the probe is not read where it cannot be: said once, to the console (not a
        warning: nothing failed, and the report says the suggestion is spectrum only)."""
        if message not in self._said and self.reporter.speaks:
            self._said.add(message)
            self.reporter.info(f"{self.reporter.options.owner}: {message}")

    def read(
        self,
        model: torch.nn.Module,
        adapter_name: Optional[str],
        module_names: Collection[str],
        rank_context: RankContext,
        step: int,
        final: bool = False,
        groups: Optional[Mapping[str, str]] = None,
    ) -> Optional[ProbeReading]:
        """The probe at ``step`` (the latest reading where the schedule skips ``step``,
        :meth:`due`; ``final``: the end of training, always read), or None (not enabled, no
        loss known, not this process's, or it cannot run: said once, with the reason).
        ``groups``: module path → its group (attention, MLP); where the cut modules hold two,
        each is also read cut alone (:func:`read_groups`), its passes counted in the schedule."""
        loss = self._loss(model)
        if not self.enabled or loss is None or not rank_context.is_main:
            return None
        if rank_context.world_size > 1 and rank_context.collective_forward is not None:
            self._note(
                f"the functional probe does not run under {rank_context.collective_forward} (its forward is "
                f"collective); no probe reading"
            )
            return None
        try:
            layers = {
                name: found for name, found in plain_lora_layers(model, adapter_name).items() if name in module_names
            }
            if any(layer.lora_A[name].weight.__class__.__name__ == "DTensor" for layer, name in layers.values()):
                self._note("the functional probe does not cut sharded factors (FSDP2); no probe reading")
                return None
            if not layers:
                self._note(
                    "the functional probe cuts plain LoRA updates (s·B·A) and none of the monitored "
                    "modules has one (DoRA, AdaLoRA and PiSSA-like updates are not cut); no probe reading"
                )
                return None
            self.price = reading_price(
                {name: layer.lora_A[adapter].weight.shape[0] for name, (layer, adapter) in layers.items()},
                groups or {},
            )
            if not self.due(step, final):
                self.skipped = step
                return self.latest
            cut = [layer.lora_A[name].weight for layer, name in layers.values()]
            cut += [layer.lora_B[name].weight for layer, name in layers.values()]
            # The probe's identity, ``loss(0)`` depends on nothing else: a new loss or batch, or
            # any other parameter or buffer written, and it is measured again.
            key = (self.loss, self._evaluate, id(self.batch), sorted(layers), _fingerprint(model, cut))
            base = self._base[1] if self._base is not None and self._base[0] == key else None
            passes = 0
            with _evaluating(model):
                with LiveTruncation(layers) as truncation:

                    def loss_at(k: int) -> float:
                        nonlocal passes
                        passes += 1
                        truncation.cut(k)
                        return loss_value(loss())

                    reading = read_probe(loss_at, truncation.rank, base)
                reading, group_passes = read_groups(reading, layers, groups or {}, loss)
                passes += group_passes
            self._base = (key, reading.losses[0])
            self._spent, self._cost = self._spent + passes, passes
            self.latest, self.skipped = reading, None
            return reading
        except Exception as error:  # an analysis problem: never the end of a training run
            self.enabled = False
            self.reporter.report(
                f"step {step}: the functional probe failed with {type(error).__name__}: {error}; it is "
                f"not read again in this run"
            )
            return None


def read_groups(
    reading: ProbeReading, layers: Mapping[str, tuple], groups: Mapping[str, str], loss: Callable[[], Any]
) -> tuple[ProbeReading, int]:
    """``reading`` with each group's own reading (:attr:`ProbeReading.groups`) where ``layers``
    hold modules of two groups or more (attention and MLP): the group cut to k directions, the
    others whole; and the forward passes they took. The whole update's loss is ``reading``'s
    (every group whole), so a group's reading costs its ``loss(0)`` and its grid. None is read
    while the update has not lowered the loss (``reading.rank`` None: nothing to share out)."""
    members: dict[str, dict[str, tuple]] = {}
    for name, found in layers.items():
        if name in groups:
            members.setdefault(groups[name], {})[name] = found
    if len(members) < 2 or reading.rank is None:
        return reading, 0
    passes, whole = 0, reading.losses[reading.r]
    readings = {}
    for group, chosen in sorted(members.items()):
        with LiveTruncation(chosen) as truncation:

            def loss_at(k: int) -> float:
                nonlocal passes
                if k >= truncation.rank:
                    return whole  # every module whole again: the joint reading's loss(r)
                passes += 1
                truncation.cut(k)
                return loss_value(loss())

            readings[group] = read_probe(loss_at, truncation.rank)
    return dataclasses.replace(reading, groups=readings), passes
