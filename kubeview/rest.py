"""Raw Kubernetes API calls through a `kubernetes.client.ApiClient`, for plain-dict I/O.

The generated client deserializes into model classes we do not use; the services want the API's own
JSON. kubernetes>=37 splits a call into `param_serialize(...)` then `call_api(method, url, ...)`; this
module is the one place that knows that. Errors become :class:`ApiCallError` with the HTTP status and
the Kubernetes Status message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubernetes.client.rest import ApiException


class ApiCallError(Exception):
    """An API call failed: `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status or 'unreachable'}: {message}")
        self.status = status
        self.message = message
        self.reason = reason  # the Status `reason` (Conflict, Forbidden, ...) or the HTTP reason


def _status(data: bytes | str | None, fallback: str) -> tuple[str, str]:
    """(message, reason) of a Kubernetes Status body, else the fallback for both."""
    try:
        parsed = json.loads(data or b"")
    except (TypeError, ValueError):
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
        return (text[:300] or fallback, fallback)
    if not isinstance(parsed, dict):
        return fallback, fallback
    return str(parsed.get("message") or fallback), str(parsed.get("reason") or fallback)


def status_message(data: bytes | str | None, fallback: str) -> str:
    """The `message` of a Kubernetes Status body, else the fallback (the HTTP reason)."""
    return _status(data, fallback)[0]


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
    """One request: the unread urllib3 response of a 2xx (caller releases it), else ApiCallError."""
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
        raise ApiCallError(exc.status or 0, *_status(exc.body, str(exc.reason or ""))) from exc
    except Exception as exc:  # urllib3 connection errors and timeouts
        raise ApiCallError(0, f"{method} {path}: {exc}", "Unreachable") from exc
    raw = resp.response
    if not 200 <= resp.status <= 299:
        data = raw.data
        raw.release_conn()
        raise ApiCallError(resp.status, *_status(data, str(resp.reason or "")))
    return raw


def request_json(api: Any, method: str, path: str, **kwargs: Any) -> Any:
    """raw_request with the body read and parsed."""
    raw = raw_request(api, method, path, **kwargs)
    try:
        return json.loads(raw.data)
    finally:
        raw.release_conn()
