"""Offline cluster snapshots: multi-document YAML or a `List` as `kubectl get ... -o yaml` prints.

This is the budget's file adapter (it reads a file and uses PyYAML's safe loader); the translation
itself is :mod:`budget.objects`, shared with the live cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from budget.errors import BudgetError, SnapshotError
from budget.objects import ANNOTATION_CAPTURED_AT, flatten, parse_time, view_from_objects
from budget.view import ClusterView


@dataclass(frozen=True)
class Snapshot:
    """A view plus the moment it was captured (from the List's `captured-at` annotation), if given."""

    view: ClusterView
    captured_at: float | None
    objects: tuple[dict[str, Any], ...]


def _captured_at(documents: list[Any]) -> float | None:
    for doc in documents:
        if isinstance(doc, dict):
            annotations = (doc.get("metadata") or {}).get("annotations") or {}
            if isinstance(annotations, dict) and ANNOTATION_CAPTURED_AT in annotations:
                return parse_time(annotations[ANNOTATION_CAPTURED_AT], field=ANNOTATION_CAPTURED_AT)
    return None


def parse_snapshot(text: str, *, source: str = "<snapshot>") -> Snapshot:
    """Parse snapshot text; every error names the source."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SnapshotError(f"{source}: not valid YAML{where}: {problem}") from exc
    if not documents:
        raise SnapshotError(f"{source}: no Kubernetes objects in the file")
    try:
        objects = flatten(documents)
        view = view_from_objects(objects)
        captured = _captured_at(documents)
    except BudgetError as exc:
        raise SnapshotError(f"{source}: {exc}") from exc
    if not view.nodes:
        raise SnapshotError(f"{source}: no Node objects: the budget needs at least one node")
    return Snapshot(view=view, captured_at=captured, objects=tuple(dict(o) for o in objects))


def load_snapshot(path: str | Path) -> Snapshot:
    """Read and parse a snapshot file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SnapshotError(f"{p}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{p}: cannot read: {exc}") from exc
    return parse_snapshot(text, source=str(p))
