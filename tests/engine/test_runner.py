"""lora_monitor.engine.runner (and .background): ``asynchronous=True``, snapshots analyzed and drawn
in a worker thread while training goes on.

On a CPU the worker runs the same code as on a GPU, without the side stream: these tests compare
an asynchronous run with the same run done synchronously, number by number, and check that the
never-kill rules (and ``strict``) hold across the thread.
"""

from __future__ import annotations

import threading

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lora_monitor.engine.monitor
import lora_monitor.engine.runner
import lora_monitor.outputs.rendering
from lora_monitor import AnalysisWarning, LoRAMonitorError, LoRASubspaceMonitor
from lora_monitor.engine.background import Background
from lora_monitor.outputs.tags import RECOMMENDATION_TAG, heatmap_tag, scalar_tag
from tests.helpers.events import assert_same_scalars, monitor_scalars, read_events
from tests.helpers.lightning import CausalLMModule, make_trainer
from tests.helpers.models import tiny_llama_lora


def monitored_run(root, accelerator: str = "cpu", max_steps: int = 6, callbacks=(), **monitor_kwargs):
    """One tiny Llama fit with a monitor every 2 steps against the first snapshot."""
    monitor = LoRASubspaceMonitor(every_n_steps=2, reference="first", **monitor_kwargs)
    trainer = make_trainer(root, [*callbacks, monitor], max_steps=max_steps, accelerator=accelerator)
    trainer.fit(CausalLMModule(tiny_llama_lora(rank=4, num_layers=4, randomize_B=False)))
    return monitor, trainer


def logged(trainer) -> tuple[dict[str, dict[int, float]], list[int], list[int]]:
    """``(monitor scalars tag → step → value, image steps, recommendation steps)``."""
    events = read_events(trainer.logger.log_dir)
    tags = events.Tags()
    scalars = monitor_scalars(events)
    images = [image.step for image in events.Images(heatmap_tag(0))] if heatmap_tag(0) in tags["images"] else []
    texts = [t.step for t in events.Tensors(f"{RECOMMENDATION_TAG}/text_summary")]
    return scalars, images, texts


@pytest.fixture
def analysis_threads(monkeypatch) -> list[str]:
    """The names of the threads ``analyze`` runs in, in order."""
    threads = []
    real = lora_monitor.engine.runner.analyze

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_monitor.engine.runner, "analyze", recording)
    return threads


def test_asynchronous_run_logs_what_the_synchronous_run_logs(tmp_path, analysis_threads):
    synchronous, sync_trainer = monitored_run(tmp_path / "sync", asynchronous=False)
    assert analysis_threads == ["MainThread"] * 3
    analysis_threads.clear()
    asynchronous, async_trainer = monitored_run(tmp_path / "async", asynchronous=True)
    assert len(analysis_threads) == 3
    assert all(name.startswith("lora_monitor") for name in analysis_threads)
    assert asynchronous.engine.runner.background is None  # the worker was shut down at teardown

    expected_scalars, expected_images, expected_texts = logged(sync_trainer)
    scalars, images, texts = logged(async_trainer)
    assert scalar_tag("phi_top", (3, "v")) in expected_scalars
    assert_same_scalars(scalars, expected_scalars, rel=1e-6, abs=1e-6)
    assert images == expected_images == [4, 6]
    assert texts == expected_texts == [6]
    # Final after fit: the last snapshot's analysis and the recommendation drawn from it.
    assert asynchronous.latest_analysis.keys() == synchronous.latest_analysis.keys()
    for key, analysis in synchronous.latest_analysis.items():
        torch.testing.assert_close(asynchronous.latest_analysis[key].phi, analysis.phi, rtol=1e-6, atol=1e-6)
    assert asynchronous.recommendation.rank == synchronous.recommendation.rank
    assert asynchronous.state_dict()["last_step"] == synchronous.state_dict()["last_step"] == 6


class ReleaseAt(Callback):
    def __init__(self, step: int, event: threading.Event) -> None:
        self.step, self.event = step, event

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.event.set()


def test_training_goes_on_while_a_snapshot_is_analysed(tmp_path, monkeypatch):
    released = threading.Event()
    real = lora_monitor.engine.runner.analyze

    def waiting_for_step_3(snapshot, *args, **kwargs):
        # Done in the training step, this would wait for a step that never comes.
        if snapshot.step == 2 and not released.wait(timeout=30):
            raise TimeoutError("training did not reach step 3 while step 2 was analyzed")
        return real(snapshot, *args, **kwargs)

    monkeypatch.setattr(lora_monitor.engine.runner, "analyze", waiting_for_step_3)
    monitor, trainer = monitored_run(tmp_path, callbacks=[ReleaseAt(3, released)], asynchronous=True, strict=True)
    scalars, images, _ = logged(trainer)
    assert sorted(scalars[scalar_tag("delta_w_norm", (0, "q"))]) == [2, 4, 6]
    assert images == [4, 6]


def test_an_error_in_the_worker_is_raised_by_fit_with_strict(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cusolver failed")

    monkeypatch.setattr(lora_monitor.engine.runner, "analyze", broken)
    with pytest.raises(LoRAMonitorError, match=r"step 2: the analysis failed with RuntimeError: cusolver failed"):
        monitored_run(tmp_path, asynchronous=True, strict=True)


def test_an_error_in_the_worker_is_a_warning_and_training_completes(tmp_path, broken_figures):
    with pytest.warns(AnalysisWarning, match=r"step 4: drawing the figures failed with RuntimeError"):
        monitor, trainer = monitored_run(tmp_path, asynchronous=True)
    assert trainer.global_step == 6
    scalars, images, _ = logged(trainer)
    assert images == []
    assert sorted(scalars[scalar_tag("phi_top", (0, "q"))]) == [4, 6]


def test_default_on_cpu_is_synchronous(tmp_path, monkeypatch, analysis_threads):
    def no_worker(*args, **kwargs):
        raise AssertionError("a CPU run with the default settings started a worker")

    monkeypatch.setattr(lora_monitor.engine.runner, "Background", no_worker)
    monitored_run(tmp_path, max_steps=4)
    assert analysis_threads == ["MainThread"] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_analysis_runs_on_the_side_stream(tmp_path, monkeypatch):
    workers: list[Background] = []
    streams: list[torch.cuda.Stream] = []
    real = lora_monitor.engine.runner.analyze

    class RecordedBackground(Background):
        def __init__(self, device: torch.device) -> None:
            super().__init__(device)
            workers.append(self)

    def recording(*args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return real(*args, **kwargs)

    synchronous, sync_trainer = monitored_run(tmp_path / "sync", accelerator="gpu", asynchronous=False)
    monkeypatch.setattr(lora_monitor.engine.runner, "Background", RecordedBackground)
    monkeypatch.setattr(lora_monitor.engine.runner, "analyze", recording)
    asynchronous, async_trainer = monitored_run(tmp_path / "async", accelerator="gpu")  # default: on, on CUDA

    assert len(workers) == 1 and workers[0].stream is not None
    assert streams == [workers[0].stream] * 3
    assert streams[0] != torch.cuda.default_stream()
    expected_scalars, expected_images, _ = logged(sync_trainer)
    scalars, images, _ = logged(async_trainer)
    assert_same_scalars(scalars, expected_scalars, rel=1e-5, abs=1e-5)
    assert images == expected_images
