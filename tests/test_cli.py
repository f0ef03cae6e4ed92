"""``lora-monitor`` on adapters written by peft's ``save_pretrained``; numbers against dense maths."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_monitor.cli import main
from tests.helpers.dense import dense_basis, dense_phi, dense_updates
from tests.helpers.models import tiny_bert_lora, tiny_llama_lora


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, tuple]:
    """Saved rank-4 and rank-8 adapters of one tiny Llama (two seeds), with their models."""
    root = tmp_path_factory.mktemp("adapters")
    saved = {}
    for name, rank, seed in [("r4", 4, 0), ("r8", 8, 1)]:
        model = tiny_llama_lora(rank=rank, seed=seed, alpha=2 * rank)
        model.save_pretrained(str(root / name))
        saved[name] = (model, root / name)
    return saved


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_compare_prints_phi_and_recommendation_and_draws_png(adapters, tmp_path, capsys):
    (small, small_dir), (large, large_dir) = adapters["r4"], adapters["r8"]
    figure = tmp_path / "figures" / "r4_vs_r8.png"
    status, out, err = _run(["compare", str(small_dir), str(large_dir), "-o", str(figure)], capsys)
    assert status == 0, err

    # The mean φ(1, 1) printed is the dense one: SVD of each lora_A, φ by a loop over (i, j).
    reference, current = dense_updates(small), dense_updates(large)
    phis = {k: dense_phi(dense_basis(*reference[k], "A"), dense_basis(*current[k], "A")) for k in current}
    mean_top = sum(float(p[0, 0]) for p in phis.values()) / len(phis)
    printed = float(re.search(r"mean φ\(1, 1\) = ([0-9.]+)", out).group(1))
    assert printed == pytest.approx(mean_top, abs=1e-3)
    assert "random subspaces of ℝ^32: 0.0312" in out  # chance 1/n, n = k = 32
    assert re.search(r"(suggested LoRA rank \d+|no LoRA rank is supported)", out)
    # The Markdown table of every module, shared directions checked against the dense grid.
    for (layer, projection), phi in phis.items():
        row = next(line for line in out.splitlines() if line.startswith(f"| layer_{layer:02d}.{projection} "))
        assert "4 → 8" in row
        assert f"{float(phi[0, 0]):.3f} / 0.0312" in row
    assert f"figure: {figure}" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Progress goes to stderr, never into the report.
    assert "4/4 figure written" in err and "/4 " not in out


def test_compare_writes_svg_with_the_papers_title(adapters, tmp_path, capsys):
    figure = tmp_path / "seeds.svg"
    status, out, _ = _run(
        ["compare", str(adapters["r4"][1]), str(adapters["r8"][1]), "-o", str(figure), "--basis", "delta_w_left", "-q"],
        capsys,
    )
    assert status == 0
    text = figure.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert "basis delta_w_left" in out


def test_inspect_table_matches_dense_spectra(adapters, capsys):
    model, directory = adapters["r8"]
    status, out, _ = _run(["inspect", str(directory)], capsys)
    assert status == 0
    for (layer, projection), (delta, _, _) in dense_updates(model).items():
        sigma = torch.linalg.svdvals(delta)
        row = next(line for line in out.splitlines() if line.startswith(f"| layer_{layer:02d}.{projection} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) == 8
        assert float(cells[2]) == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-3)
        assert float(cells[3]) == pytest.approx(float(sigma[0]), rel=1e-3)
        energy = sigma.square().cumsum(0)
        assert int(cells[5]) == int((energy < 0.9 * energy[-1]).sum()) + 1
        p = sigma / sigma.sum()
        assert float(cells[6]) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), abs=0.01)
        assert float(cells[7]) == pytest.approx(float(energy[-1] / sigma[0] ** 2), abs=0.01)
    assert "spectrum only" in out


@pytest.mark.parametrize(
    "case",
    ["missing", "foreign", "not_lora", "bad_extension", "other_base_model"],
)
def test_bad_inputs_exit_2_with_one_line(adapters, tmp_path, capsys, case):
    directory = adapters["r4"][1]
    if case == "missing":
        argv = ["inspect", str(tmp_path / "nowhere")]
        expected = "adapter directory not found"
    elif case == "foreign":  # a full model directory, not an adapter
        foreign = tmp_path / "model"
        foreign.mkdir()
        (foreign / "config.json").write_text("{}")
        argv = ["compare", str(foreign), str(directory)]
        expected = "not a peft adapter directory"
    elif case == "not_lora":
        other = tmp_path / "ia3"
        shutil.copytree(directory, other)
        config = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
        argv = ["inspect", str(other)]
        expected = "not 'LORA'"
    elif case == "bad_extension":
        argv = ["compare", str(directory), str(directory), "-o", str(tmp_path / "phi.jpg")]
        expected = "must be one of .png, .svg"
    else:
        bert = tiny_bert_lora(rank=4, hidden_size=48, target_modules=("query", "value"))
        bert.save_pretrained(str(tmp_path / "bert"))
        argv = ["compare", str(directory), str(tmp_path / "bert"), "--projections", "q"]
        expected = "another base model"
    status, out, err = _run(argv, capsys)
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-monitor: error: ")
    assert expected in lines[0]
    assert "Traceback" not in err


def test_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "compare" in out and "inspect" in out and "save_pretrained" in out


def test_console_script_exits_2_in_a_subprocess():
    """The installed ``lora-monitor`` script (``python -m lora_monitor`` where not installed):
    the process's own exit status and stderr, not a traceback. One run: importing torch and
    Lightning in a fresh process is the slow part; the output itself is checked in-process."""
    script = shutil.which("lora-monitor", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "lora_monitor"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([*command, "inspect", "/nonexistent/adapter"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("lora-monitor: error: adapter directory not found")
    assert done.stdout == ""
