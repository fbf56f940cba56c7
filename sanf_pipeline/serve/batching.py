"""Micro-batching of concurrent requests: every request puts its items (prepared images) in one queue; a single worker
thread takes up to ``max_batch`` of them, waiting at most ``window_ms`` after the oldest waiting item for more to
arrive, runs the scoring function once per batch and hands each request its own results, in its own order.

One worker, so the model is only ever called from one thread (no locks around it, no two batches fighting for the
cores or the GPU). A request's items are queued together under the lock, so a request of N items is split into
batches of ``max_batch`` deterministically when nothing else is waiting. ``submit`` returns a
``concurrent.futures.Future``: an event loop awaits it with ``asyncio.wrap_future`` without holding a thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from ..errors import SanfError

RECENT_BATCHES = 1000  # batch sizes kept for inspection (Batcher.batch_sizes); the metrics keep the full histogram


class BatcherClosed(SanfError):
    """The batcher stopped before a request's items were scored."""


@dataclass
class _Request:
    future: Future
    results: list
    left: int
    running: bool = False  # the future was moved to running (it can no longer be cancelled)


@dataclass
class _Item:
    request: _Request
    index: int
    value: object = field(repr=False)
    queued: float = field(default_factory=time.monotonic, repr=False)


class Batcher:
    """``fn(list of items) -> list of results`` (one per item, same order) run on batches of queued items; see the
    module docstring. ``on_batch(size)`` is called after each batch (metrics). ``start=False`` leaves the worker
    stopped until :meth:`start` (tests queue several requests first, then watch how they are batched)."""

    def __init__(self, fn: Callable[[list], Sequence], *, max_batch: int = 16, window_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, start: bool = True):
        if int(max_batch) < 1:
            raise SanfError(f"the batch size must be at least 1, got {max_batch}")
        if not window_ms >= 0:
            raise SanfError(f"the batch window must be 0 ms or more, got {window_ms}")
        self.fn, self.max_batch, self.window_s, self.on_batch = fn, int(max_batch), float(window_ms) / 1000.0, on_batch
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=RECENT_BATCHES)
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # ----------------------------------------------------------------------------------------- requests
    def submit(self, items: Sequence) -> Future:
        """Queue ``items``; the future's result is the list of their results (an exception of ``fn`` on a batch
        holding any of them is the future's exception)."""
        future: Future = Future()
        items = list(items)
        if not items:
            future.set_result([])
            return future
        request = _Request(future, [None] * len(items), len(items))
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down; send the request again to another instance")
            self._queue.extend(_Item(request, i, v) for i, v in enumerate(items))
            self._cond.notify()
        return future

    def run(self, items: Sequence, timeout: float | None = None) -> list:
        """``submit(items)`` and wait for the results."""
        return self.submit(items).result(timeout)

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken by the worker."""
        with self._cond:
            return len(self._queue)

    # ----------------------------------------------------------------------------------------- the worker
    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._work, name="sanf-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking items: the batch being scored finishes, items still queued fail with :class:`BatcherClosed`."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        failed = set()
        for item in left:
            if id(item.request) not in failed:
                failed.add(id(item.request))
                _fail(item.request, BatcherClosed("the server stopped before these images were scored"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _take(self) -> list[_Item] | None:
        """The next batch: blocks until an item waits, then until ``max_batch`` wait or the oldest has waited
        ``window_ms``; None once closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # the window runs from when the oldest item began to wait: one queued while a batch was being scored
            # has waited already, so the worker does not make it wait a whole window more
            deadline = self._queue[0].queued + self.window_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = [it for it in batch if _live(it.request)]
            if not live:
                continue
            try:
                results = list(self.fn([it.value for it in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"the scorer returned {len(results)} results for {len(live)} images")
            except Exception as exc:  # the worker outlives a failed batch: only its requests fail
                for it in live:
                    _fail(it.request, exc)
                continue
            self.batch_sizes.append(len(live))
            if self.on_batch is not None:
                self.on_batch(len(live))
            for it, res in zip(live, results, strict=True):
                it.request.results[it.index] = res
                it.request.left -= 1
                if it.request.left == 0:
                    try:
                        it.request.future.set_result(it.request.results)
                    except InvalidStateError:  # failed meanwhile (close())
                        pass


def _live(request: _Request) -> bool:
    """Whether a request's items are still wanted: not failed, not cancelled (a client that went away); the first
    time, its future is marked running so that it can no longer be cancelled under the worker."""
    if not request.running:
        request.running = True
        if not request.future.set_running_or_notify_cancel():
            return False
    return not request.future.done()


def _fail(request: _Request, exc: BaseException) -> None:
    try:
        request.future.set_exception(exc)
    except InvalidStateError:  # already failed or done
        pass


__all__ = ["Batcher", "BatcherClosed"]
