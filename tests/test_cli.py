"""``lora-monitor`` on adapters written by peft's ``save_pretrained``: numbers against dense maths,
errors in one line, what each command imports at start-up (checked in fresh processes, where
``sys.modules`` tells what a command really loaded) and its streamed reading of adapters (checked
against :func:`analyze` of the whole adapter at once)."""

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

from lora_monitor import cli, functional
from lora_monitor.adapters import find_lora_factors, load_adapter
from lora_monitor.analysis import Snapshot, analyze
from lora_monitor.cli import main
from tests.helpers.architectures import FUSED, base_model, peft_model
from tests.helpers.dense import dense_basis, dense_phi, dense_updates
from tests.helpers.models import lora_layers, randomize_lora_B, tiny_bert_lora, tiny_gpt2_lora, tiny_llama_lora

ROOT = Path(__file__).resolve().parents[1]


#: Frameworks that no command on a saved adapter needs.
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "peft")


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
        # The gap rank: the largest k ≤ r/2 with σ_k/σ_k+1 ≥ 1.5 and σ_k² ≥ 1 % of ‖ΔW‖_F², by a
        # loop over the dense spectrum.
        energy = sigma.square().sum()
        gaps = [k for k in range(1, 5) if sigma[k - 1] >= 1.5 * sigma[k] and sigma[k - 1] ** 2 >= 0.01 * energy]
        assert int(cells[2]) == (max(gaps) if gaps else 0)
        assert float(cells[4]) == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-3)
        assert float(cells[5]) == pytest.approx(float(sigma[0]), rel=1e-3)
        energy = sigma.square().cumsum(0)
        assert int(cells[7]) == int((energy < 0.9 * energy[-1]).sum()) + 1
        p = sigma / sigma.sum()
        assert float(cells[8]) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), abs=0.01)
        assert float(cells[9]) == pytest.approx(float(energy[-1] / sigma[0] ** 2), abs=0.01)
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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*command, "inspect", "/nonexistent/adapter"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("lora-monitor: error: adapter directory not found")
    assert done.stdout == ""


@pytest.mark.parametrize(
    "argv, flag, python_argument",
    [
        (["inspect", "{r4}", "--projections", "nope"], "--projections ['nope'] match no LoRA module", "target_modules"),
        (["inspect", "{r4}", "--layers", "7"], "--layers [7] have no LoRA module", "layers=["),
    ],
)
def test_errors_advise_the_command_line_s_flags(adapters, capsys, argv, flag, python_argument):
    status, _, err = _run([a.format(r4=adapters["r4"][1]) for a in argv], capsys)
    assert status == 2
    assert flag in err and python_argument not in err


def test_truncate_writes_an_adapter_peft_loads_at_the_rank_asked(adapters, tmp_path, capsys):
    import json

    from peft import PeftModel

    model, directory = adapters["r8"]
    status, out, err = _run(["truncate", str(directory), "--rank", "3", "-o", str(tmp_path / "r3")], capsys)
    assert status == 0, err
    assert "4 modules (4 at rank 3)" in out
    assert json.loads((tmp_path / "r3" / "adapter_config.json").read_text())["r"] == 3
    import copy

    loaded = PeftModel.from_pretrained(copy.deepcopy(model).unload(), str(tmp_path / "r3"))
    ranks = {m.lora_A["default"].weight.shape[0] for m in loaded.modules() if hasattr(m, "lora_A") and m.lora_A}
    assert ranks == {3}


def test_truncate_to_the_suggestion_cuts_every_module_to_the_model_s_rank(tmp_path):
    from lora_monitor.adapters import LoRAMonitorError
    from lora_monitor.cli import inspect_adapter, truncate_saved

    # Two planted directions far above the rest in every module: a gap at 2 everywhere.
    model = tiny_llama_lora(rank=8, seed=5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight[:, 2:] *= 0.01
    model.save_pretrained(str(tmp_path / "planted"))
    _, recommendation = inspect_adapter(tmp_path / "planted")
    assert recommendation.rank == 2 and all(m.delta_w_gap_rank == 2 for m in recommendation.modules)
    written = truncate_saved(tmp_path / "planted", tmp_path / "cut", "suggested")
    assert set(written.values()) == {2} and len(written) == len(recommendation.modules)
    # An update of noise suggests nothing: nothing to cut to, said plainly.
    noise = tiny_llama_lora(rank=8, seed=0)
    noise.save_pretrained(str(tmp_path / "noise"))
    assert inspect_adapter(tmp_path / "noise")[1].rank is None
    with pytest.raises(LoRAMonitorError, match="no rank is suggested .* give --rank K"):
        truncate_saved(tmp_path / "noise", tmp_path / "cut_noise", "suggested")


def test_inspect_advice_names_the_adapter_and_its_command_runs_as_printed(tmp_path, capsys):
    import copy
    import shlex

    from peft import PeftModel

    # Two planted directions far above the rest in every module: inspect suggests 2 of r = 8.
    model = tiny_llama_lora(rank=8, seed=5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight[:, 2:] *= 0.01
    model.save_pretrained(str(tmp_path / "my run"))
    status, out, err = _run(["inspect", str(tmp_path / "my run")], capsys)
    assert status == 0, err
    (advice,) = [line for line in out.splitlines() if line.startswith("What to do:")]
    (command,) = re.findall(r"`(lora-monitor truncate [^`]+)`", advice)
    argv = shlex.split(command)[1:]
    assert argv[:2] == ["truncate", str(tmp_path / "my run")]  # the real directory, quoted
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    cut = tmp_path / "my run_r2"
    loaded = PeftModel.from_pretrained(copy.deepcopy(model).unload(), str(cut))
    ranks = {m.lora_A["default"].weight.shape[0] for m in loaded.modules() if hasattr(m, "lora_A") and m.lora_A}
    assert ranks == {2}


@pytest.mark.parametrize("rank", ["0", "two"])
def test_truncate_refuses_a_rank_that_is_not_one(adapters, tmp_path, capsys, rank):
    _, directory = adapters["r8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["truncate", str(directory), "--rank", rank, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "rank" in capsys.readouterr().err


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("existing_file", "is a file: give a new directory"),
        ("existing_adapter", "exists: give a new directory, or replace the adapter in it (--overwrite)"),
        ("uncreatable", "Not a directory"),
        ("rank_of_the_adapter", "has rank r = 8: cutting it to 8 would leave every module as it is"),
        ("rank_above_the_adapter", "has rank r = 8: cutting it to 99 would leave every module as it is"),
    ],
)
def test_truncate_refuses_with_one_line_and_writes_nothing(adapters, tmp_path, capsys, case, expected):
    _, directory = adapters["r8"]
    output, rank = tmp_path / "out", "3"
    if case == "existing_file":
        output = tmp_path / "README.md"
        output.write_text("a file of the user's\n")
    elif case == "existing_adapter":
        shutil.copytree(adapters["r4"][1], output)
    elif case == "uncreatable":  # a directory under a file: the file system refuses it
        (tmp_path / "notes.txt").write_text("a file\n")
        output = tmp_path / "notes.txt" / "out"
    else:
        rank = "8" if case == "rank_of_the_adapter" else "99"
    before = {p: _tree(p) for p in (tmp_path, directory)}
    status, out, err = _run(["truncate", str(directory), "--rank", rank, "-o", str(output)], capsys)
    assert (status, out) == (2, "")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-monitor: error: ") and "Traceback" not in err
    assert expected in lines[0]
    assert {p: _tree(p) for p in (tmp_path, directory)} == before  # nothing written, nothing overwritten


def test_truncate_overwrite_replaces_the_adapter_in_an_existing_directory(adapters, tmp_path, capsys):
    _, directory = adapters["r8"]
    shutil.copytree(adapters["r4"][1], tmp_path / "out")
    argv = ["truncate", str(directory), "--rank", "3", "-o", str(tmp_path / "out"), "--overwrite"]
    status, out, err = _run(argv, capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3


def test_cli_base_config_splits_a_saved_per_head_layout(tmp_path, capsys):
    """``lora-monitor inspect/compare --base-config``: a per-head fused module (GPT-NeoX) saved
    without its base model's config is split into the rows the attention uses, as the live
    model is; without it, kept whole."""
    from lora_monitor.cli import main

    arch = FUSED["gpt_neox"]
    base = base_model(arch)
    model = peft_model(arch, base)
    randomize_lora_B(model, seed=4)
    model.save_pretrained(str(tmp_path / "adapter"))
    base.config.to_json_file(str(tmp_path / "config.json"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="config is not known"):
        assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "query_key_value" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "adapter"), "--base-config", str(tmp_path / "config.json")]) == 0
    table = capsys.readouterr().out
    live = find_lora_factors(model)
    for (layer, projection), f in live.items():
        norm = torch.linalg.matrix_norm(f.scaling * f.lora_B.detach() @ f.lora_A.detach()).item()
        row = next(line for line in table.splitlines() if line.startswith(f"| layer_{layer:02d}.{projection} "))
        assert float(row.split("|")[5]) == pytest.approx(norm, rel=1e-3), row  # the ‖ΔW‖_F column
    directory = str(tmp_path / "adapter")
    assert (
        main(
            ["compare", directory, directory, "--basis", "delta_w_left", "--no-figure", "--base-config", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "layer_00.q" in out and "query_key_value" not in out


# ------------------------------------------------------------------------ start-up and streaming


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
    r4, r8 = str(saved["r4"]), str(saved["r8"])
    compare = f"from lora_monitor.cli import main; main(['compare', {r4!r}, {r8!r}, '--no-figure', '-q'])"
    loaded = _loaded_after(compare)
    assert not loaded & {*FRAMEWORKS, "matplotlib"}, sorted(loaded & {*FRAMEWORKS, "matplotlib"})
    figure = tmp_path / "phi.png"
    drawn = f"from lora_monitor.cli import main; main(['compare', {r4!r}, {r8!r}, '-o', {str(figure)!r}, '-q'])"
    loaded = _loaded_after(drawn)
    assert "matplotlib" in loaded and figure.is_file()
    assert not loaded & set(FRAMEWORKS), sorted(loaded & set(FRAMEWORKS))


def test_open_reads_the_header_only(saved):
    opened = cli.SavedFactors.open(saved["r8"])
    whole = load_adapter(saved["r8"]).factors
    assert list(opened.factors) == list(whole)
    for key, f in opened.factors.items():
        assert f.lora_A.is_meta and f.lora_B.is_meta
        assert (f.lora_A.shape, f.lora_B.shape, f.lora_A.dtype) == (
            whole[key].lora_A.shape,
            whole[key].lora_B.shape,
            whole[key].lora_A.dtype,
        )
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
