"""The extender's Kubernetes I/O: raw API calls, the live cache, reading a pod, posting a Binding.

Why raw calls: kubernetes>=37 changed `ApiClient.call_api` to `(method, url, ...)` after
`param_serialize`, and `kubeview.ClusterCache._request` still uses the old signature; :class:`LiveCache`
adapts it here until kubeview is fixed (reported upstream in the project). Errors become
:class:`ApiCallError` with the HTTP status and the Status message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from kubernetes.client.exceptions import ApiException

from extender.source import BindError
from kubeview.cache import GROUP, PLURAL, VERSION, ClusterCache

log = logging.getLogger(__name__)


class ApiCallError(Exception):
    """An API call failed: `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status or 'unreachable'}: {message}")
        self.status = status
        self.message = message


def _status_message(data: bytes | str | None, fallback: str) -> str:
    """The `message` of a Kubernetes Status body, else the fallback (the HTTP reason)."""
    try:
        parsed = json.loads(data or b"")
    except (TypeError, ValueError):
        return fallback
    return str(parsed.get("message") or fallback) if isinstance(parsed, dict) else fallback


def raw_request(
    api: Any,
    method: str,
    path: str,
    *,
    query: Mapping[str, Any] | None = None,
    body: Any = None,
    timeout: float | tuple[float, float] = 5.0,
) -> Any:
    """One request through a kubernetes ApiClient: the unread urllib3 response of a 2xx, else ApiCallError."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        serialized = api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(*serialized, _request_timeout=timeout)
    except ApiException as exc:
        raise ApiCallError(exc.status or 0, _status_message(exc.body, str(exc.reason))) from exc
    except Exception as exc:  # urllib3 connection errors and timeouts
        raise ApiCallError(0, f"{method} {path}: {exc}") from exc
    raw = resp.response
    if not 200 <= resp.status <= 299:
        data = raw.data
        raw.release_conn()
        raise ApiCallError(resp.status, _status_message(data, str(resp.reason)))
    return raw


def request_json(api: Any, method: str, path: str, **kwargs: Any) -> Any:
    """raw_request with the body read and parsed."""
    raw = raw_request(api, method, path, **kwargs)
    try:
        return json.loads(raw.data)
    finally:
        raw.release_conn()


class LiveCache(ClusterCache):
    """`kubeview.ClusterCache` whose requests go through :func:`raw_request` (kubernetes>=37)."""

    def _request(self, path: str, query: dict[str, Any], timeout: float | tuple[float, float]) -> Any:
        try:
            return raw_request(self.api, "GET", path, query=query, timeout=timeout)
        except ApiCallError as exc:
            raise ApiException(status=exc.status, reason=exc.message) from exc


class KubeApi:
    """The real writer: a pod GET and `pods/binding` (201), through a kubernetes ApiClient."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
        try:
            body = request_json(self.api, "GET", path, timeout=5.0)
        except ApiCallError as exc:
            if exc.status == 404:
                return None
            raise BindError(f"reading pod {namespace}/{name} failed: {exc}") from exc
        return body if isinstance(body, dict) else None

    def bind(self, namespace: str, name: str, uid: str, node: str, timeout_seconds: float) -> None:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if uid:
            metadata["uid"] = uid  # precondition: never bind a newer pod that reused the name
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": metadata,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}/binding"
        try:
            raw = raw_request(self.api, "POST", path, body=body, timeout=timeout_seconds)
        except ApiCallError as exc:
            raise BindError(f"binding {namespace}/{name} to {node} failed: {exc}") from exc
        status = raw.status
        raw.release_conn()
        if status != 201:
            raise BindError(f"binding {namespace}/{name} to {node}: unexpected HTTP {status}")


def serves_inferencemodels(api: Any) -> bool:
    """Discovery: is the InferenceModel resource served? (Without it the cache would never sync.)"""
    try:
        body = request_json(api, "GET", f"/apis/{GROUP}/{VERSION}", timeout=10.0)
    except ApiCallError as exc:
        if exc.status == 404:
            return False
        raise
    resources = body.get("resources") or [] if isinstance(body, dict) else []
    return any(r.get("name") == PLURAL for r in resources if isinstance(r, dict))


def live_cache(api: Any, *, namespace: str | None = None) -> LiveCache:
    """Nodes and model pods, plus InferenceModels when the CRD is installed (memory fallback, selectors)."""
    kinds: tuple[str, ...] = ("Node", "Pod")
    if serves_inferencemodels(api):
        kinds += ("InferenceModel",)
    else:
        log.warning(
            "the API server does not serve %s/%s %s (CRD not installed?): model pods must carry their memory "
            "annotation",
            GROUP,
            VERSION,
            PLURAL,
        )
    return LiveCache(api, kinds=kinds, namespace=namespace)
