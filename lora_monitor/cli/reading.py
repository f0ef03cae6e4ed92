"""Saved adapters read part by part: the CLI's memory holds one part of a shape group, not the
adapter."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora_monitor.functional.bases import Basis

if TYPE_CHECKING:
    from lora_monitor.adapters import LoRAFactors, ModuleKey
    from lora_monitor.analysis import ModuleAnalysis


#: Bytes of LoRA factors (the adapter's and its reference's) read and analyzed at once. Big
#: enough that a part of a 7B-shaped adapter's shape group is several modules (the analysis
#: batches them), small against the torch runtime's own resident memory.
CHUNK_BYTES = 16 * 2**20


@dataclass
class SavedFactors:
    """The selected modules of an adapter directory, whose factors are read part by part.

    ``factors`` holds every selected module with meta tensors (shapes and ranks, no data) from
    the safetensors header; :meth:`read` gives some of them with their values. An
    ``adapter_model.bin`` cannot be read in parts: its factors are all read at once.
    """

    path: Path
    factors: dict[ModuleKey, LoRAFactors]
    #: The base model's config.json (or its directory), to split fused q|k|v modules.
    base_config: Optional[Path] = None

    @classmethod
    def open(
        cls,
        directory: str | Path,
        projections: Optional[Sequence[str]] = None,
        layers: Optional[Sequence[int]] = None,
        base_config: Optional[str | Path] = None,
    ) -> SavedFactors:
        """Read the adapter's config and header only (and ``base_config``, see
        :func:`~lora_monitor.adapters.load_adapter`).

        Raises:
            LoRAMonitorError: as :func:`lora_monitor.adapters.load_adapter` and
                :func:`lora_monitor.adapters.select_factors`.
        """
        from lora_monitor.adapters import load_adapter, select_factors

        path = Path(directory)
        config = Path(base_config) if base_config is not None else None
        factors = load_adapter(path, config, modules=()).factors
        return cls(path, select_factors(factors, projections, layers), config)

    def read(self, keys: Iterable[ModuleKey]) -> dict[ModuleKey, LoRAFactors]:
        """The factors of ``keys`` with their values (only their modules' tensors are read)."""
        keys = list(keys)
        if not any(self.factors[k].lora_A.is_meta for k in keys):
            return {k: self.factors[k] for k in keys}
        from lora_monitor.adapters import load_adapter

        read = load_adapter(self.path, self.base_config, modules={self.factors[k].module_name for k in keys}).factors
        return {k: read[k] for k in keys}


def _parts(adapters: Sequence[dict[ModuleKey, LoRAFactors]], chunk_bytes: int) -> list[list[ModuleKey]]:
    """The keys of ``adapters[0]`` grouped as :func:`~lora_monitor.analysis.analyze` batches
    them (same shapes in every adapter), each group cut into parts of at most ``chunk_bytes``
    of factors (at least one module a part)."""
    from lora_monitor.analysis import group_by_shape

    groups = group_by_shape(adapters[0], adapters[1] if len(adapters) > 1 else None)
    parts: list[list[ModuleKey]] = []
    for keys in groups.values():
        part: list[ModuleKey] = []
        size = 0
        for key in keys:
            nbytes = sum(t.numel() * t.element_size() for f in adapters for t in (f[key].lora_A, f[key].lora_B))
            if part and size + nbytes > chunk_bytes:
                parts.append(part)
                part, size = [], 0
            part.append(key)
            size += nbytes
        parts.append(part)
    return parts


def analyze_saved(
    current: SavedFactors,
    reference: Optional[SavedFactors] = None,
    basis: Basis = "A",
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[ModuleKey, ModuleAnalysis]:
    """:func:`~lora_monitor.analysis.analyze` of a saved adapter (against a saved reference),
    reading and analyzing ``chunk_bytes`` of factors at a time: every module's analysis is its
    own, so the results are those of the whole adapter analyzed at once, while peak memory
    is one part's factors and temporaries. A module absent from ``reference`` is an error of
    :func:`~lora_monitor.adapters.check_reference_compatible`, checked before anything is read.
    """
    from lora_monitor.adapters import check_reference_compatible
    from lora_monitor.analysis import Snapshot, analyze

    if reference is not None:
        check_reference_compatible(current.factors, reference.factors, basis)
    adapters = [current.factors] if reference is None else [current.factors, reference.factors]
    analyses: dict[ModuleKey, ModuleAnalysis] = {}
    for keys in _parts(adapters, chunk_bytes):
        snapshot = Snapshot(step=0, factors=current.read(keys))
        analyses.update(analyze(snapshot, reference.read(keys) if reference is not None else None, basis))
    return analyses
