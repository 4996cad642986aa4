"""Kubernetes Events (events.k8s.io/v1) as values: what the controller and the proxy write.

Pure builders only; who writes them and how often is the writer's business (the controller
deduplicates into series, the proxy writes one Event per eviction).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

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
    reporting_controller: str,
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
        "reportingController": reporting_controller,
        "reportingInstance": instance[:128],
        "action": action,
        "reason": reason,
        "note": truncate_note(note),
        "type": event_type,
        "regarding": ref,
    }
