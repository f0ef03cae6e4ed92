"""What a user sees first, read back from a real TensorBoard run of a 32-layer model (issue 11):
a bounded set of summary cards in the groups TensorBoard opens, every per-layer series in its
own group, a custom-scalars layout drawing all of them, the suggested rank at every snapshot."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.outputs.tags import SCALAR_NAMES
from tests.helpers.events import read_events
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora

LAYERS = 32
PROJECTIONS = ("q", "v")
SNAPSHOTS = [2, 4, 6]  # every_n_steps=2 over 6 steps; the first is the reference "first"
#: The two groups TensorBoard opens, and their budget of cards whatever the depth.
SUMMARY_GROUPS = ("LoRA_rank", "LoRA_summary")
MAX_CARDS = 24


def group(tag: str) -> str:
    return tag.split("/", 1)[0]


def custom_scalars_layouts(log_dir: Path) -> list[layout_pb2.Layout]:
    """Every custom-scalars layout in the run's event files, read as TensorBoard's plugin
    reads it: a summary value whose plugin is ``custom_scalars``, a serialized ``Layout``."""
    layouts = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "custom_scalars":
                    layouts.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    return layouts


def test_first_screen_of_a_32_layer_model(tmp_path):
    # B starts at zero (a fresh start), so A₀ is known and a_init_similarity is logged too.
    model = tiny_llama_lora(num_layers=LAYERS, hidden_size=16, rank=4, randomize_B=False)
    monitor = LoRASubspaceMonitor(every_n_steps=2, probe_budget=float("inf"))  # every card at every snapshot
    trainer = make_trainer(tmp_path, [monitor], max_steps=SNAPSHOTS[-1])
    trainer.fit(CausalLMModule(model))
    log_dir = Path(trainer.logger.log_dir)
    events = read_events(log_dir)
    tags = events.Tags()
    scalars = set(tags["scalars"])

    # The summary groups: at most 24 cards with 32 layers as with 2. TensorBoard's default view
    # (Time Series) draws a card per scalar and image tag; the end-of-fit report is in Text.
    summary_cards = {tag for kind in ("scalars", "images") for tag in tags[kind] if group(tag) in SUMMARY_GROUPS}
    assert 0 < len(summary_cards) <= MAX_CARDS, sorted(summary_cards)
    assert not any(re.search(r"layer_\d", tag) for tag in summary_cards)
    assert "LoRA_rank/overview" in tags["images"]
    # Lightning's own groups sort after them, so TensorBoard opens the summary groups first.
    groups = sorted({group(tag) for tag in scalars})
    assert groups[: len(SUMMARY_GROUPS)] == list(SUMMARY_GROUPS), groups

    # Every per-layer series, all 32 layers × q, v × each per-layer metric, in its own group
    # lora_monitor.<metric>, named layer_<L>.<p>.
    per_layer = {tag for tag in scalars if group(tag).startswith("lora_monitor.")}
    expected = {
        f"lora_monitor.{name}/layer_{layer:02d}.{p}"
        for name in SCALAR_NAMES
        for layer in range(LAYERS)
        for p in PROJECTIONS
    }
    assert per_layer == expected
    assert len(expected) == len(SCALAR_NAMES) * LAYERS * len(PROJECTIONS)
    compared = {f"lora_monitor.{name}" for name in ("phi_top", "phi_mean", "shared_directions")}
    for tag in per_layer:
        # What compares with the reference starts at the second snapshot: the first is it.
        expected_steps = SNAPSHOTS[1:] if group(tag) in compared else SNAPSHOTS
        assert [event.step for event in events.Scalars(tag)] == expected_steps, tag
    monitor_scalars = {tag for tag in scalars if group(tag) in SUMMARY_GROUPS} | per_layer
    assert scalars - monitor_scalars == {"epoch", "train_loss"}  # Lightning's own

    # The custom-scalars layout, written once, covers every per-layer series: for each metric
    # and projection one multi-line chart whose lines are the 32 layers.
    (layout,) = custom_scalars_layouts(log_dir)
    charts = [chart for category in layout.category for chart in category.chart]
    assert all(chart.HasField("multiline") for chart in charts)
    lines = defaultdict(set)
    for tag in monitor_scalars:
        matching = [c.title for c in charts if any(re.search(r, tag) for r in c.multiline.tag)]
        assert len(matching) == 1, (tag, matching)
        lines[matching[0]].add(tag)
    per_layer_charts = {title: members for title, members in lines.items() if members <= per_layer}
    assert len(per_layer_charts) == len(SCALAR_NAMES) * len(PROJECTIONS)
    for title, members in per_layer_charts.items():
        (metric,) = {group(tag) for tag in members}
        (projection,) = {tag.rsplit(".", 1)[1] for tag in members}
        assert len(members) == LAYERS, title
        assert metric.split(".", 1)[1] in title and projection in title

    # The suggestion, its range, the probe's and the gaps' readings, the evidence, at every
    # snapshot; the suggestion is the larger of the probe's rank and the largest gap rank.
    suggested = [
        "LoRA_rank/suggested.model",
        "LoRA_rank/suggested.range_low",
        "LoRA_rank/suggested.range_high",
        "LoRA_rank/suggested.probe_rank",
        "LoRA_summary/max_delta_w_gap_rank.q",
        "LoRA_summary/max_delta_w_gap_rank.v",
        "LoRA_rank/weak_evidence",
    ]
    for tag in suggested:
        assert [event.step for event in events.Scalars(tag)] == SNAPSHOTS, tag
    for step in range(len(SNAPSHOTS)):
        value = {tag: events.Scalars(tag)[step].value for tag in suggested}
        gaps = [value[f"LoRA_summary/max_delta_w_gap_rank.{p}"] for p in PROJECTIONS]
        assert value["LoRA_rank/suggested.model"] == max(gaps + [value["LoRA_rank/suggested.probe_rank"]])
        assert 1 <= value["LoRA_rank/suggested.model"] <= 4  # between 1 and the LoRA rank r
        assert value["LoRA_rank/weak_evidence"] in (0.0, 1.0)
    # Beside the suggestion, no same-run φ: in A's basis it reads how little A moved.
    assert not any("shared_directions" in tag or "phi_top" in tag for tag in summary_cards)
