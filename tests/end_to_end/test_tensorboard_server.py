"""The real screen: a real ``tensorboard`` server on 127.0.0.1 serves what the monitor wrote.

Tags, values and one heatmap are fetched through TensorBoard's HTTP API, as its web page does.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lora_monitor import LoRASubspaceMonitor
from lora_monitor.outputs.plots import CARD_WIDTH
from lora_monitor.outputs.tags import OVERVIEW_TAG, SCALAR_NAMES, heatmap_tag, scalar_tag
from tests.helpers.events import read_events
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora

HOST = "127.0.0.1"
RUN = "run/version_0"
READY_TIMEOUT_S = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def get(base: str, path: str, **query: str) -> bytes:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def get_json(base: str, path: str, **query: str):
    return json.loads(get(base, path, **query))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    assert chunk_type == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tensorboard")
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first")
    logger = TensorBoardLogger(str(root), name="run", version=0)
    make_trainer(root, [monitor], max_steps=4, logger=logger).fit(CausalLMModule(tiny_llama_lora(rank=4)))
    return root


@pytest.fixture(scope="module")
def server(logdir: Path) -> Iterator[str]:
    """The base URL of a tensorboard server on ``logdir``, once it lists the monitor's image."""
    port = free_port()
    command = [
        sys.executable, "-m", "tensorboard.main",
        "--logdir", str(logdir), "--host", HOST, "--port", str(port),
        "--load_fast", "false",  # the pure-Python reader: no data-server binary
    ]  # fmt: skip
    stderr = logdir / "tensorboard.stderr"
    with open(stderr, "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"tensorboard exited with {process.returncode}: {stderr.read_text()[-2000:]}")
            try:
                if heatmap_tag(1) in get_json(base, "/data/plugin/images/tags").get(RUN, {}):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard not ready in {READY_TIMEOUT_S} s: {stderr.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_server_lists_the_monitor_tags(server):
    scalar_tags = get_json(server, "/data/plugin/scalars/tags")[RUN]
    keys = [(layer, projection) for layer in range(2) for projection in ("q", "v")]
    assert {scalar_tag(name, key) for name in SCALAR_NAMES for key in keys} <= set(scalar_tags)
    assert sorted(get_json(server, "/data/plugin/images/tags")[RUN]) == sorted(
        [OVERVIEW_TAG, heatmap_tag(0), heatmap_tag(1)]
    )


def test_server_serves_the_scalar_values(server, logdir):
    tag = scalar_tag("phi_top", (1, "v"))
    served = get_json(server, "/data/plugin/scalars/scalars", run=RUN, tag=tag)
    written = read_events(logdir / RUN).Scalars(tag)
    assert [step for _, step, _ in served] == [e.step for e in written] == [4]
    assert [value for _, _, value in served] == pytest.approx([e.value for e in written])


def test_server_serves_the_heatmap_as_png(server, logdir):
    (listed,) = get_json(server, "/data/plugin/images/images", run=RUN, tag=heatmap_tag(1))
    assert listed["step"] == 4  # step 2 is the reference
    data = get(server, f"/data/plugin/images/individualImage?{listed['query']}")
    (written,) = read_events(logdir / RUN).Images(heatmap_tag(1))
    assert png_size(data) == (written.width, written.height)
    # Layer 1's (ΔW_q, ΔW_v) at equal ranks, sized for the card: 4.5 × 2.55 in at 100 dpi.
    assert (written.width, written.height) == (CARD_WIDTH, 255)
    assert data == written.encoded_image_string
