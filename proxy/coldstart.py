"""Holding requests while a model starts: bounded per-model waiting rooms and one scale-up call at a time.

Invariant 3 of the architecture: no request is lost in a scale from zero. A request for a model with
no ready backend takes a place in its model's waiting room (or is told `queue_full` at once), the first
of them asks the scaler for replicas while the others wait on that one call, and every place is given
back when its request is served, times out, or its client goes away.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.client_io import immediate_poll
from proxy.metrics import ProxyMetrics
from proxy.scaler import ScaleDenied, Scaler, ScalerUnavailable

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's waiting room is full; the client should retry later."""


# What one held request costs the proxy besides its body: under gevent a greenlet's stack and frames,
# the WSGI environ, the socket and its kernel buffers (measured: see docs/proxy.md, "Concurrency").
HELD_OVERHEAD_BYTES = 64 * 1024


@dataclass
class _Flight:
    """One scale-up call in progress; followers wait on `done` and share its outcome."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Charge:
    """Bytes a held request costs against the held-memory cap; `release()` gives them back (idempotent)."""

    def __init__(self, rooms: ColdStarts, cost_bytes: int) -> None:
        self._rooms = rooms
        self.cost_bytes = cost_bytes
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._give_back()

    def _give_back(self) -> None:
        self._rooms._uncharge(self.cost_bytes)


class Ticket(Charge):
    """A place in a model's waiting room (its bytes included); `release()` gives it back."""

    def __init__(self, rooms: ColdStarts, key: str, label: str, cost_bytes: int = 0) -> None:
        super().__init__(rooms, cost_bytes)
        self.key = key
        self.label = label

    def _give_back(self) -> None:
        self._rooms._leave(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class ColdStarts:
    """Waiting rooms (one per model) and single-flight scale-ups for one proxy worker."""

    def __init__(
        self,
        scaler: Scaler,
        *,
        queue_size: int,
        total_limit: int | None = None,
        bytes_limit: int | None = None,
        metrics: ProxyMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scaler = scaler
        self.queue_size = queue_size
        self.total_limit = total_limit
        self.bytes_limit = bytes_limit
        self._total = 0
        self._total_bytes = 0
        self.metrics = metrics
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}
        self._episode_started: dict[str, float] = {}  # model key -> when its first held request came
        self._flights: dict[str, _Flight] = {}
        self._scaled: set[str] = set()  # models whose scale-up succeeded during the current episode

    # ----- waiting rooms -----
    def enter(self, key: str, label: str, body_bytes: int = 0) -> Ticket:
        """A place in `key`'s waiting room; QueueFull when `queue_size` requests already wait there, or
        when all held requests together would exceed `total_limit` or `bytes_limit` (body + overhead)."""
        cost = body_bytes + HELD_OVERHEAD_BYTES
        with self._lock:
            waiting = self._waiting.get(key, 0)
            if waiting >= self.queue_size:
                raise QueueFull(f"{waiting} requests already wait for {label} to start (the limit per model)")
            if self.total_limit is not None and self._total >= self.total_limit:
                raise QueueFull(f"{self._total} requests already wait for models to start (the limit of this worker)")
            if self.bytes_limit is not None and self._total_bytes + cost > self.bytes_limit:
                raise QueueFull(
                    f"{self._total} held requests already use {self._total_bytes >> 20} MiB "
                    f"(the memory limit of this worker is {self.bytes_limit >> 20} MiB)"
                )
            self._waiting[key] = waiting + 1
            self._total += 1
            self._total_bytes += cost
            self._episode_started.setdefault(key, self._monotonic())
        if self.metrics is not None:
            self.metrics.queue_depth.labels(label).inc()
        return Ticket(self, key, label, cost)

    def charge(self, body_bytes: int) -> Charge:
        """Count a request waiting in line for memory against `bytes_limit`, as a request held for a start
        is (one cap for everything held); QueueFull beyond it. Its model's room is entered (and charged
        anew) only when its turn comes: release the charge just before."""
        cost = body_bytes + HELD_OVERHEAD_BYTES
        with self._lock:
            if self.bytes_limit is not None and self._total_bytes + cost > self.bytes_limit:
                raise QueueFull(
                    f"held requests already use {self._total_bytes >> 20} MiB "
                    f"(the memory limit of this worker is {self.bytes_limit >> 20} MiB)"
                )
            self._total_bytes += cost
        return Charge(self, cost)

    def _uncharge(self, cost_bytes: int) -> None:
        with self._lock:
            self._total_bytes -= cost_bytes

    def held_bytes(self) -> int:
        """What every held request (waiting for a start or in line) costs now, bodies and overhead."""
        with self._lock:
            return self._total_bytes

    def _leave(self, ticket: Ticket) -> None:
        with self._lock:
            self._total -= 1
            self._total_bytes -= ticket.cost_bytes
            left = self._waiting.get(ticket.key, 0) - 1
            if left > 0:
                self._waiting[ticket.key] = left
            else:
                self._waiting.pop(ticket.key, None)
                self._episode_started.pop(ticket.key, None)
                self._scaled.discard(ticket.key)
        if self.metrics is not None:
            self.metrics.queue_depth.labels(ticket.label).dec()

    def waiting(self) -> Mapping[str, int]:
        """Requests held per model key right now."""
        with self._lock:
            return dict(self._waiting)

    def started(self, key: str, label: str) -> None:
        """A waiter saw the model's first ready backend: record the cold start once per episode."""
        with self._lock:
            began = self._episode_started.pop(key, None)
            self._scaled.discard(key)
        if began is not None and self.metrics is not None:
            self.metrics.cold_start.labels(label).observe(self._monotonic() - began)

    # ----- single-flight scale-up -----
    def scale_up(self, key: str, replicas: int, timeout_seconds: float) -> None:
        """Ask the scaler once per cold start for all callers; raises ScaleDenied / ScalerUnavailable for each.

        Callers that arrive while the call is in flight wait for its outcome; callers that arrive after it
        succeeded, while requests still wait for the model, join without a new call. A new episode (after
        every waiter left or the model became ready) calls again.
        """
        with self._lock:
            if key in self._scaled:
                return
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if leader:
            try:
                self.scaler.scale_up(key, replicas)
                with self._lock:
                    if self._waiting.get(key):
                        self._scaled.add(key)
            except (ScaleDenied, ScalerUnavailable) as exc:
                flight.error = exc
            except Exception as exc:  # a scaler bug must not leave followers waiting forever
                log.exception("scale_up(%s, %d) failed", key, replicas)
                flight.error = ScalerUnavailable(f"scale-up of {key} failed: {exc}")
            finally:
                with self._lock:
                    self._flights.pop(key, None)
                flight.done.set()
        elif not flight.done.wait(timeout_seconds):
            raise ScalerUnavailable(f"the scale-up of {key} did not finish within {timeout_seconds:.0f}s")
        if flight.error is not None:
            raise flight.error


def client_gone(environ: Mapping[str, Any]) -> bool:
    """True when the client closed its connection (readable with nothing to read); never blocks.

    Reads the server's socket from the WSGI environ (gunicorn and werkzeug both expose it) and peeks
    on a duplicate of its descriptor, so TLS sockets work too and no byte is consumed.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        poller = immediate_poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLHUP):
            return True
        with socket.socket(fileno=os.dup(fd)) as dup:  # closing the duplicate leaves the server's socket open
            data = dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return data == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True
