"""``lora-monitor``'s start-up (what each command imports) and its streamed reading of adapters.

The imports are checked in fresh processes, where ``sys.modules`` tells what a command really
loaded; the streamed analysis is checked against :func:`analyze` of the whole adapter at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_monitor import cli, functional
from lora_monitor.adapters import load_adapter
from lora_monitor.analysis import Snapshot, analyze
from tests.helpers.models import tiny_gpt2_lora, tiny_llama_lora

ROOT = Path(__file__).resolve().parents[1]
#: Frameworks that no command on a saved adapter needs.
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "peft")


def _loaded_after(code: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter
    (a ``SystemExit``, as ``--help`` raises, is caught so that they can still be printed)."""
    script = (
        "import json, sys\n"
        f"try:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_parser_offers_every_basis_of_the_one_table():
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command")
    basis = next(a for a in commands.choices["compare"]._actions if a.dest == "basis")
    assert list(basis.choices) == list(functional.BASES)
    assert all(info.description in basis.help for info in functional.BASES.values())


def test_help_and_package_import_load_no_torch():
    for code in (
        "import lora_monitor",
        "from lora_monitor.cli import main; main(['--help'])",
        "from lora_monitor.cli import main; main(['inspect', '--help'])",
        "from lora_monitor.cli import main; main(['compare', '--basis', 'nope', 'a', 'b'])",  # usage error
    ):
        loaded = _loaded_after(code)
        heavy = loaded & {"torch", "numpy", "safetensors", "matplotlib", *FRAMEWORKS}
        assert not heavy, f"{code!r} imported {sorted(heavy)}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("startup")
    models = {
        # Three shape groups (q, k/v, o/gate), two ranks for compare.
        "r4": tiny_llama_lora(rank=4, seed=0, target_modules=("q_proj", "k_proj", "v_proj", "gate_proj"), num_layers=3),
        "r8": tiny_llama_lora(rank=8, seed=1, target_modules=("q_proj", "k_proj", "v_proj", "gate_proj"), num_layers=3),
        "dora": tiny_llama_lora(rank=4, seed=2, use_dora=True),
        "gpt2": tiny_gpt2_lora(rank=4, seed=3),  # fused c_attn: one saved module, three keys
    }
    for name, model in models.items():
        model.save_pretrained(str(root / name))
    models["r4"].save_pretrained(str(root / "bin"), safe_serialization=False)
    return {name: root / name for name in [*models, "bin"]}


def test_inspect_and_compare_load_no_framework(saved, tmp_path):
    """A saved adapter is all there is: no Lightning, transformers nor peft, and matplotlib only
    when a figure is drawn."""
    inspect = f"from lora_monitor.cli import main; main(['inspect', {str(saved['r8'])!r}])"
    loaded = _loaded_after(inspect)
    assert "torch" in loaded  # the command really ran its analysis
    assert not loaded & {*FRAMEWORKS, "matplotlib"}, sorted(loaded & {*FRAMEWORKS, "matplotlib"})
    compare = f"from lora_monitor.cli import main; main(['compare', {str(saved['r4'])!r}, {str(saved['r8'])!r}, '--no-figure', '-q'])"
    loaded = _loaded_after(compare)
    assert not loaded & {*FRAMEWORKS, "matplotlib"}, sorted(loaded & {*FRAMEWORKS, "matplotlib"})
    figure = tmp_path / "phi.png"
    drawn = f"from lora_monitor.cli import main; main(['compare', {str(saved['r4'])!r}, {str(saved['r8'])!r}, '-o', {str(figure)!r}, '-q'])"
    loaded = _loaded_after(drawn)
    assert "matplotlib" in loaded and figure.is_file()
    assert not loaded & set(FRAMEWORKS), sorted(loaded & set(FRAMEWORKS))


def test_open_reads_the_header_only(saved):
    opened = cli.SavedFactors.open(saved["r8"])
    whole = load_adapter(saved["r8"]).factors
    assert list(opened.factors) == list(whole)
    for key, f in opened.factors.items():
        assert f.lora_A.is_meta and f.lora_B.is_meta
        assert (f.lora_A.shape, f.lora_B.shape, f.lora_A.dtype) == (whole[key].lora_A.shape, whole[key].lora_B.shape, whole[key].lora_A.dtype)
        assert f.scaling == whole[key].scaling
    part = list(whole)[1:3]
    read = opened.read(part)
    assert list(read) == part
    for key in part:
        assert torch.equal(read[key].lora_A, whole[key].lora_A) and torch.equal(read[key].lora_B, whole[key].lora_B)


def _assert_same(streamed: dict, whole: dict) -> None:
    assert sorted(streamed) == sorted(whole)
    for key, expected in whole.items():
        got = streamed[key]
        for name in ("singular_values", "basis_singular_values", "phi", "reference_basis_singular_values"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None) == (b is None), (key, name)
            if a is not None:  # to rounding: a matmul's kernel may depend on the batch size
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
        assert (got.dimension, got.problems, got.notes, got.delta_w_known) == (
            expected.dimension,
            expected.problems,
            expected.notes,
            expected.delta_w_known,
        )
        assert got.scalars == pytest.approx(expected.scalars, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, cli.CHUNK_BYTES])
@pytest.mark.parametrize("name", ["r8", "dora", "gpt2", "bin"])
def test_streamed_inspect_equals_whole_file_analysis(saved, name, chunk_bytes):
    current = cli.SavedFactors.open(saved[name])
    parts = cli._parts([current.factors], chunk_bytes)
    if chunk_bytes == 1:  # one module a part: the adapter is really read in pieces
        assert len(parts) == len(current.factors)
    assert sorted(k for p in parts for k in p) == sorted(current.factors)
    streamed = cli.analyze_saved(current, chunk_bytes=chunk_bytes)
    whole = analyze(Snapshot(step=0, factors=load_adapter(saved[name]).factors))
    _assert_same(streamed, whole)


@pytest.mark.parametrize("basis", ["A", "delta_w_left"])
def test_streamed_compare_equals_whole_file_analysis(saved, basis):
    current, reference = cli.SavedFactors.open(saved["r8"]), cli.SavedFactors.open(saved["r4"])
    streamed = cli.analyze_saved(current, reference, basis, chunk_bytes=3000)
    whole = analyze(
        Snapshot(step=0, factors=load_adapter(saved["r8"]).factors), load_adapter(saved["r4"]).factors, basis
    )
    assert all(a.phi is not None for a in whole.values())
    _assert_same(streamed, whole)


def test_threads_option_is_checked_and_restored(saved, capsys):
    before = torch.get_num_threads()
    assert cli.main(["inspect", str(saved["r8"]), "--threads", "1"]) == 0
    assert torch.get_num_threads() == before  # main() inside a longer process leaves it as it was
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", str(saved["r8"]), "--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
