"""Micro-batching in front of one model: a bounded admission count, one worker thread, futures.

Request handlers ``admit`` images (refused at once with :class:`QueueFull` when the bound is reached,
so memory cannot grow without limit under a flood), then ``submit`` them and await the futures. One
worker thread owns the model: it takes the first waiting item, waits up to ``wait_s`` for more to
arrive, and hands up to ``max_batch`` items to ``score_batch`` in a single call. Items whose future was
cancelled meanwhile (their request timed out) are skipped, not scored.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """No room for more images; the caller should answer 503 and ask the client to retry."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no more work."""


@dataclass
class BatcherStats:
    """Counters since start (read without a lock: approximate while work is running)."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    rejected: int = 0
    skipped_cancelled: int = 0
    failed: int = 0
    busy_seconds: float = 0.0  # time spent inside score_batch
    slowest_batch_seconds: float = 0.0


class Admission:
    """Room for ``n`` images reserved in a :class:`MicroBatcher`; give it back with :meth:`release`."""

    def __init__(self, batcher: MicroBatcher, n: int) -> None:
        self._batcher = batcher
        self.n = n

    def grow(self, extra: int) -> None:
        """Reserve ``extra`` more images (e.g. once a batch upload's size is known); QueueFull if no room."""
        if extra > 0:
            self._batcher._reserve(extra)
            self.n += extra

    def release(self) -> None:
        """Give the room back (idempotent)."""
        n, self.n = self.n, 0
        if n:
            self._batcher._unreserve(n)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MicroBatcher(Generic[T, R]):
    """Scores items in batches on one worker thread; ``score_batch(items)`` returns one result per item."""

    def __init__(
        self,
        score_batch: Callable[[list[T]], Sequence[R]],
        max_batch: int = 8,
        wait_s: float = 0.005,
        capacity: int = 32,
        name: str = "spade-batcher",
    ) -> None:
        if max_batch < 1 or capacity < 1 or wait_s < 0:
            raise ValueError("max_batch and capacity must be >= 1 and wait_s >= 0")
        self._score_batch = score_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.capacity = capacity
        self.stats = BatcherStats()
        self._cond = threading.Condition()
        self._pending: deque[tuple[T, Future[R]]] = deque()
        self._reserved = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- admission ------------------------------------------------------------------------------
    def admit(self, n: int = 1) -> Admission:
        """Reserve room for ``n`` images or raise :class:`QueueFull` (never blocks)."""
        self._reserve(n)
        return Admission(self, n)

    def _reserve(self, n: int) -> None:
        with self._cond:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            if self._reserved + n > self.capacity:
                self.stats.rejected += 1
                raise QueueFull(f"queue full ({self._reserved} of {self.capacity} images admitted)")
            self._reserved += n

    def _unreserve(self, n: int) -> None:
        with self._cond:
            self._reserved -= n

    @property
    def admitted(self) -> int:
        """Images currently admitted (reading, waiting or being scored)."""
        return self._reserved

    @property
    def waiting(self) -> int:
        """Images submitted and not yet taken by the worker."""
        return len(self._pending)

    # -- work -----------------------------------------------------------------------------------
    def submit(self, items: Sequence[T]) -> list[Future[R]]:
        """Queue already admitted items for scoring; one future per item, in order."""
        futures: list[Future[R]] = [Future() for _ in items]
        with self._cond:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            self._pending.extend(zip(items, futures, strict=True))
            self._cond.notify()
        return futures

    def _take_batch(self) -> list[tuple[T, Future[R]]] | None:
        """Block for the first item, then gather more for up to ``wait_s``; None once closed and drained."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # set_running_or_notify_cancel: False for futures cancelled while waiting (request timed out).
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            self.stats.skipped_cancelled += len(batch) - len(live)
            if not live:
                continue
            self._score(live)

    def _score(self, live: list[tuple[T, Future[R]]]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._score_batch([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"score_batch returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # noqa: BLE001 - every error must reach the waiting requests
            self.stats.busy_seconds += time.perf_counter() - t0
            if len(live) == 1:
                self.stats.failed += 1
                live[0][1].set_exception(exc)
                return
            # One bad item must not fail the others that happened to share its batch: retry one by one.
            for one in live:
                self._score([one])
            return
        took = time.perf_counter() - t0
        self.stats.busy_seconds += took
        self.stats.slowest_batch_seconds = max(self.stats.slowest_batch_seconds, took)
        self.stats.batches += 1
        self.stats.images += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        for (_, fut), res in zip(live, results, strict=True):
            fut.set_result(res)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking work, finish what is queued, and join the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
