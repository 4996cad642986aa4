"""The controller's only door to the API server: raw JSON requests, errors wrapped, writes fenced.

Why this module exists: the reconcile logic works on plain dicts (the API's own JSON) and must not
depend on the generated client's models or call conventions, which changed incompatibly in kubernetes
37 (``ApiClient.call_api`` became ``call_api(method, url, ...)`` after ``param_serialize``). Every write
first asks ``may_write()`` (is this replica still the leader?) and raises :class:`NotLeader` if not.

:class:`LiveCache` is ``kubeview.ClusterCache`` with its one request method adapted to that client
(kubeview's own call still uses the old signature; reported to the lead). Drop the subclass once
kubeview is fixed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from kubernetes.client.exceptions import ApiException

from controller.errors import KubeError, NotLeader
from controller.translate import FIELD_MANAGER, GROUP, VERSION
from kubeview import ClusterCache

log = logging.getLogger(__name__)

PLURAL = "inferencemodels"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_TIMEOUT_SECONDS = 30.0


def model_path(namespace: str, name: str, sub: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}"
    return f"{path}/{sub}" if sub else path


def deployment_path(namespace: str, name: str) -> str:
    return f"/apis/apps/v1/namespaces/{quote(namespace)}/deployments/{quote(name)}"


def service_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/services/{quote(name)}"


def lease_path(namespace: str, name: str = "") -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"
    return f"{base}/{quote(name)}" if name else base


def events_path(namespace: str, name: str = "") -> str:
    base = f"/apis/events.k8s.io/v1/namespaces/{quote(namespace)}/events"
    return f"{base}/{quote(name)}" if name else base


def _error_from(status: int, reason: str, data: bytes | None) -> KubeError:
    """A KubeError carrying the API's Status message (what kubectl would print)."""
    message = ""
    if data:
        try:
            body = json.loads(data)
            if isinstance(body, Mapping):
                message = str(body.get("message") or "")
                reason = str(body.get("reason") or reason)
        except ValueError:
            message = data[:300].decode("utf-8", "replace")
    return KubeError(status, reason or "Error", message or reason or "error")


def raw_request(
    api: Any,
    method: str,
    path: str,
    *,
    query: Mapping[str, Any] | None = None,
    body: Any = None,
    content_type: str | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT_SECONDS,
) -> Any:
    """One request through a kubernetes ``ApiClient``; returns the unread urllib3 response (2xx only)."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type or "application/json"
    params = list((query or {}).items())
    try:
        serialized = api.param_serialize(
            method,
            path,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(*serialized, _request_timeout=timeout)
    except ApiException as exc:
        raise _error_from(exc.status or 0, exc.reason or "", (exc.body or "").encode()) from exc
    except Exception as exc:  # urllib3 connection errors, timeouts
        raise KubeError(0, "Unreachable", f"{method} {path}: {exc}") from exc
    raw = resp.response
    if not 200 <= resp.status <= 299:
        data = raw.data
        raw.release_conn()
        raise _error_from(resp.status, resp.reason or "", data)
    return raw


class Kube:
    """JSON in, JSON out; every mutating call is fenced by ``may_write``."""

    def __init__(
        self,
        api: Any,
        *,
        may_write: Callable[[], bool] = lambda: True,
        field_manager: str = FIELD_MANAGER,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.api = api
        self.may_write = may_write
        self.field_manager = field_manager
        self.timeout_seconds = timeout_seconds

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        if method != "GET" and not self.may_write():
            raise NotLeader(f"not the leader: refusing {method} {path}")
        raw = raw_request(
            self.api, method, path, query=query, body=body, content_type=content_type, timeout=self.timeout_seconds
        )
        data = raw.data
        raw.release_conn()
        if not data:
            return {}
        out = json.loads(data)
        return out if isinstance(out, dict) else {"items": out}

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return self.request("GET", path, query=query)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, path: str, config: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply of `config` as this controller's field manager."""
        query = {"fieldManager": self.field_manager, "force": "true" if force else "false"}
        return self.request("PATCH", path, query=query, body=dict(config), content_type=APPLY_PATCH)

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        query = {"fieldManager": self.field_manager}
        return self.request("PATCH", path, query=query, body=dict(patch), content_type=MERGE_PATCH)

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, query={"fieldManager": self.field_manager}, body=dict(body))

    def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PUT", path, query={"fieldManager": self.field_manager}, body=dict(body))

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except KubeError as exc:
            if exc.status != 404:
                raise


class LiveCache(ClusterCache):
    """``kubeview.ClusterCache`` whose list/watch requests work with the kubernetes 37 client."""

    def _request(self, path: str, query: dict[str, Any], timeout: float | tuple[float, float]) -> Any:
        try:
            return raw_request(self.api, "GET", path, query=query, timeout=timeout)
        except KubeError as exc:
            # kubeview's loop re-lists on ApiException 410 and backs off on the others.
            raise ApiException(status=exc.status, reason=exc.reason) from exc
