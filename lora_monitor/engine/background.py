"""Analyzing snapshots off the training step's critical path: one worker thread, in order.

The training thread captures a snapshot (its copies are queued on the training stream, so they
hold exactly that step's factors) and hands the analysis to :class:`Background`; the worker
runs it while training goes on, on a CUDA side stream when the factors are on a GPU, and the
training thread collects the results, in submission order, at its next hook. On a CPU the same
code runs without a stream, which is how the tests exercise it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, Optional, TypeVar

import torch
from torch import Tensor

Result = TypeVar("Result")


class Background(Generic[Result]):
    """A single worker thread, and on CUDA a side stream, for the work of one monitor.

    Args:
        device: where the snapshots' factors live; a CUDA device gets a side stream on it.
    """

    def __init__(self, device: torch.device) -> None:
        # One worker: snapshots are analyzed in the order they were taken, and a reference
        # cached by one analysis is ready for the next.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora_monitor")
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: deque[Future[Result]] = deque()

    def submit(self, work: Callable[[], Result], tensors: Iterable[Tensor]) -> None:
        """Run ``work`` in the worker; ``tensors`` are the device tensors it reads.

        Call from the training thread, after queuing the copies ``work`` analyses.
        """
        if self.stream is not None:
            # The side stream starts after everything queued so far on the training stream:
            # the copies of the snapshot included.
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
            for tensor in tensors:
                if tensor.device == self.stream.device:
                    # Made on the training stream, read on the side stream: the allocator must
                    # not hand their memory back to training before the side stream is done.
                    tensor.record_stream(self.stream)
        self._pending.append(self._executor.submit(self._run, work))

    def _run(self, work: Callable[[], Result]) -> Result:
        if self.stream is None:
            return work()
        with torch.cuda.stream(self.stream):  # per thread: the worker's kernels go to the side stream
            return work()

    def results(self, wait: bool) -> Iterator[Result]:
        """The results in submission order: all of them (``wait``), or those finished before
        the first that is not. An exception raised by a work is raised here, in the caller."""
        while self._pending and (wait or self._pending[0].done()):
            yield self._pending.popleft().result()

    def close(self) -> None:
        """Wait for the work still running and stop the worker; results not collected are lost."""
        self._executor.shutdown(wait=True)
        self._pending.clear()
