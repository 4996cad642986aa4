"""The Flask side every server shares: JSON errors, health probes and the `/metrics` route.

Each service keeps its own error *body* (the scheduler reads `{"Error": ...}`, an OpenAI client reads
`{"error": {...}}`), so it passes a `render(status, code, message, headers)` function; what the errors
*are* is decided here once: 404, 405 (with `Allow`), 413 (naming the limit), other HTTP errors by name,
and any unexpected exception logged with its traceback and answered 500 without leaking it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from serving.metrics import render as render_metrics

log = logging.getLogger(__name__)

JSON = "application/json"


class ErrorRender(Protocol):
    """A service's error body: status, a stable snake_case code, a message for people, extra headers."""

    def __call__(
        self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
    ) -> Response: ...


def http_error_fields(exc: HTTPException, max_body_bytes: int | None = None) -> tuple[int, str, str]:
    """(status, code, message) for a werkzeug HTTP error raised while routing or reading a request."""
    status = exc.code or 500
    if status == 413:
        limit = f"the limit of {max_body_bytes} bytes" if max_body_bytes is not None else "the limit"
        return 413, "request_too_large", f"request body exceeds {limit}"
    if status == 404:
        return 404, "not_found", f"no route for {request.method} {request.path}"
    if status == 405:
        return 405, "method_not_allowed", f"{request.method} is not allowed on {request.path}"
    name = exc.name or "error"
    return status, name.lower().replace(" ", "_"), f"{name}: {exc.description or request.path}"


def add_json_errors(app: Flask, render: ErrorRender, *, service: str, max_body_bytes: int | None = None) -> None:
    """Answer every HTTP error and every unexpected exception of `app` with `render`'s JSON body."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status, code, message = http_error_fields(exc, max_body_bytes)
        headers = None
        if isinstance(exc, MethodNotAllowed):
            headers = [("Allow", ", ".join(exc.valid_methods or []))]
        return render(status, code, message, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in the %s on %s %s", service, request.method, request.path)
        return render(500, "internal_error", f"internal error in the inference budget {service}: {type(exc).__name__}")


def json_response(body: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    """Compact JSON, the way every server writes it."""
    return Response(json.dumps(body, separators=(",", ":")), status=status, headers=headers, mimetype=JSON)


def add_probes(
    app: Flask,
    not_ready: Callable[[], str | None] = lambda: None,
    details: Callable[[], dict[str, Any]] = dict,
) -> None:
    """`GET /livez` (alias `/healthz`): `{"status":"ok"}` while the process answers. `GET /readyz`:
    `{"status":"ready", **details()}`, or 503 `{"status":"syncing","message": not_ready()}` while
    `not_ready()` names a reason."""

    def livez() -> Response:
        return json_response({"status": "ok"})

    def readyz() -> Response:
        reason = not_ready()
        if reason:
            return json_response({"status": "syncing", "message": reason}, 503)
        return json_response({"status": "ready", **details()})

    app.add_url_rule("/livez", "livez", livez, methods=["GET"])
    app.add_url_rule("/healthz", "healthz", livez, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])


def add_metrics(app: Flask, registry: CollectorRegistry, *, multiprocess: bool | None = None) -> None:
    """`GET /metrics`: the exposition of `registry` (merged across workers in multiprocess mode)."""

    def metrics() -> Response:
        body, content_type = render_metrics(registry, multiprocess=multiprocess)
        return Response(body, 200, content_type=content_type)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
