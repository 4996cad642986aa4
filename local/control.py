"""Manual start and stop in local mode: `POST /models/{name}/start` and `POST /models/{name}/stop`.

A start is the request path's start without a request: the local scaler's `scale_up`, which decides
with `budget.decide_scale` (a refusal is the same explained 429, and becomes the model's last refusal
in `GET /status`). A stop is the scaler's `stop_model`, the path its cooldown takes. Added through the
proxy's public hooks (`proxy_of`, `require_key`); in a cluster `ibc stop` scales the InferenceModel to
0 through the API instead, so the proxy has no such routes.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from flask import Flask, Response, request

from budget import Model
from proxy.app import error_response, proxy_of, too_many_answer
from proxy.scaler import ScaleDenied, ScalerUnavailable

JSON = "application/json"


def _json(status: int, body: object) -> Response:
    return Response(json.dumps(body), status, mimetype=JSON)


def add_control_routes(app: Flask, scaler: Any) -> None:
    """Add the start and stop routes to an app `proxy.app.create_app` built around the local scaler
    (same API-key rule as /v1)."""
    proxy = proxy_of(app)
    limit = proxy.settings.cold_start_timeout_seconds

    def find(name: str) -> Model | Response:
        """The model, or the 404 answer."""
        model = proxy.router.find(name)
        if model is None:
            return error_response(404, f"The model `{name}` does not exist.", "model_not_found", "model")
        return model

    def start(name: str) -> Response:
        model = find(name)
        if isinstance(model, Response):
            return model
        raw_wait = request.args.get("wait", "0")
        try:
            wait = float(raw_wait)
        except ValueError:
            wait = -1.0
        if not (0 <= wait <= limit) or not math.isfinite(wait):
            message = f"`wait` must be seconds between 0 and {limit:g}, got {raw_wait!r}"
            return error_response(400, message, "invalid_wait", "wait")
        key, label = model.key, model.model_name or model.name
        try:
            scaler.scale_up(key, max(1, model.replicas))
        except ScaleDenied as exc:
            proxy.refusals.record(exc.decision)
            proxy.metrics.reject(label, "scale_denied")
            status, headers, body = too_many_answer(exc.decision)
            return Response(b"".join(body), status, headers=headers)
        except ScalerUnavailable as exc:
            return error_response(503, f"could not start {label}: {exc}", "scaler_unavailable")
        scaler.touch(key, time.time())  # asked for by hand: its cooldown counts from now
        ready = bool(scaler.backends(key))
        deadline = time.monotonic() + wait
        while not ready and (remaining := deadline - time.monotonic()) > 0:
            try:
                ready = bool(scaler.wait_backends(key, min(remaining, 0.5)))
            except ScalerUnavailable as exc:
                return error_response(503, f"could not start {label}: {exc}", "scaler_unavailable")
        return _json(200 if ready else 202, {"model": label, "key": key, "state": scaler.state(key)})

    def stop(name: str) -> Response:
        model = find(name)
        if isinstance(model, Response):
            return model
        stopping = scaler.stop_model(model.key)
        body = {"model": model.model_name or model.name, "key": model.key, "state": scaler.state(model.key)}
        return _json(202 if stopping else 200, {**body, "stopping": stopping})

    app.add_url_rule("/models/<name>/start", "model_start", proxy.require_key(start), methods=["POST"])
    app.add_url_rule("/models/<name>/stop", "model_stop", proxy.require_key(stop), methods=["POST"])
