"""The extender's HTTP edge: kube-scheduler's `POST /filter`, `/prioritize`, `/bind`, plus probes and metrics.

The edge checks the envelope first (method, `Content-Type: application/json`, size cap, JSON, field
types), then asks :class:`extender.service.Extender` and serializes its answer. Bad requests get a
4xx with `{"Error": "..."}` (the key the scheduler's verbs use): 400 malformed, 413 too large, 415
not JSON; never a 500 for bad input. "Does not fit" is a 200 with no nodes and stable reasons.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from extender.metrics import Metrics
from extender.reservations import ReservationBook
from extender.service import Extender
from extender.settings import Settings
from extender.source import CacheSource
from extender.wire import WireError, filter_result, host_priorities, parse_binding_args, parse_extender_args
from serving.http import add_json_errors, add_metrics, add_probes, json_response

log = logging.getLogger(__name__)


class EnvelopeError(Exception):
    """A request refused before any decision; carries its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """The extender's error body: `{"Error": message}`, the key the scheduler's verbs read."""
    return json_response({"Error": message}, status, headers)


def _read_capped(max_bytes: int) -> bytes:
    """Read at most `max_bytes` (a chunked body has no Content-Length to check up front)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = request.stream.read(min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise EnvelopeError(413, f"request body exceeds the limit of {max_bytes} bytes")


def _read_json(max_bytes: int) -> Any:
    """The request body as JSON, or an EnvelopeError saying exactly what is wrong with it."""
    if request.mimetype != "application/json":
        got = request.content_type or "none"
        raise EnvelopeError(415, f"Content-Type must be application/json, got {got}")
    length = request.content_length
    if length is not None and length > max_bytes:
        raise EnvelopeError(413, f"request body is {length} bytes; the limit is {max_bytes} bytes")
    data = _read_capped(max_bytes)
    if not data:
        raise EnvelopeError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise EnvelopeError(400, f"request body is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise EnvelopeError(
            400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise EnvelopeError(400, "request body is nested too deeply to be an extender request") from exc


def create_app(
    settings: Settings,
    source: CacheSource,
    *,
    metrics: Metrics | None = None,
    book: ReservationBook | None = None,
) -> Flask:
    """The extender app: one reservation book and one metrics registry per app (per process)."""
    app = Flask("extender")
    # One byte over the cap, so reading past the cap shows the body is too large (werkzeug would
    # silently truncate a chunked body at exactly MAX_CONTENT_LENGTH).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1
    metrics = metrics or Metrics()
    extender = Extender(settings, source, book=book, metrics=metrics)
    app.extensions["ibc_extender"] = extender

    def envelope() -> Any:
        try:
            return _read_json(settings.max_request_bytes)
        except RequestEntityTooLarge as exc:
            raise EnvelopeError(413, f"request body exceeds the limit of {settings.max_request_bytes} bytes") from exc

    @app.errorhandler(EnvelopeError)
    def _envelope_error(exc: EnvelopeError) -> Response:
        metrics.bad_requests.labels(request.path.strip("/") or "root").inc()
        log.info("refused %s %s: %s", request.method, request.path, exc.message)
        return _error(exc.status, "bad_request", exc.message)

    @app.errorhandler(WireError)
    def _wire_error(exc: WireError) -> Response:
        metrics.bad_requests.labels(request.path.strip("/") or "root").inc()
        log.info("refused %s %s: %s", request.method, request.path, exc)
        return _error(400, "bad_request", str(exc))

    add_json_errors(app, _error, service="extender", max_body_bytes=settings.max_request_bytes)
    add_probes(app, lambda: None if source.synced else "the cluster view has not synced yet")
    add_metrics(app, metrics.registry)

    @app.post("/filter")
    def filter_() -> Response:
        started = time.perf_counter()
        args = parse_extender_args(envelope())
        answer = extender.filter(args)
        body = filter_result(args, answer.passed, answer.failed, answer.unresolvable, answer.error)
        response = json_response(body)
        metrics.filter_seconds.labels(args.form).observe(time.perf_counter() - started)
        metrics.filter_nodes.labels(args.form).observe(len(args.node_names))
        return response

    @app.post("/prioritize")
    def prioritize() -> Response:
        args = parse_extender_args(envelope())
        return json_response(host_priorities(extender.prioritize(args)))

    @app.post("/bind")
    def bind() -> Response:
        args = parse_binding_args(envelope())
        if not settings.bind_pods:
            message = "this extender was started with --no-bind; remove bindVerb from the scheduler config"
            return json_response({"Error": message})
        answer = extender.bind(args.pod_namespace, args.pod_name, args.pod_uid, args.node)
        return json_response({"Error": answer.error})

    @app.get("/debug/reservations")
    def reservations() -> Response:
        now = extender.clock()
        held = [
            {
                "uid": r.uid,
                "pod": r.pod,
                "model": r.model,
                "node": r.node,
                "memoryBytes": r.memory_bytes,
                "expiresInSeconds": round(r.expires_at - now, 3),
            }
            for r in extender.book.live(now)
        ]
        return json_response({"reservations": held})

    @app.get("/debug/view")
    def view() -> Response:
        """Per node: capacity, memory held by bound pods and by reservations, what is free, and per device."""
        now = extender.clock()
        with extender.book.locked():
            current = source.view().with_reservations(extender.book.live(now))
        placed: dict[str, int] = {}
        for p in current.placements:
            placed[p.node] = placed.get(p.node, 0) + p.memory_bytes
        reserved: dict[str, int] = {}
        for r in current.live_reservations(now):
            reserved[r.node] = reserved.get(r.node, 0) + r.memory_bytes
        free = current.free_bytes(now)
        device_free = current.device_free(now)
        nodes = {
            n.name: {
                "capacityBytes": n.capacity_bytes,
                "capacitySource": n.capacity_source,
                "boundBytes": placed.get(n.name, 0),
                "reservedBytes": reserved.get(n.name, 0),
                "freeBytes": free.get(n.name),
                "devices": [
                    {
                        "index": d.index,
                        "kind": d.kind,
                        "profile": d.profile,
                        "product": d.product,
                        "capacityBytes": d.memory_bytes,
                        "freeBytes": device_free.get(n.name, {}).get(d.index),
                    }
                    for d in n.devices
                ],
            }
            for n in current.nodes
        }
        return json_response({"synced": source.synced, "nodes": nodes})

    return app
