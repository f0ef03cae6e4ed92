"""lora_monitor.integrations.lightning through ``LightningCLI``: the monitor configured from
``examples/lightning_cli.yaml``, and every kind of reference parsed from its type hints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.outputs.tags import heatmap_tag, scalar_tag
from tests.helpers.events import read_events

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIG = EXAMPLES / "lightning_cli.yaml"


def test_monitor_from_the_example_yaml(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["cli_model.py"])  # pytest's own arguments are not for the CLI
    import cli_model

    cli = cli_model.main(
        [
            "fit",
            f"--config={CONFIG}",
            "--trainer.max_steps=4",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )

    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRASubspaceMonitor)]
    (entry,) = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    assert entry["class_path"] == "lora_monitor.LoRASubspaceMonitor"
    expected = entry["init_args"]
    assert monitor.every_n_steps == expected["every_n_steps"]
    assert monitor.reference == expected["reference"]
    assert monitor.target_modules == tuple(expected["target_modules"])
    assert monitor.layers == expected["layers"]
    assert monitor.basis == expected["basis"]
    assert monitor.adapter_name is expected["adapter_name"] is None
    assert (monitor.log_images, monitor.strict) == (expected["log_images"], expected["strict"])

    events = read_events(cli.trainer.logger.log_dir)
    assert Path(cli.trainer.logger.log_dir).is_relative_to(tmp_path)
    assert [image.step for image in events.Images(heatmap_tag(0))] == [4]
    assert {e.step for e in events.Scalars(scalar_tag("phi_top", (1, "v")))} == {4}
    assert {e.step for e in events.Scalars(scalar_tag("delta_w_norm", (0, "q")))} == {2, 4}


@pytest.mark.parametrize(
    "reference",
    ["first", "previous", "adapters/r64_seed0", "/abs/adapter"],
)
def test_hints_parse_every_kind_of_reference(reference):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LoRASubspaceMonitor, "monitor")
    config = parser.parse_args(
        [f"--monitor.reference={reference}", "--monitor.target_modules=[q, o]", "--monitor.layers=[0, 3]"]
    )
    monitor = parser.instantiate(config).monitor
    assert str(monitor.reference) == reference
    assert monitor.target_modules == ("q", "o")
    assert monitor.layers == [0, 3]
