"""What each snapshot is compared with: :class:`References`, and the state that keeps it across
a resume."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Optional

from lora_monitor.adapters import (
    LoRAFactors,
    LoRAMonitorError,
    ModuleKey,
    check_reference_compatible,
    load_adapter,
)
from lora_monitor.analysis import ReferenceBases, Snapshot, analyze, missing_initial_note, with_base_weights
from lora_monitor.engine.distributed import all_gather_objects
from lora_monitor.engine.options import MonitorOptions

Factors = dict[ModuleKey, LoRAFactors]


class References:
    """The references of one monitor, by its ``reference`` option.

    - ``"first"`` / ``"previous"``: this run's first / previous scheduled snapshot;
    - an adapter directory: its factors, read and checked against the model at :meth:`load`;
    - always: the factors before the first optimizer step (:attr:`initial`), A's starting
      point for ``a_init_similarity`` and B₀, A₀ of a PiSSA-like initialization.

    The bases of a reference that never changes ("first", an adapter) are computed once
    (:meth:`bases_of`, called by whichever thread analyses). Everything else is touched by the
    training thread only: what a snapshot is compared with is decided at its step, so that
    checkpoints and resume see it.

    Where the ranks split the analysis, each rank's references hold the modules it analyzes
    only (:meth:`keep_only`), and so does its :meth:`state_dict`: every rank saves and restores
    its own, with the same number of ranks.
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        #: The saved adapter's factors (``reference=<directory>``), None otherwise.
        self.saved: Optional[Factors] = None
        self.first: Optional[Snapshot] = None
        self.previous: Optional[Snapshot] = None
        #: The factors before the first optimizer step (from a fresh start only).
        self.initial: Optional[Snapshot] = None
        #: The reference factors the cached bases were computed from, and the bases.
        self._bases: Optional[tuple[Factors, ReferenceBases]] = None

    @property
    def initial_factors(self) -> Optional[Factors]:
        return self.initial.factors if self.initial is not None else None

    def load(self, monitored: Mapping[ModuleKey, LoRAFactors]) -> None:
        """Read the reference adapter (``reference=<directory>``) and check it against the
        ``monitored`` modules: same layers, same shapes, analysable in the basis.

        Raises:
            LoRAMonitorError: naming what differs and what to do.
        """
        options = self.options
        if not options.compares_runs:
            return
        saved = load_adapter(options.reference)
        check_reference_compatible(monitored, saved.factors, options.basis)
        projections = {projection for _, projection in monitored}
        layers = sorted({layer for layer, _ in monitored})
        reference_layers = sorted({layer for layer, p in saved.factors if p in projections})
        if reference_layers != layers:
            raise LoRAMonitorError(
                f"the reference adapter {options.reference} has LoRA modules in layers "
                f"{reference_layers} but the model in layers {layers}: it was trained on a "
                f"base model with more layers; compare adapters of the same base model (and the "
                f"same LoraConfig(layers_to_transform=...))"
            )
        # A DoRA reference's D needs W₀: the same base model's, so the monitored model's.
        self.saved = with_base_weights({key: saved.factors[key] for key in monitored}, monitored)
        self._check_analysable()

    def keep_only(self, keys: Collection[ModuleKey]) -> None:
        """Drop the modules outside ``keys`` from every reference: where the ranks split the
        analysis, a rank compares its own share only (the adapter is read and checked whole at
        :meth:`load`, on every rank alike). A reference that holds no other module is left as
        it is, so that its cached bases stay valid."""
        keep = set(keys)

        def kept(factors: Factors) -> Factors:
            return factors if factors.keys() <= keep else {k: f for k, f in factors.items() if k in keep}

        if self.saved is not None:
            self.saved = kept(self.saved)
        for name in ("first", "previous", "initial"):
            snapshot: Optional[Snapshot] = getattr(self, name)
            if snapshot is not None and not snapshot.factors.keys() <= keep:
                setattr(self, name, Snapshot(step=snapshot.step, factors=kept(snapshot.factors)))

    def _check_analysable(self) -> None:
        # A reference that cannot be analyzed would warn at every snapshot of every module:
        # the user must fix it, so say it once, before training.
        assert self.saved is not None
        alone = analyze(Snapshot(step=0, factors=self.saved), None, self.options.basis)
        problems = [
            f"layer {layer} projection {projection!r}: {'; '.join(analysis.problems)}"
            for (layer, projection), analysis in sorted(alone.items())
            if analysis.problems
        ]
        if problems:
            raise LoRAMonitorError(
                f"the reference adapter {self.options.reference} cannot be compared in basis "
                f"{self.options.basis!r}: {', '.join(problems)}. An adapter saved before training has "
                f"lora_B = 0 (peft's initialization): save it after training, or use basis='A'; "
                f"NaN or Inf come from a run that diverged"
            )

    def start(self, snapshot: Snapshot, step: int) -> Optional[str]:
        """Training starts at ``step`` with the factors of ``snapshot``: from a fresh start
        (0), keep them as the initial factors. Returns what a late start cannot tell, or None."""
        if step == 0:
            self.initial = snapshot
            return None
        return missing_initial_note(snapshot.factors, step)

    def for_snapshot(self) -> tuple[Optional[Factors], Optional[int]]:
        """The factors the next snapshot is compared with, and their step (None for an
        adapter); ``(None, None)`` when there is nothing to compare with yet."""
        if self.saved is not None:
            return self.saved, None
        earlier = self.first if self.options.reference == "first" else self.previous
        if earlier is None:
            return None, None
        return earlier.factors, earlier.step

    def remember(self, snapshot: Snapshot) -> None:
        """Keep a scheduled snapshot if a later one is compared with it: only what "first" and
        "previous" need, so that the history stays bounded."""
        if self.options.reference == "first" and self.first is None:
            self.first = snapshot
        if self.options.reference == "previous":
            self.previous = snapshot

    def bases_of(self, reference: Optional[Factors], snapshot: Snapshot) -> Optional[ReferenceBases]:
        """The cached bases of ``reference`` for comparing ``snapshot``, or None where they are
        computed with the snapshot ("previous" changes every time)."""
        if reference is None or self.options.reference == "previous":
            return None
        if self._bases is None or self._bases[0] is not reference:
            bases = ReferenceBases.compute(reference, snapshot.factors, self.options.basis, self.initial_factors)
            self._bases = (reference, bases)
        return self._bases[1]

    def state_dict(self, gather_shares: bool = False) -> dict[str, Any]:
        """The references a resumed run needs, as plain CPU tensors. Where the ranks split the
        analysis each holds its share of the references: ``gather_shares`` gathers them into
        one state (a collective: every rank calls it)."""
        state = {
            name: snapshot.state_dict() if snapshot is not None else None
            for name, snapshot in (("first", self.first), ("previous", self.previous), ("initial", self.initial))
        }
        if gather_shares:
            shares = all_gather_objects(state)
            for name in state:
                parts = [share[name] for share in shares if share[name] is not None]
                if parts:
                    state[name] = {"step": parts[0]["step"], "modules": [m for part in parts for m in part["modules"]]}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        def restored(name: str) -> Optional[Snapshot]:
            state = state_dict.get(name)
            return Snapshot.from_state_dict(state) if state is not None else None

        self.first, self.previous, self.initial = restored("first"), restored("previous"), restored("initial")
