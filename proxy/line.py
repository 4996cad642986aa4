"""Waiting for memory, as a client's choice: one line per pool, by priority, then arrival.

A request that does not fit and cannot make room is answered 429 at once, unless its client asked
to wait (`X-IBC-Max-Wait: <seconds>`, or the model's `max_wait` / `spec.admission.maxWait`). Then it
takes a place in its pool's line and moves up as those ahead leave; only the first place may try to
start its model, and only when the budget says it fits (memory freed by a cooldown, a stop, or an
eviction), so later arrivals never overtake it. A place is given up when its turn comes and the start
was asked for, when its wait runs out (then the 429 as before), or when its client goes away.
Lines live in memory: a process shutting down closes them (`close()`), and every held client gets an
explicit 503 (an SSE error event once its stream began), not a dropped connection.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

MAX_WAIT_HEADER = "X-IBC-Max-Wait"
MAX_WAIT_LIMIT_SECONDS = 3600.0
"""An hour: longer than any cold start; a client wanting more should retry rather than hold a thread."""

Outcome = Literal["turn", "timeout", "gone", "closing"]


class LineFull(Exception):
    """The pool's line (or all lines together) is at its bound; the client should retry later."""


def parse_max_wait(value: str | None, default_seconds: float) -> float:
    """The header's seconds, or the model's default when absent; ValueError with a message if invalid."""
    if value is None or value.strip() == "":
        return default_seconds
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_WAIT_LIMIT_SECONDS:
        raise ValueError(
            f"{MAX_WAIT_HEADER} must be a number of seconds from 0 to {MAX_WAIT_LIMIT_SECONDS:g}, got {value!r}"
        )
    return seconds


@dataclass(eq=False)
class Place:
    """One held request's place; `release()` gives it up (idempotent, thread-safe)."""

    line: WaitLine
    pool: str
    label: str
    priority: int
    serial: int
    released: bool = field(default=False)

    def release(self) -> None:
        self.line._leave(self)

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class WaitLine:
    """Every pool's line for one proxy worker; bounded per pool and in all."""

    def __init__(self, *, per_pool: int, total: int, monotonic: Callable[[], float] = time.monotonic) -> None:
        if per_pool < 1 or total < 1:
            raise ValueError(f"line bounds must be >= 1, got per_pool={per_pool}, total={total}")
        self.per_pool = per_pool
        self.total = total
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._lines: dict[str, list[Place]] = {}
        self._serial = itertools.count(1)
        self._closed = False

    def join(self, pool: str, label: str, priority: int) -> Place:
        """A place at the back of the requests of the same priority; LineFull at the bounds."""
        with self._cond:
            if self._closed:
                raise LineFull("the proxy is shutting down")
            line = self._lines.setdefault(pool, [])
            if len(line) >= self.per_pool:
                raise LineFull(f"{len(line)} requests already wait for memory in pool {pool} (the limit per pool)")
            if sum(len(x) for x in self._lines.values()) >= self.total:
                raise LineFull(f"{self.total} requests already wait for memory (the limit of this worker)")
            place = Place(self, pool, label, priority, next(self._serial))
            line.append(place)
            line.sort(key=lambda p: (-p.priority, p.serial))
            return place

    def close(self) -> None:
        """The process is stopping: every waiter's `turns` ends with "closing" now; no new places."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _leave(self, place: Place) -> None:
        with self._cond:
            if place.released:
                return
            place.released = True
            line = self._lines.get(place.pool, [])
            if place in line:
                line.remove(place)
            if not line:
                self._lines.pop(place.pool, None)
            self._cond.notify_all()

    def position(self, place: Place) -> tuple[int, int]:
        """(1-based position, places in the pool's line); (0, n) once released."""
        with self._cond:
            line = self._lines.get(place.pool, [])
            return (line.index(place) + 1 if place in line else 0), len(line)

    def snapshot(self) -> Mapping[str, list[str]]:
        """Who waits in each pool, in order (model names)."""
        with self._cond:
            return {pool: [p.label for p in line] for pool, line in self._lines.items()}

    def turns(
        self,
        place: Place,
        *,
        room: Callable[[], bool],
        wait_seconds: float,
        check_seconds: float,
        gone: Callable[[], bool],
    ) -> Iterator[tuple[int, int] | Outcome]:
        """Yield (position, length) whenever it changes, then one outcome: "turn" when first with room,
        "timeout" when the wait ran out, "gone" when the client left, "closing" when the line was closed.
        Memory freeing is polled every `check_seconds` (a cooldown stop does not tell the line); places
        leaving, and `close()`, wake it at once."""
        deadline = self._monotonic() + wait_seconds
        last: tuple[int, int] | None = None
        while True:
            if self._closed:
                yield "closing"
                return
            now_position = self.position(place)
            if now_position != last:
                last = now_position
                yield now_position
            if now_position[0] == 1 and room():
                yield "turn"
                return
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                yield "timeout"
                return
            if gone():
                yield "gone"
                return
            with self._cond:
                if self.position(place) == last and not self._closed:
                    self._cond.wait(min(remaining, check_seconds))
