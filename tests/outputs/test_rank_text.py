"""lora_monitor.outputs.rank_text: one language for every number. The report the monitor writes to
TensorBoard's Text tab and the tables of ``lora-monitor inspect`` / ``compare`` give the same
value, formatted the same, under every column header they share, for the same adapter."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.analysis.probe import read_probe
from lora_monitor.analysis.rank import recommend_rank
from lora_monitor.cli import main
from lora_monitor.outputs.rank_text import GAP_RANK_COLUMN, advice, report_markdown
from lora_monitor.outputs.tags import RECOMMENDATION_PLACE, RECOMMENDATION_TEXT_TAG
from tests.helpers.events import read_events
from tests.helpers.factors import random_factors
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora


def module_tables(markdown: str) -> list[dict[str, dict[str, str]]]:
    """Every Markdown table whose first column is ``module``: header → {module → cell}."""
    tables, lines = [], markdown.splitlines()
    for index, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == "module":
            rows = []
            for row in lines[index + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            tables.append({header: {r[0]: r[n] for r in rows} for n, header in enumerate(cells)})
    return tables


def cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def report(trainer) -> str:
    events = read_events(trainer.logger.log_dir)
    # The console names the tag as TensorBoard's Text tab shows it.
    assert RECOMMENDATION_PLACE.endswith(f"→ {RECOMMENDATION_TEXT_TAG}")
    assert RECOMMENDATION_TEXT_TAG in events.Tags()["tensors"]
    (text,) = events.Tensors(RECOMMENDATION_TEXT_TAG)
    return text.tensor_proto.string_val[0].decode()


def assert_agree(live: dict, offline: dict, at_least: set[str]) -> None:
    shared = (set(live) & set(offline)) - {"module"}
    assert at_least <= shared, shared
    for header in shared:
        assert live[header] == offline[header], header


def test_inspect_and_the_tensorboard_report_agree(tmp_path):
    model = tiny_llama_lora(rank=4, num_layers=2)
    trainer = make_trainer(tmp_path, [LoRASubspaceMonitor(every_n_steps=2, reference="first")], max_steps=4)
    trainer.fit(CausalLMModule(model))
    model.save_pretrained(str(tmp_path / "adapter"))
    (live,) = module_tables(report(trainer))
    (offline,) = module_tables(cli("inspect", str(tmp_path / "adapter")))
    assert_agree(live, offline, {"‖ΔW‖_F", "ΔW σ₁", GAP_RANK_COLUMN, "ΔW energy rank (90 %)", "ΔW stable rank"})
    assert len(live["module"]) == 4


def test_compare_and_the_tensorboard_report_agree(tmp_path):
    reference = tiny_llama_lora(rank=4, num_layers=2, seed=1)
    reference.save_pretrained(str(tmp_path / "reference"))
    model = tiny_llama_lora(rank=8, num_layers=2, seed=0)
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference=tmp_path / "reference")
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    trainer.fit(CausalLMModule(model))
    model.save_pretrained(str(tmp_path / "adapter"))
    (live,) = module_tables(report(trainer))
    output = cli("compare", str(tmp_path / "reference"), str(tmp_path / "adapter"), "--no-figure", "-q")
    (offline,) = module_tables(output)
    assert_agree(
        live,
        offline,
        {"shared directions", "φ(1, 1) / chance", "ΔW σ₁/σ₂", GAP_RANK_COLUMN, "ΔW energy rank (90 %)"},
    )
    # One answer: compare and inspect of the same adapter give the same rank (φ is shown beside,
    # never used), and the live report gives its readings, which the offline ones are part of.
    inspected = cli("inspect", str(tmp_path / "adapter"))
    gaps = re.search(r"(ΔW's spectral gaps [^;]*|no spectral gap in ΔW);", inspected).group(0)
    assert gaps in output and gaps in report(trainer)
    head = re.search(r"(suggested LoRA rank \d+|no LoRA rank is supported)", inspected).group(0)
    assert head in output
    # The live report alone has W₀.
    assert "‖ΔW‖_F/‖W₀‖_F" in live and "‖ΔW‖_F/‖W₀‖_F" not in offline


@pytest.mark.parametrize("dip", [False, True])
def test_shares_measured_to_a_cut_below_the_whole_update_are_explained(dip):
    # Cut to 2 directions, the probe loss may fall below the whole update's (the rest hurt on
    # that batch): the shares are measured to that lowest loss, and a line says so.
    analyses = analyze(Snapshot(step=4, factors=random_factors(2, ("q", "v"), rank=8, seed=0)))
    losses = {0: 1.0, 1: 0.5, 2: 0.2 if dip else 0.4, 3: 0.35, 4: 0.32, 6: 0.31, 8: 0.3}
    probe = read_probe(lambda k: losses[min(losses, key=lambda g: abs(g - k))], 8)
    text = report_markdown(recommend_rank(analyses, probe=probe))
    assert ("measured to the lowest loss read" in text) == dip
    # log(1/0.3) / log(1/0.2): the whole update keeps 74.8 % of the reduction to the dip.
    assert ("| 8 " in text and "74.8%" in text) == dip
    assert "100.0%" in text


def test_advice_names_the_run_s_adapter_directory_quoted_for_the_shell():
    analyses = analyze(Snapshot(step=4, factors=random_factors(2, ("q", "v"), rank=8, seed=0)))
    losses = {0: 1.0, 1: 0.5, 2: 0.31, 3: 0.305, 4: 0.302, 6: 0.301, 8: 0.3}
    recommendation = recommend_rank(
        analyses, probe=read_probe(lambda k: losses[min(losses, key=lambda g: abs(g - k))], 8)
    )
    assert recommendation.rank is not None and recommendation.rank < 8
    k = recommendation.rank
    named = advice(recommendation, "runs/my adapter")
    assert f"`lora-monitor truncate 'runs/my adapter' --rank {k} -o 'runs/my adapter_r{k}'`" in named
    assert "ADAPTER_DIR" not in named
    placeholder = advice(recommendation)
    assert f"`lora-monitor truncate ADAPTER_DIR --rank {k} -o OUT_DIR`" in placeholder
    assert "model.save_pretrained" in placeholder  # says what ADAPTER_DIR stands for
    assert f"What to do: {named}" in report_markdown(recommendation, "runs/my adapter")
