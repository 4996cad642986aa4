"""Where the extender's knowledge comes from, and the one write it makes (a pod's Binding).

The view (nodes, models, bound model pods) comes from a :class:`kubeview.ClusterCache`: the live
list+watch cache in a cluster, or the same cache fed once from a snapshot file (`--cluster-state`,
for trying the extender without a cluster). Writes go through an :class:`ApiWriter` so tests can
swap in a fake and the decision code never sees the kubernetes client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from budget import ClusterView
from budget.snapshot import load_snapshot
from kubeview.cache import GROUP, PLURAL, VERSION, ClusterCache

log = logging.getLogger(__name__)

Listener = Callable[[str, str, dict[str, Any]], None]
SNAPSHOT_KINDS = ("InferenceModel", "Deployment", "Node", "Pod")  # models first: pods fall back to them


class BindError(Exception):
    """Posting the Binding failed; the message says why (the scheduler shows it and retries)."""


class ApiWriter(Protocol):
    """The API calls the extender makes: read a pod it has not seen, and bind a pod."""

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def bind(self, namespace: str, name: str, uid: str, node: str, timeout_seconds: float) -> None: ...


class NoApi:
    """The writer of a snapshot-fed extender: nothing to read, binding is impossible."""

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def bind(self, namespace: str, name: str, uid: str, node: str, timeout_seconds: float) -> None:
        raise BindError("this extender runs from a snapshot file (--cluster-state) and cannot bind pods")


class KubeApi:
    """The real writer: `pods/binding` (expects 201) and a pod GET, through a kubernetes ApiClient."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            resp = self.api.call_api(
                f"/api/v1/namespaces/{namespace}/pods/{name}",
                "GET",
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=5,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise BindError(f"reading pod {namespace}/{name} failed: {exc.status} {exc.reason}") from exc
        except Exception as exc:
            raise BindError(f"reading pod {namespace}/{name} failed: {exc}") from exc
        resp = resp[0] if isinstance(resp, tuple) else resp
        body: dict[str, Any] = json.loads(resp.data)
        return body

    def bind(self, namespace: str, name: str, uid: str, node: str, timeout_seconds: float) -> None:
        from kubernetes.client.rest import ApiException

        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if uid:
            metadata["uid"] = uid  # precondition: never bind a newer pod that reused the name
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": metadata,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            resp = self.api.call_api(
                f"/api/v1/namespaces/{namespace}/pods/{name}/binding",
                "POST",
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout_seconds,
            )
        except ApiException as exc:
            reason = f"{exc.status} {_status_message(exc)}"
            raise BindError(f"binding {namespace}/{name} to {node} failed: {reason}") from exc
        except Exception as exc:
            raise BindError(f"binding {namespace}/{name} to {node} failed: {exc}") from exc
        resp = resp[0] if isinstance(resp, tuple) else resp
        if resp.status != 201:
            raise BindError(f"binding {namespace}/{name} to {node}: unexpected HTTP {resp.status}")


def _status_message(exc: Any) -> str:
    """The `message` of a Kubernetes Status body, else the HTTP reason."""
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


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

    @classmethod
    def from_cluster(cls, kubeconfig: str | None, *, namespace: str | None = None) -> CacheSource:
        """Start a list+watch cache against the API server (kubeconfig file, or in-cluster when None)."""
        from kubeview.cache import load_api_client

        api = load_api_client(kubeconfig)
        kinds: tuple[str, ...] = ("Node", "Pod")
        if _serves_inferencemodels(api):
            kinds += ("InferenceModel",)
        else:
            log.warning(
                "the API server does not serve %s/%s inferencemodels (CRD not installed?): model pods must "
                "carry their memory annotation",
                GROUP,
                VERSION,
            )
        cache = ClusterCache(api, kinds=kinds, namespace=namespace).start()
        return cls(cache, KubeApi(api))


def _serves_inferencemodels(api: Any) -> bool:
    """Discovery: is the InferenceModel resource served? (Without it the cache would never sync.)"""
    from kubernetes.client.rest import ApiException

    try:
        resp = api.call_api(
            f"/apis/{GROUP}/{VERSION}",
            "GET",
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=10,
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    resp = resp[0] if isinstance(resp, tuple) else resp
    resources = json.loads(resp.data).get("resources") or []
    return any(r.get("name") == PLURAL for r in resources if isinstance(r, dict))
