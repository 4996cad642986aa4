"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Why this module exists: two controller replicas must never both scale models; a crashed leader must be
replaced within seconds. The holder renews the Lease every ``retry_period_seconds``; another replica
takes it over only after it saw the same record unchanged for ``lease_duration_seconds`` on its own
clock (no trust in other machines' clocks). Writes use the Lease's resourceVersion, so two candidates
racing for an expired Lease cannot both win. A leader that cannot renew for ``renew_deadline_seconds``
(shorter than the lease) steps down before anyone else may take over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.errors import ControllerError
from controller.kube import Kube
from kubeview.api import LEASES, ApiError
from kubeview.events import micro_time

log = logging.getLogger(__name__)


def default_identity() -> str:
    """hostname_pid: unique per process, readable in `kubectl get lease -o yaml`."""
    return f"{socket.gethostname()}_{os.getpid()}"


@dataclass(frozen=True)
class LeaseTimings:
    """client-go's three durations; the defaults follow the brief (renew ~2 s, lease ~10 s)."""

    lease_duration_seconds: float = 10.0
    renew_deadline_seconds: float = 7.0
    retry_period_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError("lease timings must satisfy 0 < retry period < renew deadline < lease duration")


def _record(lease: Mapping[str, Any]) -> tuple[Any, ...]:
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))


class _OutOfTime(Exception):
    """The renew deadline passed before the next API call could start."""


class LeaderElector:
    """Acquire and keep one Lease; ``run`` calls back when leadership starts and stops.

    Time bounds everything: each API call of an attempt gets only the time left before the renew
    deadline as its timeout, and :meth:`may_write` is true only while less than ``renew_deadline_seconds``
    has passed since the start of the last successful renewal, whatever the renew loop is doing. A
    deposed leader whose API calls hang therefore stops writing at the deadline, ``lease - renew``
    seconds before anyone else may take over.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        timings: LeaseTimings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings or LeaseTimings()
        self.clock = clock
        self.wall_clock = wall_clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._leading = threading.Event()
        self._renewed_at: float | None = None  # clock() at the start of the last successful attempt
        self.transitions = 0  # times this process became leader

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    def write_seconds_left(self) -> float:
        """Seconds this replica may still write (0 when it must not): until the renew deadline."""
        renewed = self._renewed_at
        if renewed is None or not self._leading.is_set():
            return 0.0
        return max(0.0, renewed + self.timings.renew_deadline_seconds - self.clock())

    def may_write(self) -> bool:
        """True only while leading and ``clock() - last renewal < renew_deadline_seconds``."""
        return self.write_seconds_left() > 0

    def _spec(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        now = micro_time(self.wall_clock())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timings.lease_duration_seconds)),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _timeout(self, deadline: float) -> float:
        left = deadline - self.clock()
        if left <= 0:
            raise _OutOfTime
        return left

    def try_acquire_or_renew(self) -> bool:
        """One attempt, every call bounded by the renew deadline: True when this process holds the Lease."""
        started = self.clock()
        renewed = self._renewed_at
        leading = self._leading.is_set() and renewed is not None
        deadline = (renewed if leading and renewed is not None else started) + self.timings.renew_deadline_seconds
        path = LEASES.path(self.namespace, self.name)
        try:
            lease = self.kube.get(path, timeout=self._timeout(deadline))
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(0, None),
                }
                created = self.kube.create(LEASES.path(self.namespace), body, timeout=self._timeout(deadline))
                self._observe(created)
                self._renewed_at = started
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            self._observe(lease)
            transitions = int(spec.get("leaseTransitions") or 0)
            if holder == self.identity:
                new_spec = self._spec(transitions, spec.get("acquireTime"))
            else:
                duration = float(spec.get("leaseDurationSeconds") or self.timings.lease_duration_seconds)
                if holder and self.clock() < self._observed_at + duration:
                    return False  # someone else holds a live lease
                new_spec = self._spec(transitions + 1, None)
            body = {**lease, "spec": {**spec, **new_spec}}
            updated = self.kube.replace(path, body, timeout=self._timeout(deadline))
            self._observe(updated)
            self._renewed_at = started
            return True
        except _OutOfTime:
            log.warning("lease %s/%s: renew deadline passed during the attempt", self.namespace, self.name)
            return False
        except ApiError as exc:
            if exc.status != 409:  # 409: another candidate won the race; not worth a warning
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        except ControllerError as exc:
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False

    def _observe(self, lease: Mapping[str, Any]) -> None:
        record = _record(lease)
        if record != self._observed:
            self._observed = record
            self._observed_at = self.clock()

    def release(self) -> None:
        """Give the Lease up on a clean shutdown so a successor need not wait for it to expire."""
        path = LEASES.path(self.namespace, self.name)
        deadline = self.clock() + self.timings.renew_deadline_seconds
        try:
            lease = self.kube.get(path, timeout=self._timeout(deadline))
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            spec = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": micro_time(self.wall_clock())}
            self.kube.replace(path, {**lease, "spec": spec}, timeout=self._timeout(deadline))
            log.info("released lease %s/%s", self.namespace, self.name)
        except (ControllerError, ApiError, _OutOfTime) as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, str(exc) or "out of time")

    def run(self, on_started: Callable[[], None], on_stopped: Callable[[], None], stop: threading.Event) -> None:
        """Campaign, lead, step down at the renew deadline, campaign again; until `stop` is set."""
        t = self.timings
        while not stop.is_set():
            if not self.try_acquire_or_renew():
                stop.wait(t.retry_period_seconds)
                continue
            self._leading.set()
            self.transitions += 1
            log.info("became leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
            on_started()
            while not stop.wait(min(t.retry_period_seconds, self.write_seconds_left())):
                renewed = self.try_acquire_or_renew()
                if self.write_seconds_left() <= 0 or (not renewed and not self._still_mine()):
                    log.warning("lost leadership (could not renew lease %s/%s)", self.namespace, self.name)
                    break
            self._leading.clear()
            self._renewed_at = None
            on_stopped()
            if stop.is_set():
                self.release()

    def _still_mine(self) -> bool:
        """After a failed renewal: False when the observed record shows another holder."""
        return self._observed is None or self._observed[0] == self.identity
