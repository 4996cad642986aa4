"""The reservation book: memory promised to pods between the scheduler's filter call and the watch.

Why it exists: kube-scheduler filters the next pod before the previous one is bound (binding runs
asynchronously), and our watch sees a binding only some milliseconds later. Without a book, N pods
filtered back to back would all be told "fits" on the same free hole. The book holds one
:class:`budget.Reservation` per pod UID; the view used for every decision is the cache's view plus
the book's live entries (`ClusterView.with_reservations`), so `budget.filter_nodes` counts them.

An entry names the node and the device indices the decision chose there, so a pod filtered but not yet
bound holds its share on exactly those devices (`ClusterView.device_used` charges them), and the next
pod is fitted to what is left of each device, not of the node.

Lifecycle of an entry: made (or replaced) when filter answers for the pod; refreshed when bind
re-checks the fit; removed when the watch shows the pod bound (it is then a Placement with the same
UID, which `ClusterView.live_reservations` already ignores), when the pod is deleted or terminates,
when a bind fails, or when its TTL ends. Every check-and-reserve runs under :attr:`lock`, so two
threads can never both take the last hole. The book lives in one process: see docs/extender.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from budget import PodRequest, Reservation
from budget.view import model_key

Clock = Callable[[], float]


class ReservationBook:
    """Thread-safe map pod UID -> Reservation with a TTL; hold :meth:`locked` to check and reserve atomically."""

    def __init__(self, ttl_seconds: float = 30.0, *, clock: Clock = time.time) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds!r}")
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._lock = threading.RLock()
        self._by_uid: dict[str, Reservation] = {}
        self._listeners: list[Callable[[int], None]] = []

    @contextmanager
    def locked(self) -> Iterator[ReservationBook]:
        """Hold the book's lock: decisions made inside see no concurrent reservation change."""
        with self._lock:
            yield self

    def on_change(self, listener: Callable[[int], None]) -> None:
        """Call listener(count) after every change (the reservations gauge)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        count = len(self._by_uid)
        for listener in self._listeners:
            listener(count)

    def reserve(
        self, pod: PodRequest, node: str, *, now: float | None = None, devices: tuple[int, ...] = ()
    ) -> Reservation:
        """Promise `pod.memory_bytes` on `node` for one TTL, split evenly over `devices` (the indices the
        decision chose; () when not known), replacing this pod's previous reservation."""
        if not pod.uid:
            raise ValueError(f"pod {pod.namespace}/{pod.name} has no UID; a reservation is keyed by UID")
        now = self.clock() if now is None else now
        reservation = Reservation(
            uid=pod.uid,
            model=pod.model,
            memory_bytes=pod.memory_bytes,
            expires_at=now + self.ttl_seconds,
            node=node,
            pod=model_key(pod.namespace, pod.name),
            devices=tuple(devices),
        )
        with self._lock:
            self._by_uid[pod.uid] = reservation
            self._changed()
        return reservation

    def get(self, uid: str, *, now: float | None = None) -> Reservation | None:
        """The live reservation of a pod, if any."""
        now = self.clock() if now is None else now
        with self._lock:
            found = self._by_uid.get(uid)
            if found is not None and found.expires_at <= now:
                return None
            return found

    def release(self, uid: str, *, only: Reservation | None = None) -> bool:
        """Drop a pod's reservation; with `only`, drop it only if it is still that exact entry."""
        with self._lock:
            current = self._by_uid.get(uid)
            if current is None or (only is not None and current != only):
                return False
            del self._by_uid[uid]
            self._changed()
            return True

    def confirm(self, uid: str) -> bool:
        """The watch shows the pod bound: its Placement now holds the memory, so the entry goes."""
        return self.release(uid)

    def live(self, now: float | None = None) -> tuple[Reservation, ...]:
        """Unexpired reservations (expired ones are pruned here)."""
        now = self.clock() if now is None else now
        with self._lock:
            expired = [uid for uid, r in self._by_uid.items() if r.expires_at <= now]
            for uid in expired:
                del self._by_uid[uid]
            if expired:
                self._changed()
            return tuple(self._by_uid.values())

    def reserved_bytes(self, now: float | None = None) -> dict[str, int]:
        """Reserved memory per node (for logs and the debug view)."""
        out: dict[str, int] = {}
        for r in self.live(now):
            out[r.node] = out.get(r.node, 0) + r.memory_bytes
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_uid)
