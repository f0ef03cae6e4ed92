"""``lora-monitor inspect`` against ``gradience audit`` on a 7B-shaped saved adapter, whole process.

Both tools read the same adapter directory in peft's format (``adapter_config.json`` and
``adapter_model.safetensors``: 32 layers × (q_proj, v_proj), d = k = 4096, r = 64, float32),
built once under ``--cache-dir``. Each run is a fresh process, so what is measured is what a
user waits for: interpreter start, imports, reading, analysis, printing. The two tools alternate
(A B, B A, ...) after one warm-up round, and the script prints medians of wall time and of each
child's peak resident set (``ru_maxrss`` from ``os.wait4``), then ``lora-monitor --help``. A
child's ``ru_maxrss`` starts from its parent's resident set at the fork, so this script never
imports torch itself (the adapter is written by a spawned process) and prints its own.

gradience (PyPI) is installed in a virtual environment of its own under ``--cache-dir``, never
as a dependency of lora_monitor: the torch of this interpreter's version first (a dry run checks
that no CUDA packages would come with it), then gradience. ``--no-gradience`` measures
lora-monitor alone.

Targets (exit status 1 when one is missed): lora-monitor at least 1.4× faster than gradience,
no more peak memory, and ``--help`` well under a second (≤ 0.5 s).

    python benchmarks/cli.py                    # 5 runs of each, after a warm-up round
    python benchmarks/cli.py --repeats 3 --gradience-venv /tmp/gradience-venv
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Targets  # noqa: E402

#: At least this much faster than gradience, whole process (issue 10).
SPEEDUP_TARGET = 1.4
#: ``lora-monitor --help``, whole process.
HELP_TARGET_S = 0.5


def build_adapter(directory: Path, layers: int, dim: int, rank: int, seed: int = 0) -> Path:
    """A random q/v LoRA adapter as peft's ``save_pretrained`` writes it; kept if already there."""
    weights = directory / "adapter_model.safetensors"
    if weights.is_file() and (directory / "adapter_config.json").is_file():
        return directory
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for projection in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, dim, generator=generator) / dim**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(dim, rank, generator=generator) * 0.01
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic-llama-7b-shape",  # no such model: neither tool loads it
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    partial = directory / "adapter_model.safetensors.partial"
    save_file(tensors, str(partial))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    partial.rename(weights)
    return directory


def _pip(command: list[str]) -> None:
    """Run a pip command, its output shown only when it fails (pip warns about every index)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def gradience_venv(venv: Path) -> Path:
    """The ``gradience`` script of a virtual environment holding it, made if missing."""
    script = venv / "bin" / "gradience"
    if script.is_file():
        return script
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_pin = f"torch=={importlib.metadata.version('torch').split('+')[0]}"
    # A dry run first: a torch wheel for CUDA would bring gigabytes of nvidia-* packages.
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        _pip([*pip, "--dry-run", "--report", report.name, torch_pin, "gradience"])
        names = [item["metadata"]["name"].lower() for item in json.loads(Path(report.name).read_text())["install"]]
    cuda = [name for name in names if name.startswith("nvidia") or name == "triton"]
    if cuda:
        raise SystemExit(
            f"benchmarks/cli.py: installing gradience into {venv} would bring CUDA packages {cuda}; "
            f"install a CPU build of torch there first ({venv}/bin/pip install torch --index-url "
            f"<your CPU wheel index>), then run again"
        )
    print(f"installing gradience into {venv} ...", flush=True)
    _pip([*pip, torch_pin])
    _pip([*pip, "gradience"])
    return script


def run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of ``command`` as one child process; fails loudly
    when the command does."""
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            output.seek(0)
            raise SystemExit(f"{' '.join(command)} exited {child.returncode}:\n{output.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each tool after the warm-up round")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_monitor-benchmarks",
        help="where the adapter and gradience's environment are kept between runs",
    )
    parser.add_argument("--gradience-venv", type=Path, default=None, help="default: CACHE_DIR/gradience-venv")
    parser.add_argument("--no-gradience", action="store_true", help="measure lora-monitor alone")
    args = parser.parse_args()

    adapter = args.cache_dir / f"adapter-{args.layers}x2-d{args.dim}-r{args.rank}"
    builder = multiprocessing.get_context("spawn").Process(
        target=build_adapter, args=(adapter, args.layers, args.dim, args.rank)
    )
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        return 1
    size = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    script = shutil.which("lora-monitor", path=str(Path(sys.executable).parent))
    lora_monitor = [script] if script else [sys.executable, "-m", "lora_monitor"]
    commands = {"lora-monitor inspect": [*lora_monitor, "inspect", str(adapter)]}
    if not args.no_gradience:
        gradience = gradience_venv(args.gradience_venv or args.cache_dir / "gradience-venv")
        commands["gradience audit"] = [str(gradience), "audit", "--peft-dir", str(adapter)]
    commands["lora-monitor --help"] = [*lora_monitor, "--help"]

    print(
        f"adapter: {args.layers} layers × (q_proj, v_proj), d = k = {args.dim}, r = {args.rank}, float32, "
        f"{size:.0f} MiB ({adapter}); {args.repeats} runs each after a warm-up round, order alternating; "
        f"this script's own peak RSS (the floor of every child's): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    walls: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for repeat in range(args.repeats + 1):
        for name in names if repeat % 2 == 0 else names[::-1]:
            wall, peak = run(commands[name])
            if repeat:  # the first round fills the page cache with the file and the libraries
                walls[name].append(wall)
                peaks[name].append(peak)
    wall = {name: statistics.median(values) for name, values in walls.items()}
    peak = {name: statistics.median(values) for name, values in peaks.items()}
    print("\n| command | wall time, median (all runs) | fastest run | peak RSS, median |")
    print("| --- | --- | --- | --- |")
    for name in commands:
        runs = ", ".join(f"{w:.2f}" for w in walls[name])
        print(f"| `{name}` | {wall[name]:.2f} s ({runs}) | {min(walls[name]):.2f} s | {peak[name]:.0f} MiB |")

    targets = Targets()
    if not args.no_gradience:
        ours, theirs = "lora-monitor inspect", "gradience audit"
        print(
            f"\nlora-monitor inspect is {wall[theirs] / wall[ours]:.2f}× faster than gradience audit "
            f"and uses {peak[ours] / peak[theirs]:.2f}× its peak memory; fastest runs: "
            f"{min(walls[theirs]) / min(walls[ours]):.2f}× (the least disturbed by other load); round by "
            f"round: {', '.join(f'{t / o:.2f}×' for o, t in zip(walls[ours], walls[theirs]))}"
        )
        targets.check("lora-monitor time / gradience time", wall[ours] / wall[theirs], 1 / SPEEDUP_TARGET)
        targets.check("lora-monitor peak RSS / gradience peak RSS", peak[ours] / peak[theirs], 1.0)
    targets.check("lora-monitor --help", wall["lora-monitor --help"], HELP_TARGET_S, " s")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
