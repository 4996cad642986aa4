"""Peak observed memory per model, kept in memory and seeded from status so restarts keep it.

Why this module exists: the peak is the number advice is built on, and it must survive a controller
restart or a leader change; it is persisted as ``status.observedPeakMemory`` and read back the first
time a model is seen. ``lastObservation`` is published to status when the peak changes and otherwise at
most every ``publish_every_seconds``, so steady observation does not write status every few seconds.
Pure: times are passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from budget import BudgetError, parse_quantity
from budget.objects import parse_time


@dataclass
class Observation:
    """The peak of one model's replicas and when it was last measured / last published."""

    peak_bytes: int
    last_observed: float
    published: float  # the lastObservation time status shows
    last_hint: float = 0.0
    last_hint_text: str = ""


class ObservationStore:
    """Thread-safe peaks per model key."""

    def __init__(self, publish_every_seconds: float = 300.0) -> None:
        self.publish_every_seconds = publish_every_seconds
        self._obs: dict[str, Observation] = {}
        self._lock = threading.Lock()

    def seed(self, key: str, status: Mapping[str, Any] | None) -> None:
        """Adopt the peak persisted in status, unless this process already measured one."""
        status = status or {}
        raw = status.get("observedPeakMemory")
        if raw is None:
            return
        try:
            peak = parse_quantity(raw, field="status.observedPeakMemory")
            when = parse_time(status.get("lastObservation"), field="status.lastObservation") or 0.0
        except BudgetError:
            return
        with self._lock:
            current = self._obs.get(key)
            if current is None:
                self._obs[key] = Observation(peak, when, when)
            elif peak > current.peak_bytes:
                current.peak_bytes = peak

    def record(self, key: str, used_bytes: int, now: float) -> bool:
        """Note one measurement; True when status should be written (new peak, or publish interval over)."""
        with self._lock:
            obs = self._obs.get(key)
            if obs is None:
                self._obs[key] = Observation(used_bytes, now, now)
                return True
            obs.last_observed = now
            if used_bytes > obs.peak_bytes:
                obs.peak_bytes = used_bytes
                obs.published = now
                return True
            if now - obs.published >= self.publish_every_seconds:
                obs.published = now
                return True
            return False

    def get(self, key: str) -> Observation | None:
        with self._lock:
            obs = self._obs.get(key)
            return None if obs is None else Observation(**vars(obs))

    def should_hint(self, key: str, text: str, now: float, *, every_seconds: float, min_gap_seconds: float) -> bool:
        """Rate-limit log hints: a changed hint after `min_gap_seconds`, the same one after `every_seconds`."""
        with self._lock:
            obs = self._obs.get(key)
            if obs is None:
                return False
            gap = now - obs.last_hint
            due = gap >= every_seconds or (text != obs.last_hint_text and gap >= min_gap_seconds)
            if due:
                obs.last_hint, obs.last_hint_text = now, text
            return due

    def forget(self, key: str) -> None:
        with self._lock:
            self._obs.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._obs)
