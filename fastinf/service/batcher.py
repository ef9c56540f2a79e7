"""Micro-batching: requests that arrive within a few milliseconds share one engine call.

    batcher = MicroBatcher(handle, max_batch=16, window_s=0.005, max_queue=64)
    future = batcher.submit(item)      # QueueFull when `max_queue` items already wait
    result = future.result()           # or the item's own exception

One worker takes the oldest waiting item, keeps collecting until `window_s` has
passed since it arrived or `max_batch` items are together, and hands the batch to
`handle(items) -> list[result | BaseException]`, one entry per item. A handler that raises
fails every item of its batch with that error; the worker itself never dies. Items whose
future was cancelled while waiting (their request timed out) are dropped unscored.

The worker is a thread of its own, or, with `thread=False`, whichever thread calls `run()`
(`fastinf serve` scores on the main thread: torch ran the same engine calls 1.4-1.7× slower
from another thread on a 2-core CPU, `bench/results/engine_threads.md`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchStats", "MicroBatcher", "QueueFull"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The bounded queue is full: the caller should answer 503 and ask to retry later."""


@dataclass
class _Pending:
    item: Any
    future: Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one batch cost: its size, and how long each item waited before it started."""

    size: int
    waited_s: list[float]
    run_s: float


class MicroBatcher:
    """A bounded queue in front of one worker thread that runs `handle` on batches.

    Args:
        handle: called with a list of items; returns one result (or exception) per item.
        max_batch: the most items handed over at once.
        window_s: how long the first item of a batch waits for others to join it.
        max_queue: the most items waiting; `submit` raises `QueueFull` beyond it.
        on_batch: called with `BatchStats` after each batch (metrics).
        thread: start a worker thread; False: the owner calls `run()` on a thread of its own
            choosing (it returns once `close()` is called).
    """

    def __init__(
        self,
        handle: Callable[[list], list],
        *,
        max_batch: int = 16,
        window_s: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[BatchStats], None] | None = None,
        thread: bool = True,
    ):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(
                f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1 and "
                f"window_s ({window_s}) >= 0."
            )
        self.handle, self.max_batch, self.window_s = handle, max_batch, window_s
        self.on_batch = on_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_queue)
        self._closed = threading.Event()
        self._running = threading.Event()  # set while a worker loop runs (or is about to)
        self._stopped = threading.Event()  # set once the worker loop has returned
        self._worker: threading.Thread | None = None
        if thread:
            self._running.set()
            self._worker = threading.Thread(target=self.run, name="fastinf-batcher", daemon=True)
            self._worker.start()

    @property
    def owns_thread(self) -> bool:
        """Whether the batcher scores on a worker thread of its own (else `run()` does)."""
        return self._worker is not None

    @property
    def alive(self) -> bool:
        """Whether batches are taken (for health checks): the worker loop runs, or, without
        a thread of its own, its owner has not closed it yet (it is about to run it)."""
        if self._stopped.is_set():
            return False
        return self._running.is_set() or (self._worker is None and not self._closed.is_set())

    @property
    def depth(self) -> int:
        """Items waiting now (not counting the batch being scored)."""
        return self._queue.qsize()

    def submit(self, item) -> Future:
        """Queue `item`; its future gets the handler's result for it."""
        if self._closed.is_set():
            raise RuntimeError("the batcher is closed.")
        pending = _Pending(item, Future())
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting.") from None
        return pending.future

    def close(self, timeout: float | None = None) -> None:
        """Stop after the batch in progress (waiting for it: a thread left inside torch
        at interpreter exit aborts the process); waiting items are cancelled."""
        self._closed.set()
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.future.cancel()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wakes the worker if it is idle
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)
        elif self._running.is_set():
            self._stopped.wait(timeout)

    def _collect(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        deadline = first.queued_at + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                pending = self._queue.get(timeout=remaining) if remaining > 0 else None
                if pending is None and remaining <= 0:
                    pending = self._queue.get_nowait()  # already waiting: take it anyway
            except queue.Empty:
                break
            if pending is None:
                break
            batch.append(pending)
        return batch

    def run(self) -> None:
        """The worker loop: score batches until `close()`. Runs on the worker thread, or
        on the caller's thread when the batcher was made with `thread=False`."""
        if self._worker is None:
            if self._running.is_set():
                raise RuntimeError("the batcher's loop is already running.")
            self._running.set()
        try:
            self._loop()
        finally:
            self._stopped.set()

    def _loop(self) -> None:
        while not self._closed.is_set():
            first = self._queue.get()
            if first is None:
                continue
            batch = [p for p in self._collect(first) if p.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = self.handle([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"the batch handler returned {len(results)} results for {len(batch)} items."
                    )
            except BaseException as error:  # the worker must outlive any batch
                log.exception("a batch of %d failed", len(batch))
                results = [error] * len(batch)
            finished = time.perf_counter()
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
            if self.on_batch is not None:
                waited = [started - p.queued_at for p in batch]
                self.on_batch(BatchStats(len(batch), waited, finished - started))
