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
from datetime import UTC, datetime
from typing import Any, Literal

from controller.errors import ControllerError
from controller.kube import Kube
from kubeview.api import EVENTS, ApiError

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "inference.eh-ops.io/controller"
NOTE_MAX_BYTES = 1024
EventType = Literal["Normal", "Warning"]


def micro_time(ts: float) -> str:
    """POSIX seconds -> metav1.MicroTime (`2026-01-15T10:30:00.123456Z`)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def regarding_ref(obj: Mapping[str, Any]) -> dict[str, str]:
    """An ObjectReference to `obj` for the Event's `regarding` field."""
    meta = obj.get("metadata") or {}
    ref = {
        "apiVersion": str(obj.get("apiVersion") or ""),
        "kind": str(obj.get("kind") or ""),
        "namespace": str(meta.get("namespace") or ""),
        "name": str(meta.get("name") or ""),
        "uid": str(meta.get("uid") or ""),
    }
    if meta.get("resourceVersion"):
        ref["resourceVersion"] = str(meta["resourceVersion"])
    return {k: v for k, v in ref.items() if v}


def truncate_note(note: str) -> str:
    data = note.encode()
    if len(data) <= NOTE_MAX_BYTES:
        return note
    return data[: NOTE_MAX_BYTES - 3].decode("utf-8", "ignore") + "..."


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
    """A new events.k8s.io/v1 Event (pure)."""
    ref = regarding_ref(regarding)
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ref.get("namespace", "default")},
        "eventTime": micro_time(now),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance[:128],
        "action": action,
        "reason": reason,
        "note": truncate_note(note),
        "type": event_type,
        "regarding": ref,
    }


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
