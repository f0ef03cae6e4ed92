"""Which modules each process analysed: an engine that writes it down, and reading it back."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_monitor.engine import LoRAMonitor


class RecordingEngine(LoRAMonitor):
    """The engine, writing which modules this rank analysed at each step to
    ``<record_dir>/rank<R>.jsonl``."""

    record_dir: Path

    def _analyse(self, job):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(self.record_dir / f"rank{rank}.jsonl", "a") as record:
            record.write(json.dumps([job.snapshot.step, sorted(job.snapshot.factors)]) + "\n")
        return super()._analyse(job)


def analysed(record_dir: Path, rank: int) -> dict[int, set[tuple[int, str]]]:
    """step → the modules ``rank`` analysed at that step, as :class:`RecordingEngine` wrote them."""
    lines = (record_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return {step: {tuple(key) for key in keys} for step, keys in map(json.loads, lines)}
