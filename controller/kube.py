"""The controller's only door to the API server: raw JSON requests, errors wrapped, writes fenced.

Why this module exists: the reconcile logic works on plain dicts (the API's own JSON) and must not
depend on the generated client's models or call conventions, which changed incompatibly in kubernetes
37 (``ApiClient.call_api`` became ``call_api(method, url, ...)`` after ``param_serialize``). Every write
first asks ``may_write()`` (is this replica still the leader?) and raises :class:`NotLeader` if not.
The request itself is :func:`kubeview.rest.raw_request`, shared with every service.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from controller.errors import KubeError, NotLeader
from controller.translate import FIELD_MANAGER, GROUP, VERSION
from kubeview import rest

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


def raw_request(api: Any, method: str, path: str, **kwargs: Any) -> Any:
    """kubeview's raw request, with failures as the controller's KubeError (status, reason, message)."""
    try:
        return rest.raw_request(api, method, path, **kwargs)
    except rest.ApiCallError as exc:
        raise KubeError(exc.status, exc.reason or "Error", exc.message or exc.reason or "error") from exc


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
            self.api,
            method,
            path,
            query=query,
            body=body,
            content_type=content_type or "application/json",
            timeout=self.timeout_seconds,
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
