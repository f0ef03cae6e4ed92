"""``lora-monitor``: the command line (:mod:`~lora_monitor.cli.command_line`), what its
commands do (:mod:`~lora_monitor.cli.commands`), and saved adapters read part by part
(:mod:`~lora_monitor.cli.reading`). Importing it loads no torch."""

from lora_monitor.cli.command_line import build_parser, in_flags, main
from lora_monitor.cli.commands import Comparison, compare_adapters, inspect_adapter, truncate_saved
from lora_monitor.cli.reading import CHUNK_BYTES, SavedFactors, _parts, analyze_saved

__all__ = [
    "CHUNK_BYTES",
    "Comparison",
    "SavedFactors",
    "_parts",
    "analyze_saved",
    "build_parser",
    "compare_adapters",
    "in_flags",
    "inspect_adapter",
    "main",
    "truncate_saved",
]
