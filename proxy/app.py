"""The proxy's request path: an OpenAI-compatible front door that routes by `model` and scales from zero.

It only talks to a :class:`proxy.scaler.Scaler`, so the same app serves Kubernetes (`proxy.kube_scaler`)
and local mode (processes). Per request: authenticate, cap and parse the body, find the model, record
activity, and either forward to the least busy ready backend (streaming chunk by chunk) or, when none is
ready, decide at once with `budget.decide_scale` whether the model could start: no -> 429 with the
budget's explanation and no API call; yes -> ask the scaler (one call per model at a time) and hold the
request in a bounded waiting room until a backend is ready.

Every error body uses OpenAI's envelope `{"error": {"message", "type", "param", "code", ...}}`, so SDKs
show the message and keep the numbers. The 429 for memory carries `budget.explain(decision)` (the same
explanation the webhook and `ibc plan` give) inside `error` and, for clients written against the
documented shape, again at the top level (`message`, `requested`, `available`, `blocking`,
`retry_after_seconds`).

`POST /v1/*` is answered at the WSGI level (`ProxyApp.wsgi`, installed in front of Flask by
`create_app`): Flask's request context, routing and Request/Response objects cost about a sixth of the
proxy's CPU per request. Every other endpoint is an ordinary Flask route.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any

import httpx
from flask import Flask, Response, request

from budget import Decision, Model, UnknownModelError, decide_scale, explain, format_bytes
from proxy.access_log import MODEL_KEY, REASON_KEY, access_logged
from proxy.client_io import BodyError, BodyTimeout, ClosingAnswer, DisconnectWatch, read_body
from proxy.coldstart import Charge, ColdStarts, QueueFull, Ticket, client_gone
from proxy.evictions import EvictionCollector, EvictionLog
from proxy.forward import Upstream, UpstreamError, environ_headers, raw_chunks, response_headers
from proxy.line import LineFull, Outcome, Place, WaitLine, parse_max_wait
from proxy.metrics import ProxyMetrics
from proxy.routing import Pick, routing_of
from proxy.scaler import ScaleDenied, Scaler, ScalerUnavailable
from proxy.settings import ProxySettings, digest_key
from proxy.status import RefusalLog, add_status_routes
from serving.http import add_json_errors, add_metrics, add_probes

log = logging.getLogger(__name__)

JSON = "application/json"
SSE_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
# Status we log (nginx's convention) when a client hung up while its request was held.
CLIENT_CLOSED = 499
# While a model answers, record activity at least this often (and when a long answer ends), so a stream or
# a start longer than the cooldown never has its model stopped under it. Cheap: local touches are a store,
# Kubernetes ones are throttled to one status write per model every few seconds.
BUSY_TOUCH_SECONDS = 0.5
# Retry-After of the 503 that held requests get when the process shuts down (another replica, or this one
# restarted, can take them).
SHUTDOWN_RETRY_AFTER_SECONDS = 1
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    408: "timeout_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",  # as the plain 429's body says: also the SSE error event of a stream that waited
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {
        "error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}
    }


def error_response(
    status: int, message: str, code: str, param: str | None = None, headers: list[tuple[str, str]] | None = None
) -> Response:
    return Response(json.dumps(error_body(status, message, code, param)), status, headers=headers, mimetype=JSON)


def _render_error(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """`serving.http`'s error hook, in OpenAI's shape."""
    return error_response(status, message, code, headers=headers)


def sse_error(status: int, message: str, code: str, **extra: Any) -> bytes:
    """An SSE `error` event (OpenAI's envelope): how a failure reaches a streaming client after the 200 was sent."""
    body = error_body(status, message, code)
    body["error"].update(extra)
    payload = json.dumps(body)
    return f"event: error\ndata: {payload}\n\n".encode()


Answer = tuple[int, list[tuple[str, str]], Iterable[bytes]]
_STATUS_LINES: dict[int, str] = {}
UNAUTHORIZED_BODY = error_body(401, "missing or invalid API key (send Authorization: Bearer <key>)", "invalid_api_key")


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"{status} {phrase}"
    return line


def _json_answer(status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None) -> Answer:
    data = json.dumps(body).encode()
    out = [("Content-Type", JSON), ("Content-Length", str(len(data)))]
    if headers:
        out.extend(headers)
    return status, out, [data]


def too_many_body(decision: Decision) -> dict[str, Any]:
    """The 429 body: OpenAI's error envelope with the budget's numbers inside `error` (SDKs keep them as
    `exc.body`), and the seed's top-level fields too, for clients written against the documented shape."""
    explained = explain(decision)
    explained.pop("error", None)  # the reason is `error.code` now
    error = {
        "message": decision.message,
        "type": "rate_limit_error",
        "code": decision.reason,
        "param": None,
        **{k: explained[k] for k in ("requested", "available", "blocking", "retry_after_seconds")},
    }
    return {"error": error, **explained}


def too_many_answer(decision: Decision) -> Answer:
    """The explained 429: `budget.explain(decision)` as the body, Retry-After from the decision's plan.

    A request that can never fit gets no Retry-After and `x-should-retry: false` (which OpenAI's SDKs
    honour): retrying it would only spend the client's time.
    """
    if decision.retry_after_seconds > 0:
        return _json_answer(429, too_many_body(decision), [("Retry-After", str(int(decision.retry_after_seconds)))])
    return _json_answer(429, too_many_body(decision), [("x-should-retry", "false")])


class _Router:
    """Model lookup by what clients send (key, name or modelName), re-indexed only when the view changes."""

    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler
        self._cached: tuple[object, dict[str, Model]] = (None, {})  # (view, index), swapped as one value

    def find(self, ref: str) -> Model | None:
        view = self.scaler.view()
        cached_view, index = self._cached
        if view is not cached_view:
            # Same precedence as ClusterView.find_model: key, then name, then modelName; first wins.
            models = list(view.models.values())
            index: dict[str, Model] = {}
            for m in models:
                index.setdefault(m.model_name or m.name, m)
            names: dict[str, Model] = {}
            for m in models:
                names.setdefault(m.name, m)
            index.update(names)
            index.update({m.key: m for m in models})
            self._cached = (view, index)
        return index.get(ref)


class ProxyApp:
    """The request path's state and handlers; `create_app` wires them into Flask."""

    def __init__(
        self,
        settings: ProxySettings,
        scaler: Scaler,
        *,
        transport: httpx.BaseTransport | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.scaler = scaler
        self.metrics = metrics or ProxyMetrics()
        self.router = _Router(scaler)
        self.upstream = Upstream(
            connect_timeout_seconds=settings.connect_timeout_seconds,
            read_timeout_seconds=settings.read_timeout_seconds,
            max_connections=settings.max_connections,
            transport=transport,
            mode=settings.upstream,
            on_in_flight=self.metrics.count_in_flight,
        )
        self.cold = ColdStarts(
            scaler,
            queue_size=settings.queue_size,
            total_limit=settings.max_held_requests,
            bytes_limit=settings.max_held_bytes,
            metrics=self.metrics,
        )
        self.routing = routing_of(settings, self.metrics.count_route)
        self.line = WaitLine(per_pool=settings.queue_size, total=settings.max_held_requests or 4 * settings.queue_size)
        self._scaler_ready = not callable(getattr(scaler, "ready", None))
        self._keys = settings.api_key_digests
        self.refusals = RefusalLog()  # the last refusal per model, for GET /status
        self.closing = threading.Event()  # set by shutdown(): held requests are answered, none newly held
        self._denials: dict[str, tuple[object, tuple[int, int], Decision]] = {}  # key -> (view, (replicas, s), no)
        # A scaler that makes room (evicts idle models) must know which models this worker serves or holds.
        busy_hook = getattr(scaler, "set_busy_source", None)
        if callable(busy_hook):
            busy_hook(lambda: (self.upstream.outstanding().keys(), self.cold.waiting().keys()))
        evictions = getattr(scaler, "evictions", None)
        if isinstance(evictions, EvictionLog):
            self.metrics.registry.register(EvictionCollector(evictions))

    # ----- small endpoints -----
    def not_ready(self) -> str | None:
        """Why `/readyz` answers 503 (the scaler has no initial state yet), or None when ready."""
        ready = getattr(self.scaler, "ready", None)
        return "scaler not synced" if callable(ready) and not ready() else None

    def _check_ready(self) -> bool:
        """Whether the scaler has its initial state; once true it is not asked again."""
        if self.scaler.ready():  # type: ignore[attr-defined]
            self._scaler_ready = True
        return self._scaler_ready

    # ----- the auth hook: every route of the proxy's app, and routes others add to it -----
    def authorized(self, environ: Mapping[str, Any] | None = None) -> bool:
        """Whether the request (Flask's current one unless `environ` is given) carries a valid API key;
        always true when the proxy has no keys."""
        if not self._keys:
            return True
        header = (request.environ if environ is None else environ).get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and digest_key(token.strip()) in self._keys

    def unauthorized(self) -> Response:
        """The 401 a route answers when `authorized()` is false (counted like the proxy's own)."""
        self.metrics.count_request("", 401)
        return error_response(
            401,
            "missing or invalid API key (send Authorization: Bearer <key>)",
            "invalid_api_key",
            headers=[("WWW-Authenticate", "Bearer")],
        )

    def require_key(self, view: Callable[..., Response]) -> Callable[..., Response]:
        """Wrap a Flask view so it answers 401 without a valid API key: how a route added to the proxy's
        app (local mode's `/models/{name}/metrics`) gets the same authentication as `/v1/*`."""

        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Response:
            if not self.authorized():
                return self.unauthorized()
            return view(*args, **kwargs)

        return guarded

    def _describe(self, model: Model) -> dict[str, Any]:
        body = {
            "id": model.model_name or model.name,
            "object": "model",
            "created": 0,
            "owned_by": model.namespace,
            "state": self.scaler.state(model.key),
            "memory": format_bytes(model.memory_bytes),
            "replicas": model.replicas,
            "key": model.key,
        }
        details = getattr(self.scaler, "details", None)  # optional: see proxy/scaler.py
        if callable(details):
            body.update(details(model.key))
        return body

    def list_models(self) -> Response:
        models = sorted(self.scaler.view().models.values(), key=lambda m: (m.model_name or m.name, m.key))
        body = {"object": "list", "data": [self._describe(m) for m in models]}
        return Response(json.dumps(body), 200, mimetype=JSON)

    def get_model(self, ref: str) -> Response:
        model = self.router.find(ref)
        if model is None:
            return error_response(404, f"The model `{ref}` does not exist.", "model_not_found", "model")
        return Response(json.dumps(self._describe(model)), 200, mimetype=JSON)

    # ----- the hot path: POST /v1/*, served at the WSGI level -----
    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """Any `POST /v1/...`: parse, route by the body's `model`, forward or scale from zero.

        Served without Flask's request machinery (context, routing, Request/Response objects), which
        cost about a sixth of the proxy's CPU per request; everything else goes through Flask.
        """
        try:
            status, headers, body = self._post(environ)
        except Exception:
            log.exception("unexpected error on POST %s", environ.get("PATH_INFO"))
            status, headers, body = _json_answer(500, error_body(500, "internal error in the proxy", "internal_error"))
        if status >= 400 and isinstance(body, list) and len(body) == 1:
            environ[REASON_KEY] = _error_code(body[0])  # for the access log
        start_response(_status_line(status), headers)
        return body

    def _post(self, environ: dict[str, Any]) -> Answer:
        if self._keys and not self.authorized(environ):
            self.metrics.count_request("", 401)
            return _json_answer(401, UNAUTHORIZED_BODY, [("WWW-Authenticate", "Bearer")])
        if not self._scaler_ready and not self._check_ready():
            body = error_body(503, "the proxy is still loading the models", "not_ready")
            return _json_answer(503, body, [("Retry-After", "1")])
        try:
            raw = read_body(environ, self.settings.max_body_bytes, self.settings.body_timeout_seconds)
        except BodyError as exc:
            self.metrics.count_request("", exc.status)
            status, out, body = _json_answer(exc.status, error_body(exc.status, str(exc), exc.code))
            if isinstance(exc, BodyTimeout):  # the rest of the upload must not be read as a request
                return status, [*out, ("Connection", "close")], ClosingAnswer(body, environ)
            return status, out, body
        try:
            payload = json.loads(raw)
        except RecursionError:  # [[[[...]]]] deeper than Python's recursion limit: still a bad request
            return self._bad("the request body is nested too deeply", "invalid_json")
        except ValueError:
            return self._bad("the request body is not valid JSON", "invalid_json")
        if not isinstance(payload, dict):
            return self._bad("the request body must be a JSON object", "invalid_json")
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            missing = "model" not in payload
            message = "missing `model` in the request body" if missing else "`model` must be a non-empty string"
            return self._bad(message, "missing_model" if missing else "invalid_type", "model")
        stream = payload.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return self._bad("`stream` must be true or false", "invalid_type", "stream")
        environ[MODEL_KEY] = name
        model = self.router.find(name)
        if model is None:
            self.metrics.count_request("", 404)
            return _json_answer(404, error_body(404, f"The model `{name}` does not exist.", "model_not_found", "model"))
        label = model.model_name or model.name
        key = model.key
        environ[MODEL_KEY] = label
        if name != label:
            # Routed by `namespace/name` (or name beside a modelName): the backend only knows its served name.
            payload["model"] = label
            raw = json.dumps(payload).encode()
        self.scaler.touch(key, time.time())
        backends = self.scaler.backends(key)
        query = environ.get("QUERY_STRING")
        path = environ.get("PATH_INFO") or "/"
        if query:
            path = f"{path}?{query}"
        headers = environ_headers(environ, drop_authorization=bool(self._keys))
        if backends:
            pick = self.routing.for_request(payload, backends, label)
            return self._forward(key, label, backends, path, headers, raw, stream is True, environ, pick)
        return self._cold(model, label, path, headers, raw, stream is True, environ)

    def _bad(self, message: str, code: str, param: str | None = None) -> Answer:
        self.metrics.count_request("", 400)
        return _json_answer(400, error_body(400, message, code, param))

    def _forward(
        self,
        key: str,
        label: str,
        backends: list[str],
        path: str,
        headers: list[tuple[str, str]],
        raw: bytes,
        stream: bool,
        environ: dict[str, Any],
        pick: Pick | None = None,
    ) -> Answer:
        upstream = self.upstream
        backend = upstream.acquire(backends, pick)
        started = time.perf_counter()
        try:
            response = upstream.send(upstream.prepare(backend, "POST", path, headers, raw))
        except UpstreamError as exc:
            upstream.release(backend)
            others = [b for b in backends if b != backend]
            if not (others and exc.connect_failed):
                return self._upstream_failed(label, exc)
            # Nothing reached that replica (e.g. its pod just went away): another one gets the request.
            log.info("%s refused a connection; trying another replica of %s", backend, label)
            self.metrics.upstream_errors.labels(label, exc.code).inc()
            backend = upstream.acquire(others)
            try:
                response = upstream.send(upstream.prepare(backend, "POST", path, headers, raw))
            except UpstreamError as retry_exc:
                upstream.release(backend)
                return self._upstream_failed(label, retry_exc)
        self.metrics.observe_upstream(label, time.perf_counter() - started)
        out_headers = response_headers(response.headers.multi_items())
        if self.settings.expose_backend_header:
            out_headers.append(("X-IBC-Backend", backend))
        status = response.status_code
        self.metrics.count_request(label, status)
        if stream or response.headers.get("content-type", "").startswith("text/event-stream"):
            # Status and headers go out now; the body follows chunk by chunk as the backend sends it.
            return status, out_headers, self._relay(response, backend, label, key, environ)
        try:
            body = upstream.read_all(response, backend)
        except UpstreamError as exc:
            return self._upstream_failed(label, exc)
        finally:
            upstream.release(backend)
            if self._slow(started):
                self.scaler.touch(key, time.time())  # a long answer: the model was busy until now
        out_headers.append(("Content-Length", str(len(body))))
        return status, out_headers, [body]

    def _relay(
        self, response: httpx.Response, backend: str, label: str, key: str, environ: dict[str, Any]
    ) -> Iterator[bytes]:
        """Upstream bytes as they arrive; the upstream stream is closed however the client's ends, and at
        once when the client leaves (under gevent), so the backend stops generating for nobody."""
        watch = DisconnectWatch(environ, response.close)
        try:
            yield from self._busy(raw_chunks(response), key)
        except httpx.HTTPError as exc:
            if watch.gone:
                log.info("client of a %s stream went away; upstream request closed", label)
                return
            log.warning("stream from %s for %s broke: %s", backend, label, exc)
            self.metrics.upstream_errors.labels(label, "stream_broken").inc()
            if not response.headers.get("content-encoding"):
                yield sse_error(502, f"the model backend broke the stream: {exc}", "upstream_stream_broken")
        finally:
            watch.stop()
            response.close()
            self.upstream.release(backend)
            self.scaler.touch(key, time.time())

    def _slow(self, started_perf: float) -> bool:
        return time.perf_counter() - started_perf >= BUSY_TOUCH_SECONDS

    def _busy(self, chunks: Iterator[bytes], key: str) -> Iterator[bytes]:
        """Pass chunks through, recording activity every few seconds: a model streaming is not idle."""
        last = time.monotonic()
        for chunk in chunks:
            yield chunk
            now = time.monotonic()
            if now - last >= BUSY_TOUCH_SECONDS:
                last = now
                self.scaler.touch(key, time.time())

    def _upstream_failed(self, label: str, exc: UpstreamError) -> Answer:
        log.warning("upstream failure for %s: %s", label, exc)
        self.metrics.upstream_errors.labels(label, exc.code).inc()
        self.metrics.count_request(label, exc.status)
        return _json_answer(exc.status, error_body(exc.status, str(exc), exc.code))

    # ----- scale from zero -----
    def _cold(
        self,
        model: Model,
        label: str,
        path: str,
        headers: list[tuple[str, str]],
        raw: bytes,
        stream: bool,
        environ: dict[str, Any],
        place: Place | None = None,
        counted: bool = False,
    ) -> Answer:
        """`counted`: the request is already in ibc_proxy_requests_total (a stream that waited in line sent
        its 200 then; what follows is an SSE event, not another answer), so nothing here counts it again."""
        key = model.key
        replicas = max(1, model.replicas)
        try:
            decision = self._decide(key, replicas)
        except UnknownModelError:
            return _json_answer(
                404, error_body(404, f"The model `{label}` does not exist.", "model_not_found", "model")
            )
        if not decision.allowed and not self._may_make_room(key, replicas):
            if place is None:  # not waited in line yet: wait if the client (or the model) asked to
                again = functools.partial(self._cold, model, label, path, headers, raw, stream, environ)
                queued = self._queue(model, label, decision, stream, environ, again, len(raw))
                if queued is not None:
                    return queued
            self.refusals.record(decision)
            self.metrics.reject(label, "insufficient_memory")
            self._count(label, 429, counted)
            return too_many_answer(decision)
        if self.closing.is_set():
            if place is not None:
                place.release()
            return self._closing_answer(label, counted)
        try:
            ticket = self.cold.enter(key, label, len(raw))
        except QueueFull as exc:
            return self._queue_full(label, exc, counted)
        try:
            self.cold.scale_up(key, replicas, self.settings.cold_start_timeout_seconds)
        except ScaleDenied as exc:
            ticket.release()
            self.refusals.record(exc.decision)
            self.metrics.reject(label, "scale_denied")
            self._count(label, 429, counted)
            return too_many_answer(exc.decision)
        except ScalerUnavailable as exc:
            ticket.release()
            log.warning("scale-up of %s failed: %s", key, exc)
            return self._start_failed(label, exc, counted)
        finally:
            if place is not None:
                place.release()  # the start is asked for: the next in line may try
        if stream:
            self._count(label, 200, counted)
            return 200, list(SSE_HEADERS), self._wait_then_stream(ticket, label, path, headers, raw, environ)
        with ticket:
            outcome = self._wait(ticket, label, environ)
        if outcome == "timeout":
            seconds = self.settings.cold_start_timeout_seconds
            self.metrics.reject(label, "cold_start_timeout")
            self.metrics.count_request(label, 504)
            body = error_body(504, f"{label} did not become ready within {seconds:g}s", "cold_start_timeout")
            return _json_answer(504, body)
        if isinstance(outcome, ScalerUnavailable):
            log.warning("%s failed to start: %s", label, outcome)
            return self._start_failed(label, outcome)
        if outcome == "closing":
            return self._closing_answer(label)
        if outcome == "gone":
            self.metrics.count_request(label, CLIENT_CLOSED)
            return _json_answer(503, error_body(503, "client closed the connection while waiting", "client_closed"))
        assert isinstance(outcome, list)
        self.scaler.touch(ticket.key, time.time())  # held since before the start: the model is busy from now
        return self._forward(ticket.key, label, outcome, path, headers, raw, False, environ)

    def shutdown(self) -> None:
        """The process is stopping (SIGTERM, a graceful stop): every request held for a start or waiting
        in line is answered now, 503 with Retry-After (an SSE `error` event once a stream has begun),
        instead of having its connection dropped when the process exits. New ones that would be held
        get the same answer at once."""
        if not self.closing.is_set():
            log.info("shutting down: answering every held request 503")
        self.closing.set()
        self.line.close()

    def _closing_message(self, label: str) -> str:
        return f"the proxy is shutting down; {label} was not started here: retry (another replica may serve it)"

    def _count(self, label: str, status: int, counted: bool) -> None:
        if not counted:
            self.metrics.count_request(label, status)

    def _closing_answer(self, label: str, counted: bool = False) -> Answer:
        self.metrics.reject(label, "shutting_down")
        self._count(label, 503, counted)
        body = error_body(503, self._closing_message(label), "shutting_down")
        return _json_answer(503, body, [("Retry-After", str(SHUTDOWN_RETRY_AFTER_SECONDS))])

    def _closing_event(self, label: str) -> bytes:
        self.metrics.reject(label, "shutting_down")
        message = self._closing_message(label)
        return sse_error(503, message, "shutting_down", retry_after_seconds=SHUTDOWN_RETRY_AFTER_SECONDS)

    def _start_failed(self, label: str, exc: ScalerUnavailable, counted: bool = False) -> Answer:
        """503 for a model that could not start: why, and Retry-After = when the scaler will try again."""
        self.metrics.reject(label, "scaler_unavailable")
        self._count(label, 503, counted)
        retry = exc.retry_after_seconds or self.settings.default_retry_after_seconds
        body = error_body(503, f"could not start {label}: {exc}", "scaler_unavailable")
        body["error"]["retry_after_seconds"] = retry
        return _json_answer(503, body, [("Retry-After", str(retry))])

    def _decide(self, key: str, replicas: int) -> Decision:
        """`budget.decide_scale` on the scaler's view; a denial is reused for the same view within the same
        second (its idle times and Retry-After are whole seconds), so a storm of retries costs one plan."""
        view = self.scaler.view()
        now = time.time()
        cached = self._denials.get(key)
        if cached is not None and cached[0] is view and cached[1] == (replicas, int(now)):
            return cached[2]
        decision = decide_scale(
            view, key, replicas, now, default_retry_after_seconds=self.settings.default_retry_after_seconds
        )
        if not decision.allowed:
            self._denials[key] = (view, (replicas, int(now)), decision)
        return decision

    def _may_make_room(self, key: str, replicas: int) -> bool:
        """Whether the scaler could still make room (local mode evicts idle models); optional, see Scaler."""
        check = getattr(self.scaler, "can_make_room", None)
        return bool(check is not None and check(key, replicas))

    def _waiting(
        self, ticket: Ticket, label: str, environ: dict[str, Any], progress_seconds: float | None = None
    ) -> Iterator[float | list[str] | str | ScalerUnavailable]:
        """Wait for a ready backend, for the plain and the streaming path alike: yields the seconds waited
        every `progress_seconds` (never when None), then one outcome: the backends' URLs, "timeout",
        "gone" when the client hung up, "closing" when the process is shutting down, or the scaler's
        ScalerUnavailable when the model failed to start (said at once, not at the timeout)."""
        started = time.monotonic()
        deadline = started + self.settings.cold_start_timeout_seconds
        check = self.settings.disconnect_check_seconds
        if progress_seconds is not None:
            check = min(check, progress_seconds)
        last_progress = started
        while True:
            remaining = deadline - time.monotonic()
            if self.closing.is_set():
                yield "closing"
                return
            if remaining <= 0:
                yield "timeout"
                return
            try:
                backends = self.scaler.wait_backends(ticket.key, min(remaining, check))
            except ScalerUnavailable as exc:  # while shutting down: the models stopping with the process
                yield "closing" if self.closing.is_set() else exc
                return
            if backends:
                self.cold.started(ticket.key, label)
                yield backends
                return
            if client_gone(environ):
                log.info("client waiting for %s went away after %.1fs", label, time.monotonic() - started)
                yield "gone"
                return
            now = time.monotonic()
            if progress_seconds is not None and now - last_progress >= progress_seconds:
                last_progress = now
                yield now - started

    def _wait(self, ticket: Ticket, label: str, environ: dict[str, Any]) -> list[str] | str | ScalerUnavailable:
        """Block until a backend is ready; the outcome of :meth:`_waiting`."""
        for step in self._waiting(ticket, label, environ):
            if not isinstance(step, float):
                return step
        raise AssertionError("_waiting ends with an outcome")

    def _wait_then_stream(
        self,
        ticket: Ticket,
        label: str,
        path: str,
        headers: list[tuple[str, str]],
        raw: bytes,
        environ: dict[str, Any],
    ) -> Iterator[bytes]:
        """SSE for a streaming request held during a cold start: progress comments, then the model's stream.

        The 200 and the SSE headers are already committed, so a failure becomes an SSE `error` event.
        """
        upstream = self.upstream
        backend: str | None = None
        response: httpx.Response | None = None
        try:
            yield f": waiting for {label} to start\n\n".encode()
            note = getattr(self.scaler, "note", None)
            done = note(ticket.key) if note is not None else None
            if done:
                yield f": {done}\n\n".encode()
            outcome: list[str] | str | ScalerUnavailable = "timeout"
            for step in self._waiting(ticket, label, environ, self.settings.progress_interval_seconds):
                if isinstance(step, float):
                    yield f": waiting for {label} to start ({int(step)}s)\n\n".encode()
                else:
                    outcome = step
            if outcome == "timeout":
                seconds = self.settings.cold_start_timeout_seconds
                self.metrics.reject(label, "cold_start_timeout")
                yield sse_error(504, f"{label} did not become ready within {seconds:g}s", "cold_start_timeout")
                return
            if isinstance(outcome, ScalerUnavailable):
                log.warning("%s failed to start: %s", label, outcome)
                self.metrics.reject(label, "scaler_unavailable")
                retry = outcome.retry_after_seconds or self.settings.default_retry_after_seconds
                yield sse_error(
                    503, f"could not start {label}: {outcome}", "scaler_unavailable", retry_after_seconds=retry
                )
                return
            if outcome == "closing":
                yield self._closing_event(label)
                return
            if isinstance(outcome, str):  # gone
                return
            backends = outcome
            ticket.release()
            backend = upstream.acquire(backends)
            # The headers are sent: ask for an unencoded body we can pass through as it is.
            plain = [(k, v) for k, v in headers if k.lower() != "accept-encoding"]
            plain.append(("Accept-Encoding", "identity"))
            try:
                response = upstream.send(upstream.prepare(backend, "POST", path, plain, raw))
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(label, exc.code).inc()
                yield sse_error(exc.status, str(exc), exc.code)
                return
            if response.status_code >= 400:
                detail = _upstream_message(upstream.read_all(response, backend))
                yield sse_error(
                    response.status_code, f"{label} answered {response.status_code}: {detail}", "upstream_status"
                )
                return
            self.scaler.touch(ticket.key, time.time())  # held since before the start: busy from now
            watch = DisconnectWatch(environ, response.close)
            try:
                chunks = raw_chunks(response) if response.is_stream_consumed else response.iter_bytes()
                yield from self._busy(chunks, ticket.key)
            except httpx.HTTPError as exc:
                if watch.gone:
                    return
                self.metrics.upstream_errors.labels(label, "stream_broken").inc()
                yield sse_error(502, f"the model backend broke the stream: {exc}", "upstream_stream_broken")
            finally:
                watch.stop()
        except UpstreamError as exc:
            yield sse_error(exc.status, str(exc), exc.code)
        finally:
            ticket.release()
            if response is not None:
                response.close()
                self.scaler.touch(ticket.key, time.time())
            if backend is not None:
                upstream.release(backend)

    # ----- waiting for memory, as the client's choice -----
    def _queue(
        self,
        model: Model,
        label: str,
        decision: Decision,
        stream: bool,
        environ: dict[str, Any],
        again: Callable[..., Answer],
        body_bytes: int,
    ) -> Answer | None:
        """Hold a request that does not fit in its pool's line when `X-IBC-Max-Wait` (or the model's
        max_wait) asks for it, then try `again` (the cold path, with the place); None: no wait, the 429 now."""
        try:
            wait = parse_max_wait(environ.get("HTTP_X_IBC_MAX_WAIT"), model.max_wait_seconds)
        except ValueError as exc:
            return self._bad(str(exc), "invalid_header", "X-IBC-Max-Wait")
        if wait <= 0:
            return None
        try:
            charge = self.cold.charge(body_bytes)
        except QueueFull as exc:
            return self._queue_full(label, exc)
        try:
            place = self.line.join(decision.pool, label, model.priority)
        except LineFull as exc:
            charge.release()
            return self._queue_full(label, exc)

        def start() -> Answer:
            charge.release()  # the cold path's own place counts the body from here
            return again(place=place, counted=stream)  # a stream was counted when its 200 went out

        replicas = decision.replicas_to
        turns = self.line.turns(
            place,
            room=lambda: self._has_room(model.key, replicas),
            wait_seconds=wait,
            check_seconds=self.settings.disconnect_check_seconds,
            gone=lambda: client_gone(environ),
        )
        if stream:
            self.metrics.count_request(label, 200)
            expected = functools.partial(self._expected_start, model, replicas)
            return 200, list(SSE_HEADERS), self._queued_stream(place, charge, turns, label, start, expected)
        try:
            with place:
                outcome = [t for t in turns if isinstance(t, str)][-1]
                if outcome == "closing":
                    return self._closing_answer(label)
                if outcome == "gone":
                    self.metrics.count_request(label, CLIENT_CLOSED)
                    body = error_body(503, "client closed the connection while waiting", "client_closed")
                    return _json_answer(503, body)
                # Its turn (or its wait ran out): decide again; a start that still does not fit is the 429.
                return start()
        finally:
            charge.release()

    def _queue_full(self, label: str, exc: Exception, counted: bool = False) -> Answer:
        self.metrics.reject(label, "queue_full")
        self._count(label, 503, counted)
        retry = str(max(1, int(self.settings.progress_interval_seconds)))
        return _json_answer(503, error_body(503, f"{exc}; retry shortly", "queue_full"), [("Retry-After", retry)])

    def _expected_start(self, model: Model, replicas: int) -> int | None:
        """Seconds until the model could be serving, by the budget's estimates: when the memory frees
        (cooldowns ending, stops under way) plus the model's startup estimate; None when unknown (a
        blocking model has no cooldown)."""
        now = time.time()
        try:
            decision = decide_scale(self.scaler.view(), model.key, replicas, now)
        except UnknownModelError:
            return None
        if decision.allowed:
            wait = 0
        elif decision.retry_after_seconds <= 0 or any(
            b.free_in_seconds is None for b in decision.blocking[: decision.retry_blocking]
        ):
            return None
        else:
            wait = decision.retry_after_seconds
        return wait + math.ceil(model.startup_seconds)

    def _has_room(self, key: str, replicas: int) -> bool:
        decision = decide_scale(self.scaler.view(), key, replicas, time.time())
        return decision.allowed or self._may_make_room(key, replicas)

    def _queued_stream(
        self,
        place: Place,
        charge: Charge,
        turns: Iterator[tuple[int, int] | Outcome],
        label: str,
        start: Callable[[], Answer],
        expected: Callable[[], int | None],
    ) -> Iterator[bytes]:
        """SSE for a streaming request waiting in line: its position and expected start as comments, then
        the cold path's stream. The estimate is the budget's for the first in line; behind it, a lower bound."""
        try:
            outcome: Outcome = "timeout"
            for turn in turns:
                if isinstance(turn, tuple):
                    position, length = turn
                    comment = f": waiting for memory for {label}: position {position} of {length}"
                    seconds = expected() if position else None
                    if seconds is not None:
                        comment += (
                            f"; expected start in about {seconds}s" if position == 1 else f"; not before {seconds}s"
                        )
                    yield f"{comment}\n\n".encode()
                else:
                    outcome = turn
            if outcome == "gone":
                return
            if outcome == "closing":
                yield self._closing_event(label)
                return
            status, _, body = start()
            if status == 200:
                yield from body
                return
            answer = json.loads(b"".join(body))
            error = answer["error"] if isinstance(answer.get("error"), dict) else answer
            yield sse_error(status, str(error.get("message", "")), str(error.get("code") or answer.get("error")))
        finally:
            place.release()
            charge.release()


def _error_code(body: bytes) -> str | None:
    """The `code` of an error body we built (the refusal's reason in the access log)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "") or None
    return str(error) if error else None


def _upstream_message(body: bytes) -> str:
    """The message of an upstream error body, whatever its shape, kept short."""
    try:
        parsed = json.loads(body)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
            return str(parsed["message"])[:500]
    except (ValueError, RecursionError):
        pass
    return body[:500].decode("utf-8", "replace")


def proxy_of(app: Flask) -> ProxyApp:
    """The :class:`ProxyApp` behind an app `create_app` built: its auth hook (`require_key`) and metrics
    registry are the public way to add routes and collectors (local mode does)."""
    proxy = app.extensions.get("ibc_proxy")
    if not isinstance(proxy, ProxyApp):
        raise TypeError("not an app built by proxy.app.create_app")
    return proxy


def create_app(
    settings: ProxySettings,
    scaler: Scaler,
    *,
    transport: httpx.BaseTransport | None = None,
    metrics: ProxyMetrics | None = None,
    source: str = "ibc proxy",
) -> Flask:
    """The proxy as a Flask app; `app.extensions["ibc_proxy"]` is its :class:`ProxyApp` (tests read it).

    `source` names the process in `GET /status` (`ibc proxy` or `ibc local`).
    """
    proxy = ProxyApp(settings, scaler, transport=transport, metrics=metrics)
    app = Flask("ibc-proxy")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["ibc_proxy"] = proxy
    add_probes(app, proxy.not_ready)
    add_metrics(app, proxy.metrics.registry)
    app.add_url_rule("/v1/models", "list_models", proxy.require_key(proxy.list_models), methods=["GET"])
    app.add_url_rule("/v1/models/<path:ref>", "get_model", proxy.require_key(proxy.get_model), methods=["GET"])
    add_status_routes(app, proxy, source=source)
    # POST /v1/* is answered by `proxy.wsgi` before Flask sees it (see ProxyApp.wsgi); the rule stays
    # so Flask answers other methods on these paths with 405, and serves the route if ever reached.
    app.add_url_rule(
        "/v1/<path:endpoint>",
        "post",
        lambda endpoint: Response.from_app(proxy.wsgi, request.environ),
        methods=["POST"],
    )
    flask_wsgi = app.wsgi_app

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "POST" and environ.get("PATH_INFO", "").startswith("/v1/"):
            return proxy.wsgi(environ, start_response)
        return flask_wsgi(environ, start_response)

    app.wsgi_app = access_logged(wsgi)  # type: ignore[method-assign]

    add_json_errors(app, _render_error, service="proxy", max_body_bytes=settings.max_body_bytes)

    @app.errorhandler(ScalerUnavailable)
    def scaler_unavailable(exc: ScalerUnavailable) -> Response:
        log.exception("the scaler failed on %s %s", request.method, request.path)
        return error_response(503, f"the scaler is unavailable: {exc}", "scaler_unavailable")

    return app
