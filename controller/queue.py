"""A work queue of object keys with delays: each key once in the queue, never processed twice at once.

Why this module exists: the controller reacts to watch events and must also wake up exactly when a
model's cooldown ends, without polling every model every second. Like client-go's delaying work queue:
``add(key, delay)`` keeps the earliest due time per key, a key being processed is not handed to a
second worker (it is handed out again after ``done`` if it was added meanwhile), and per-key
exponential backoff serves retries after transient errors.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class WorkQueue:
    """Keys due at a time; ``get`` blocks until one is due. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}  # pending keys and their earliest due time
        self._processing: set[str] = set()
        self._again: set[str] = set()  # due while being processed: hand out again after done()
        self._seq = itertools.count()
        self._shutdown = False
        self._failures: dict[str, int] = {}

    def add(self, key: str, delay_seconds: float = 0.0) -> None:
        """Queue `key` after `delay_seconds`; an earlier pending due time wins."""
        with self._cond:
            if self._shutdown:
                return
            due = self._clock() + max(0.0, delay_seconds)
            current = self._due.get(key)
            if current is not None and current <= due:
                return
            self._due[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            self._cond.notify()

    def add_rate_limited(self, key: str, base_seconds: float = 1.0, max_seconds: float = 300.0) -> float:
        """Retry `key` after an exponential backoff (1s, 2s, 4s ... max); returns the delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = float(min(max_seconds, base_seconds * 2**failures))
        self.add(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Reset the backoff of `key` (after a successful reconcile)."""
        with self._cond:
            self._failures.pop(key, None)

    def get(self, timeout: float | None = None) -> str | None:
        """The next due key (marked processing), or None on timeout or shutdown."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._shutdown:
                now = self._clock()
                while self._heap and self._heap[0][0] <= now:
                    due, _, key = heapq.heappop(self._heap)
                    if self._due.get(key) != due:
                        continue  # superseded by an earlier add
                    del self._due[key]
                    if key in self._processing:
                        self._again.add(key)
                        continue
                    self._processing.add(key)
                    return key
                wait = None if not self._heap else self._heap[0][0] - now
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
            return None

    def done(self, key: str) -> None:
        """Mark `key` processed; if it became due meanwhile, it is queued again at once."""
        with self._cond:
            self._processing.discard(key)
            again = key in self._again
            self._again.discard(key)
        if again:
            self.add(key)

    def due_in(self, key: str) -> float | None:
        """Seconds until `key` is due, or None when it is not queued (for tests and /debug)."""
        with self._cond:
            due = self._due.get(key)
            return None if due is None else due - self._clock()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)
