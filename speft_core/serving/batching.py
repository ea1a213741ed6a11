"""Dynamic batching: requests queue up, one thread takes them in batches and runs them.

A batch starts with the first waiting request and takes whatever else arrives within the wait
window, up to `max_batch_size` rows (a request may count several rows, e.g. several texts).
The runner owns the model: only this thread ever runs a forward, so weight swaps never race.
A batch that raises is re-run request by request, so a request whose own data makes it fail
fails alone and its batch-mates still get their answers (a request that has already streamed
part of its answer gets the batch's error instead: it cannot be re-run). The thread goes on.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .adapter import ServingAdapter
from .execution import Segment

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(eq=False)
class QueuedRequest:
    """One request waiting for a batch: its adapter, its row count and the future it resolves;
    `streamed` once part of its answer has reached its caller."""

    adapter: ServingAdapter | None
    rows: int
    payload: Any
    future: Future = field(default_factory=Future)
    streamed: bool = False


R = TypeVar("R", bound=QueuedRequest)


class DynamicBatcher(Generic[R]):
    """One worker thread turning queued requests into batches for `run_batch`."""

    def __init__(self, run_batch: Callable[[list[R]], None], *, max_batch_size: int,
                 max_wait_s: float, name: str) -> None:
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size must be ≥ 1 and max_wait_s ≥ 0")
        self._run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"speft-batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: R) -> Future:
        """Queue a request; its future resolves when its batch has run."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self._queue.put(request)
        return request.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish queued work, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _loop(self) -> None:
        pending: R | None = None
        while True:
            first = pending if pending is not None else self._queue.get()
            pending = None
            if first is _STOP:
                return
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP or rows + item.rows > self.max_batch_size:
                    pending = item
                    break
                batch.append(item)
                rows += item.rows
            self._run(batch)
            if pending is _STOP:
                return
            first = batch = None  # type: ignore[assignment]  # hold no request while idle

    def _run(self, batch: list[R]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            self._run_batch(live)
        except Exception as err:  # a failed batch fails its requests, never the thread
            unanswered = [r for r in live if not r.future.done()]
            if len(live) == 1 or not unanswered:
                log.exception("speft serving: a batch of %d failed", len(live))
                for request in unanswered:
                    request.future.set_exception(err)
                return
            log.warning("speft serving: a batch of %d failed (%r): re-running its %d "
                        "unanswered requests one by one", len(live), err, len(unanswered))
            for request in unanswered:
                if request.streamed:
                    request.future.set_exception(err)
                    continue
                try:
                    self._run_batch([request])
                except Exception as own:  # this request's own failure
                    log.exception("speft serving: a request failed alone")
                    if not request.future.done():
                        request.future.set_exception(own)


def group_by_adapter(batch: Sequence[R]) -> list[list[R]]:
    """The batch's requests grouped by adapter, in order of first appearance."""
    groups: dict[str | None, list[R]] = {}
    for request in batch:
        key = request.adapter.key if request.adapter is not None else None
        groups.setdefault(key, []).append(request)
    return list(groups.values())


def segments_for(groups: Sequence[Sequence[R]]) -> list[Segment]:
    """Contiguous row ranges, one per group, in group order."""
    segments, start = [], 0
    for group in groups:
        stop = start + sum(r.rows for r in group)
        segments.append(Segment(start, stop, group[0].adapter))
        start = stop
    return segments
