"""The one Kubernetes API layer every part calls: each resource kind knows its path, JSON in and out,
one error type carrying the HTTP status.

Why raw JSON through `kubernetes.client.ApiClient` and not the generated API classes: the services want
the API's own JSON (the translation in `budget.objects` reads dicts), the generated models cost time per
object, and their call convention changed incompatibly in kubernetes 37 (`param_serialize(...)` then
`call_api(method, url, ...)`); this module is the one place that knows it. The ApiClient still pays for
itself: kubeconfig and in-cluster credentials, TLS, token refresh and the connection pool.

Every failure is an :class:`ApiError`: `status` is the HTTP status (0 when the server was not reached),
`reason` the Status reason (Conflict, Forbidden, ...), `message` the Status message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from budget.objects import GROUP, VERSION

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
DEFAULT_TIMEOUT_SECONDS = 30.0

RETRIES = urllib3.Retry(
    total=3, connect=3, read=0, redirect=0, status=0, other=0, respect_retry_after_header=False
)
"""Re-try only a failure to connect (nothing was sent). urllib3's default also re-sends a GET or a PUT
whose answer timed out, three times: a call with a 2 s timeout took 8 s against a server that hangs,
longer than a leader's renew deadline; and it sleeps out a 429's Retry-After. Callers retry at their own
level, where they know their deadline; a 429 reaches them as an ApiError with status 429."""

_WEBHOOK_DENIAL = re.compile(r'admission webhook "(?P<webhook>[^"]+)" denied the request: (?P<message>.*)', re.S)


class ApiError(Exception):
    """An API call failed: `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str, retry_after_seconds: int | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_seconds = retry_after_seconds  # the answer's Retry-After header (a 429's), if any

    @property
    def webhook_denial(self) -> str | None:
        """The webhook's own words when an admission webhook refused the write, else None."""
        match = _WEBHOOK_DENIAL.search(self.message)
        return match.group("message").strip() if match else None

    @property
    def denied_by_webhook(self) -> bool:
        """True when an admission webhook refused the write (the message says so)."""
        return self.webhook_denial is not None


@dataclass(frozen=True)
class Resource:
    """One kind of the API: where it lives (`path`) and what a body of it says (`api_version`, `kind`)."""

    kind: str
    plural: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        """The collection (cluster-wide when `namespace` is None), one object, or one of its subresources."""
        path = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{self.plural}"
        if name:
            path += f"/{quote(name)}"
            if sub:
                path += f"/{sub}"
        return path


NODES = Resource("Node", "nodes", namespaced=False)
PODS = Resource("Pod", "pods")
SERVICES = Resource("Service", "services")
CONFIGMAPS = Resource("ConfigMap", "configmaps")
SECRETS = Resource("Secret", "secrets")
DEPLOYMENTS = Resource("Deployment", "deployments", "apps")
LEASES = Resource("Lease", "leases", "coordination.k8s.io")
EVENTS = Resource("Event", "events", "events.k8s.io")
VALIDATING_WEBHOOK_CONFIGURATIONS = Resource(
    "ValidatingWebhookConfiguration",
    "validatingwebhookconfigurations",
    "admissionregistration.k8s.io",
    namespaced=False,
)
INFERENCE_MODELS = Resource("InferenceModel", "inferencemodels", GROUP, VERSION)
RESOURCE_SLICES = Resource("ResourceSlice", "resourceslices", "resource.k8s.io", "v1", namespaced=False)
"""DRA's per-node device inventory (GA in Kubernetes 1.34); a cluster without it answers 404."""
RESOURCES = {r.kind: r for r in (NODES, PODS, SERVICES, CONFIGMAPS, SECRETS, DEPLOYMENTS, LEASES, EVENTS,
                                 VALIDATING_WEBHOOK_CONFIGURATIONS, INFERENCE_MODELS, RESOURCE_SLICES)}  # fmt: skip


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An ApiClient from a kubeconfig file (never written back), or in-cluster config when none is given.

    Its requests are never re-sent after a read error (:data:`RETRIES`), so a call's timeout is the
    longest it can take.
    """
    cfg = client.Configuration()
    cfg.retries = RETRIES
    if kubeconfig:
        return config.new_client_from_config(
            config_file=kubeconfig, context=context, persist_config=False, client_configuration=cfg
        )
    config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def _status(data: bytes | str | None, fallback: str) -> tuple[str, str]:
    """(reason, message) of a Kubernetes Status body, else the fallback for both."""
    try:
        parsed = json.loads(data or b"")
    except (TypeError, ValueError):
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
        return fallback, text[:300] or fallback
    if not isinstance(parsed, dict):
        return fallback, fallback
    return str(parsed.get("reason") or fallback), str(parsed.get("message") or fallback)


def raw_request(
    api: Any,
    method: str,
    path: str,
    *,
    query: Mapping[str, Any] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] = 5.0,
) -> Any:
    """One request: the unread urllib3 response of a 2xx (caller releases it), else ApiError."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
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
        retry = _retry_after(exc.headers)
        raise ApiError(exc.status or 0, *_status(exc.body, str(exc.reason or "Error")), retry) from exc
    except Exception as exc:  # urllib3 connection errors and timeouts
        raise ApiError(0, "Unreachable", f"{method} {path}: {exc}") from exc
    raw = resp.response
    if not 200 <= resp.status <= 299:
        data = raw.data
        raw.release_conn()
        retry = _retry_after(getattr(raw, "headers", None))
        raise ApiError(resp.status, *_status(data, str(resp.reason or "Error")), retry)
    return raw


def _retry_after(headers: Any) -> int | None:
    """Whole seconds of a Retry-After header, else None (an HTTP date is not what the apiserver sends)."""
    value = str((headers or {}).get("Retry-After") or "").strip()
    return int(value) if value.isdigit() else None


def request_json(api: Any, method: str, path: str, **kwargs: Any) -> Any:
    """raw_request with the body read and parsed (None for an empty body)."""
    raw = raw_request(api, method, path, **kwargs)
    try:
        return json.loads(raw.data) if raw.data else None
    finally:
        raw.release_conn()


class Kube:
    """JSON in, JSON out, on one ApiClient: the verbs every caller needs, with one timeout."""

    def __init__(
        self, api: Any, *, field_manager: str | None = None, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.api = api
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
        timeout: float | None = None,
    ) -> dict[str, Any]:
        seconds = self.before(method, path, self.timeout_seconds if timeout is None else timeout)
        out = request_json(
            self.api,
            method,
            path,
            query=query,
            body=body,
            content_type=content_type or "application/json",
            timeout=seconds,
        )
        if out is None:
            return {}
        return out if isinstance(out, dict) else {"items": out}

    def before(self, method: str, path: str, timeout: float) -> float:
        """Called before every request with its timeout; returns the timeout to use. A subclass raises to
        refuse a request or shortens the timeout (the controller fences writes by its lease)."""
        return timeout

    def _writing(self, query: Mapping[str, Any] | None = None) -> dict[str, Any]:
        out = dict(query or {})
        if self.field_manager:
            out["fieldManager"] = self.field_manager
        return out

    def get(
        self, path: str, query: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return self.request("GET", path, query=query, timeout=timeout)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        return self.request("POST", path, query=self._writing(), body=dict(body), timeout=timeout)

    def replace(self, path: str, body: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        return self.request("PUT", path, query=self._writing(), body=dict(body), timeout=timeout)

    def merge_patch(self, path: str, patch: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        query = self._writing()
        return self.request("PATCH", path, query=query, body=dict(patch), content_type=MERGE_PATCH, timeout=timeout)

    def json_patch(self, path: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", path, query=self._writing(), body=list(ops), content_type=JSON_PATCH)

    def apply(self, path: str, config: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply of `config` as this client's field manager."""
        query = self._writing({"force": "true" if force else "false"})
        return self.request("PATCH", path, query=query, body=dict(config), content_type=APPLY_PATCH)

    def delete(self, path: str) -> None:
        """Delete (background propagation); a missing object is already deleted."""
        try:
            self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise
