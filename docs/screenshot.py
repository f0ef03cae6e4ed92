"""Redraw the README's TensorBoard screenshots: what a newcomer sees after running the example.

Runs ``examples/train_minilm_topics.py`` (its defaults: rank 8, 200 steps; here with a snapshot
every ``--every-n-steps`` steps so that every chart is a line), serves the run with this venv's
``tensorboard`` on 127.0.0.1, and photographs TensorBoard's default view with headless Chromium
(Debian's ``chromium`` package: ``apt-get install -y chromium``) at 1600×1200:

    .venv/bin/python docs/screenshot.py                                # train into a temporary directory, then shoot
    .venv/bin/python docs/screenshot.py --logdir runs/shot             # train into runs/shot (kept), then shoot
    .venv/bin/python docs/screenshot.py --logdir runs --skip-training  # photograph an existing run

Writes ``docs/tensorboard_default.png`` (the page TensorBoard opens on: Time Series),
``docs/tensorboard_custom_scalars.png`` (the custom-scalars dashboard: per-layer metrics, layers
as lines) and ``docs/tensorboard_images.png`` (the Images tab: overview and φ heatmaps).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: (file in docs/, the page's address after the host): TensorBoard's default view, the
#: custom-scalars dashboard and the Images tab. The default view draws its charts with WebGL in
#: a worker, which headless Chromium (no GPU) sometimes had not finished when it shot, leaving a
#: chart empty at any time budget; TensorBoard's forceSVG flag draws the same charts in the page.
PAGES = (
    ("tensorboard_default.png", "/?forceSVG=true"),
    ("tensorboard_custom_scalars.png", "/#custom_scalars"),
    ("tensorboard_images.png", "/#images"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no headless Chromium found: apt-get update && apt-get install -y chromium")


def train(logdir: Path, every_n_steps: int, max_steps: int) -> None:
    command = [
        sys.executable, str(ROOT / "examples" / "train_minilm_topics.py"),
        "--logdir", str(logdir), "--every-n-steps", str(every_n_steps), "--max-steps", str(max_steps),
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def wait_until_serving(base: str, server: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tensorboard exited with status {server.returncode}")
        try:
            # The run list is filled once TensorBoard has read the event files.
            with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as response:
                if response.read().strip() not in (b"", b"[]"):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"tensorboard did not serve {base} within {timeout_s:.0f} s")


def shoot(browser: str, url: str, target: Path, width: int, height: int, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={target}", url,
        ]
        subprocess.run(command, check=True, timeout=180, capture_output=True)
    if not target.exists():
        raise SystemExit(f"chromium wrote no {target}")
    print(f"wrote {target.relative_to(ROOT)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="TensorBoard root to train into (default: a temporary one)")
    parser.add_argument("--skip-training", action="store_true", help="photograph what --logdir holds")
    parser.add_argument("--every-n-steps", type=int, default=10, help="snapshot period of the example run")
    parser.add_argument("--max-steps", type=int, default=200, help="the example's default")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument(
        "--budget-ms", type=int, default=30000,
        help="Chromium's virtual time to load the page (with 15000 a chart was sometimes left undrawn)",
    )
    args = parser.parse_args()
    browser = chromium()

    with tempfile.TemporaryDirectory(prefix="lora-monitor-screenshot-") as scratch:
        if args.skip_training and args.logdir is None:
            parser.error("--skip-training needs --logdir")
        logdir = args.logdir or Path(scratch) / "runs"
        if not args.skip_training:
            train(logdir, args.every_n_steps, args.max_steps)
        port = free_port()
        base = f"http://{HOST}:{port}"
        tensorboard = Path(sys.executable).with_name("tensorboard")
        server = subprocess.Popen(
            [str(tensorboard), "--logdir", str(logdir), "--host", HOST, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_serving(base, server)
            for name, page in PAGES:
                shoot(browser, base + page, ROOT / "docs" / name, args.width, args.height, args.budget_ms)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
