"""`GET /status` and the status page (`GET /`): the budget as the proxy sees it, for people.

The document is `budget.status.build_status` on the scaler's view plus what only the request path
knows: requests held for each model's start, the waiting-room limit, and the last refusal of each
model (recorded here by the request path). Under several gunicorn workers each worker answers with
its own counters (its held requests and refusals); local mode runs one worker, so it shows them all.

The page is one self-contained HTML file (no framework, no CDN, no build step) that polls `/status`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from flask import Flask, Response

from budget import Decision
from budget.status import Counters, Refusal, build_status, observed_peaks, status_body

# The ProxyApp these functions read (its scaler, waiting rooms, settings, refusals and auth hook) is
# typed Any: proxy.app imports this module, and a type-only import back would be an import cycle.
ProxyApp = Any

PAGE_RESOURCE = "status_page.html"
# The page is static: caching it briefly is harmless; the data comes from /status, never cached.
PAGE_HEADERS = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]


class RefusalLog:
    """The last refusal per model key (thread-safe); the request path records, `/status` reads."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, Refusal] = {}

    def record(self, decision: Decision) -> None:
        with self._lock:
            self._last[decision.model_key] = Refusal(self._clock(), decision)

    def snapshot(self) -> dict[str, Refusal]:
        with self._lock:
            return dict(self._last)


def counters(proxy: ProxyApp) -> Counters:
    """What the request path and the scaler know beyond the view (states, held, refusals, peaks)."""
    scaler = proxy.scaler
    view = scaler.view()
    states = {key: scaler.state(key) for key in view.models}
    peaks: dict[str, int] = {}
    memory = getattr(scaler, "memory", None)  # local mode: the runtime samples each process
    cache = getattr(scaler, "cache", None)  # Kubernetes: the controller writes status.observedPeakMemory
    if callable(memory):
        for key in view.models:
            peak = memory(key).observed_peak_bytes
            if peak is not None:
                peaks[key] = peak
    elif cache is not None and callable(getattr(cache, "objects", None)):
        peaks = observed_peaks(cache.objects("InferenceModel"))
    return Counters(
        states=states,
        held=proxy.cold.waiting(),
        queue_limit=proxy.settings.queue_size,
        refusals=proxy.refusals.snapshot(),
        observed_peak_bytes=peaks,
    )


def status_document(proxy: ProxyApp, source: str, now: float | None = None) -> dict[str, Any]:
    """The JSON of `GET /status`."""
    view = proxy.scaler.view()
    doc = build_status(view, time.time() if now is None else now, counters(proxy), source=source)
    body = status_body(doc)
    details = getattr(proxy.scaler, "details", None)  # optional (see proxy/scaler.py): local mode's `log`
    if details is not None:
        for model in body["models"]:
            model.update(details(model["key"]))
    body["waiting"] = dict(proxy.line.snapshot())  # pool -> models of the requests waiting for memory, in order
    return body


def page_html() -> bytes:
    """The status page, read from the package (served as it is)."""
    return resources.files("proxy").joinpath(PAGE_RESOURCE).read_bytes()


def add_status_routes(app: Flask, proxy: ProxyApp, *, source: str) -> None:
    """`GET /status` (same API-key rule as /v1) and `GET /` (the page; it holds no data itself)."""
    page = page_html()

    def status() -> Response:
        body = json.dumps(status_document(proxy, source))
        return Response(body, 200, mimetype="application/json", headers=[("Cache-Control", "no-store")])

    def index() -> Response:
        return Response(page, 200, mimetype="text/html", headers=PAGE_HEADERS)

    app.add_url_rule("/status", "status", proxy.require_key(status), methods=["GET"])
    app.add_url_rule("/", "status_page", index, methods=["GET"])
