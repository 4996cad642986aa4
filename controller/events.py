"""Kubernetes Events (events.k8s.io/v1) about InferenceModels, deduplicated so they never spam.

Why this module exists: ``kubectl describe inferencemodel`` and ``kubectl events`` are where operators
look first: scale-ups, scale-downs, denials, pods the scheduler cannot place, templates that cannot
become a Deployment. The same event repeated (a pod Pending for an hour, a resync re-finding a bad
template) becomes one Event whose ``series.count`` grows, written at most once a minute, as
client-go's event broadcaster does. Failing to record an Event is logged, never raised.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.errors import ControllerError
from controller.kube import Kube
from kubeview.api import EVENTS, ApiError
from kubeview.events import EventType, micro_time, regarding_ref
from kubeview.events import event_body as kube_event_body

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "inference.eh-ops.io/controller"


def event_body(
    regarding: Mapping[str, Any],
    *,
    event_type: EventType,
    reason: str,
    action: str,
    note: str,
    instance: str,
    now: float,
    name: str,
) -> dict[str, Any]:
    """A new events.k8s.io/v1 Event from the controller (pure)."""
    return kube_event_body(
        regarding,
        reporting_controller=REPORTING_CONTROLLER,
        event_type=event_type,
        reason=reason,
        action=action,
        note=note,
        instance=instance,
        now=now,
        name=name,
    )


@dataclass
class _Seen:
    name: str
    namespace: str
    first: float
    last_written: float
    count: int
    written_count: int


class EventRecorder:
    """Creates an Event the first time, then bumps its series instead of creating duplicates."""

    def __init__(
        self,
        kube: Kube,
        instance: str,
        *,
        clock: Callable[[], float] = time.time,
        window_seconds: float = 600.0,
        series_every_seconds: float = 60.0,
    ) -> None:
        self.kube = kube
        self.instance = instance
        self.clock = clock
        self.window_seconds = window_seconds
        self.series_every_seconds = series_every_seconds
        self._seen: dict[tuple[str, str, str], _Seen] = {}
        self._lock = threading.Lock()
        self.written = 0  # Events created or series updates sent (for tests and metrics)

    def emit(self, regarding: Mapping[str, Any], event_type: EventType, reason: str, action: str, note: str) -> bool:
        """Record an Event; returns True when something was written to the API."""
        now = self.clock()
        uid = str((regarding.get("metadata") or {}).get("uid") or "")
        key = (uid, reason, note)
        with self._lock:
            self._prune(now)
            seen = self._seen.get(key)
            if seen is not None:
                seen.count += 1
                if now - seen.last_written < self.series_every_seconds:
                    return False
                seen.last_written = now
                patch = {"series": {"count": seen.count, "lastObservedTime": micro_time(now)}}
                target = EVENTS.path(seen.namespace, seen.name)
            else:
                ref = regarding_ref(regarding)
                name = f"{ref.get('name', 'object')}.{secrets.token_hex(8)}"
                body = event_body(
                    regarding,
                    event_type=event_type,
                    reason=reason,
                    action=action,
                    note=note,
                    instance=self.instance,
                    now=now,
                    name=name,
                )
                seen = _Seen(name, body["metadata"]["namespace"], now, now, 1, 1)
                self._seen[key] = seen
                patch = None
        try:
            if patch is None:
                self.kube.create(EVENTS.path(seen.namespace), body)
                log.info("event %s %s: %s", reason, (regarding.get("metadata") or {}).get("name"), note)
            else:
                self.kube.merge_patch(target, patch)
            self.written += 1
            return True
        except (ControllerError, ApiError) as exc:
            log.warning("could not record event %s (%s): %s", reason, note, exc)
            return False

    def forget(self, uid: str) -> None:
        """Drop the memory of a deleted object's Events."""
        with self._lock:
            for key in [k for k in self._seen if k[0] == uid]:
                del self._seen[key]

    def _prune(self, now: float) -> None:
        for key in [k for k, s in self._seen.items() if now - s.first > self.window_seconds]:
            del self._seen[key]
