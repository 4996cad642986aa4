"""The extender's Kubernetes I/O: raw API calls, the live cache, reading a pod, posting a Binding.

Requests go through :mod:`kubeview.api` (each resource knows its path; one :class:`ApiError` carries the
HTTP status and the Status message).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from extender.source import BindingError, CacheSource
from kubeview.api import INFERENCE_MODELS, PODS, ApiError, load_api_client, raw_request, request_json
from kubeview.cache import ClusterCache

log = logging.getLogger(__name__)


class KubeApi:
    """The real writer: a pod GET and `pods/binding` (201, annotations included), through a kubernetes ApiClient."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body = request_json(self.api, "GET", PODS.path(namespace, name), timeout=5.0)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise BindingError(f"reading pod {namespace}/{name} failed: {exc}") from exc
        return body if isinstance(body, dict) else None

    def bind(
        self,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        timeout_seconds: float,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """POST the pod's Binding; its `annotations` land on the pod in the same write as spec.nodeName."""
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if uid:
            metadata["uid"] = uid  # precondition: never bind a newer pod that reused the name
        if annotations:
            metadata["annotations"] = dict(annotations)
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": metadata,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            path = PODS.path(namespace, name, "binding")
            raw = raw_request(self.api, "POST", path, body=body, timeout=timeout_seconds)
        except ApiError as exc:
            raise BindingError(f"binding {namespace}/{name} to {node} failed: {exc}") from exc
        status = raw.status
        raw.release_conn()
        if status != 201:
            raise BindingError(f"binding {namespace}/{name} to {node}: unexpected HTTP {status}")


def serves_inferencemodels(api: Any) -> bool:
    """Discovery: is the InferenceModel resource served? (Without it the cache would never sync.)"""
    try:
        body = request_json(api, "GET", f"/apis/{INFERENCE_MODELS.api_version}", timeout=10.0)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    resources = body.get("resources") or [] if isinstance(body, dict) else []
    return any(r.get("name") == INFERENCE_MODELS.plural for r in resources if isinstance(r, dict))


def live_cache(api: Any, *, namespace: str | None = None) -> ClusterCache:
    """Nodes and model pods, plus InferenceModels when the CRD is installed (memory fallback, selectors)."""
    kinds: tuple[str, ...] = ("Node", "Pod")
    if serves_inferencemodels(api):
        kinds += ("InferenceModel",)
    else:
        log.warning(
            "the API server does not serve %s %s (CRD not installed?): model pods must carry their memory "
            "annotation",
            INFERENCE_MODELS.api_version,
            INFERENCE_MODELS.plural,
        )
    return ClusterCache(api, kinds=kinds, namespace=namespace)


def cluster_source(kubeconfig: str | None, *, namespace: str | None = None) -> CacheSource:
    """Start a list+watch cache against the API server (kubeconfig file, or in-cluster when None)."""
    api = load_api_client(kubeconfig)
    return CacheSource(live_cache(api, namespace=namespace).start(), KubeApi(api))
