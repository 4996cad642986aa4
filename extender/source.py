"""Where the extender's knowledge comes from, and the one write it makes (a pod's Binding).

The view (nodes, models, bound model pods) comes from a :class:`kubeview.ClusterCache`: the live
list+watch cache in a cluster (`extender.kube.cluster_source`), or the same cache fed once from a snapshot file
(`--cluster-state`, for trying the extender without a cluster). Writes go through an
:class:`ApiWriter` so tests can swap in a fake and the decision code never sees the kubernetes client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from budget import ClusterView, Node
from budget.snapshot import load_snapshot
from kubeview.cache import ClusterCache

log = logging.getLogger(__name__)

Listener = Callable[[str, str, dict[str, Any]], None]
SNAPSHOT_KINDS = ("InferenceModel", "Deployment", "ResourceSlice", "Node", "Pod")  # models first: pods fall back


class BindingError(Exception):
    """Posting the Binding failed; the message says why (the scheduler shows it and retries)."""


class ApiWriter(Protocol):
    """The API calls the extender makes: read a pod it has not seen, and bind a pod."""

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def bind(
        self,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        timeout_seconds: float,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Bind the pod to `node`, setting `annotations` on it in the same write (or not at all)."""


class NoApi:
    """The writer of a snapshot-fed extender: nothing to read, binding is impossible."""

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def bind(
        self,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        timeout_seconds: float,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        raise BindingError("this extender runs from a snapshot file (--cluster-state) and cannot bind pods")


class CacheSource:
    """A ClusterCache plus an ApiWriter: everything the extender reads and writes."""

    def __init__(self, cache: ClusterCache, writer: ApiWriter | None = None, *, always_synced: bool = False) -> None:
        self.cache = cache
        self.writer: ApiWriter = writer or NoApi()
        self._always_synced = always_synced

    @property
    def synced(self) -> bool:
        return self._always_synced or self.cache.synced

    def view(self) -> ClusterView:
        return self.cache.view()

    def node(self, name: str) -> Node | None:
        """The node as the watch last translated it, ResourceSlices applied (for the Nodes form's Node objects)."""
        return self.cache.view().node_index.get(name)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A model pod as the watch last saw it (only pods with the model label are watched)."""
        return self.cache.get("Pod", namespace, name)

    def add_listener(self, listener: Listener) -> None:
        self.cache.add_listener(listener)

    def stop(self) -> None:
        self.cache.stop()

    @classmethod
    def from_objects(cls, objects: list[dict[str, Any]]) -> CacheSource:
        """A source fed once from plain objects (tests, snapshot files); synced from the start."""
        cache = ClusterCache(None, kinds=SNAPSHOT_KINDS)  # type: ignore[arg-type]  # never started
        for kind in SNAPSHOT_KINDS:
            for obj in objects:
                if obj.get("kind") == kind:
                    cache.apply(kind, "ADDED", dict(obj))
        return cls(cache, NoApi(), always_synced=True)

    @classmethod
    def from_snapshot(cls, path: str) -> CacheSource:
        """Read a `--cluster-state` file (raises budget.SnapshotError with a clear message)."""
        snapshot = load_snapshot(path)
        return cls.from_objects([dict(o) for o in snapshot.objects])
