"""The report's per-kind answer and its gaps: the "what to do" gives peft's rank_pattern with the
parameters it saves and a truncate command per group; a narrowed target_modules is named."""

from __future__ import annotations

import dataclasses
import re

from peft.utils.other import get_pattern_key

from lora_monitor.adapters.kinds import groups_of, trained_modules
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.cli.commands import parse_ranks
from lora_monitor.outputs.rank_text import advice, report_markdown, summary_line
from tests.analysis.test_rank_kinds import R, _factors, _reading


def _split(mlp: float = 1.3):
    """Attention needing 1 direction; the MLP 4 of r = 8 (``mlp`` = 1.3: r still twice what it
    uses) or all 8 (2.5: r may be too small)."""
    factors = _factors()
    analyses = analyze(Snapshot(step=1, factors=factors), None, "A")
    rec = recommend_rank(
        analyses, probe=_reading(0.3, mlp), groups=groups_of(factors), trained=trained_modules(factors)
    )
    return factors, rec


def test_what_to_do_gives_a_rank_pattern_peft_reads_and_the_parameters_it_saves():
    factors, rec = _split()
    split = rec.per_kind
    assert split is not None
    line = summary_line(rec)
    assert line.startswith(f"suggested LoRA rank {rec.rank}: attention {split['attention']}, MLP {split['mlp']} (")
    text = advice(rec, "runs/a")
    (config,) = re.findall(r"LoraConfig\(r=(\d+), rank_pattern=(\{[^}]*\})", text)
    r, pattern = int(config[0]), eval(config[1])  # a dict literal of the text itself
    for f in factors.values():
        name = f.module_name
        wanted = split["attention"] if "self_attn" in name else split["mlp"]
        assert pattern.get(get_pattern_key(list(pattern), name), r) == wanted, name
    # The parameters: counted here from the shapes, A r × in and B out × r.
    sizes = {f.module_name: f.in_features + f.out_features for f in factors.values()}
    uniform = sum(min(rec.rank, R) * n for n in sizes.values())
    mixed = sum((split["attention"] if "self_attn" in m else split["mlp"]) * n for m, n in sizes.items())
    count = lambda n: f"{n:,}".replace(",", " ")  # noqa: E731
    assert f"({count(mixed)} LoRA parameters, {count(uniform - mixed)} fewer than r = {rec.rank}" in text
    (command,) = re.findall(r"`(lora-monitor truncate [^`]+)`", text)
    spec = command.split("--rank ")[1].split()[0]
    assert parse_ranks(spec) == split
    assert "-o runs/a_attention" in command
    assert "Per kind (they differ more than 2×" in report_markdown(rec, "runs/a")


def test_a_narrowed_target_modules_is_named_in_the_line_the_advice_and_the_report():
    _, rec = _split()
    narrowed = dataclasses.replace(rec, not_covered=("k", "o", "up_proj"))
    assert "not covered: the adapter also trains k, o, up_proj" in summary_line(narrowed)
    assert "the adapter also trains k, o, up_proj, which lora-monitor truncate cuts too" in advice(narrowed)
    assert "Modules not covered: the adapter also trains k, o, up_proj" in report_markdown(narrowed)
    assert "not covered" not in summary_line(rec) + advice(rec) + report_markdown(rec)


def test_a_kind_too_small_gets_a_larger_r_and_the_other_its_own():
    factors, rec = _split(mlp=2.5)
    assert rec.too_small and rec.kinds["mlp"].too_small and not rec.kinds["attention"].too_small
    text = advice(rec, "runs/a")
    assert text.startswith("Train again with a larger r for the MLP modules")
    (config,) = re.findall(r"LoraConfig\(r=(\d+), rank_pattern=(\{[^}]*\})", text)
    r, pattern = int(config[0]), eval(config[1])
    for f in factors.values():
        wanted = rec.per_kind["attention"] if "self_attn" in f.module_name else 2 * R
        assert pattern.get(get_pattern_key(list(pattern), f.module_name), r) == wanted
    assert "truncate" not in text  # nothing to cut: the MLP needs more
