"""The controller's HTTP side: Prometheus metrics, health, and per-model memory as JSON.

Why this module exists: observed memory is advice, and people and tools read advice in different
places: dashboards and alerts (the three ``inference_model_memory_*`` gauges), scripts
(``GET /models/{name}/metrics``) and probes (``/livez`` (alias ``/healthz``), ``/readyz``). The gauges
(`serving.metrics.MemoryCollector`) are produced at scrape time from the same `budget.ModelMemory`
records the JSON endpoint serves, so a deleted model's series disappear with it and the two never
disagree.

The server is `serving.runner.serve_in_thread` (werkzeug, a thread per request) inside the controller
process, not gunicorn: the records live in the controller's memory (its cache and observations), which
forked workers could not see, and a scrape endpoint needs no worker pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from budget.advice import ModelMemory, metrics_body
from serving.http import add_json_errors, add_metrics, add_probes, json_response


class ControllerMetrics:
    """The controller's own health: reconciles, writes, scale-downs, observation errors, leadership."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconciles = Counter(
            "inference_controller_reconcile", "Reconciles by result", ["result"], registry=registry
        )
        self.reconcile_seconds = Histogram(
            "inference_controller_reconcile_duration_seconds",
            "Time one reconcile took",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.writes = Counter(
            "inference_controller_writes", "Writes to the API server by object kind", ["kind"], registry=registry
        )
        self.scale_to_zero = Counter(
            "inference_controller_idle_scale_to_zero", "Models scaled to zero after their cooldown", registry=registry
        )
        self.observation_errors = Counter(
            "inference_controller_observation_errors",
            "Failed observed-memory queries",
            ["source"],
            registry=registry,
        )
        self.leader = Gauge("inference_controller_leader", "1 when this replica is the leader", registry=registry)
        self.queue_depth = Gauge(
            "inference_controller_queue_depth", "Model keys waiting in the work queue", registry=registry
        )


@dataclass
class MetricsSettings:
    """What the HTTP side reads: the records, the registry, and whether the controller is ready."""

    models: Callable[[], Sequence[ModelMemory]]
    registry: CollectorRegistry
    ready: Callable[[], bool] = lambda: True
    leader: Callable[[], bool] = lambda: True


def _error(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response({"error": code, "message": message}, status, headers)


def create_app(settings: MetricsSettings) -> Flask:
    """The metrics/health/model-memory app (a fresh one per call, for tests)."""
    app = Flask("ibc-controller")
    add_json_errors(app, _error, service="controller")
    add_metrics(app, settings.registry, multiprocess=False)
    add_probes(
        app,
        lambda: None if settings.ready() else "cache not synced yet",
        lambda: {"role": "leader" if settings.leader() else "standby"},
    )

    def _find(namespace: str | None, name: str) -> Response:
        found = [m for m in settings.models() if m.name == name and (namespace is None or m.namespace == namespace)]
        if not found:
            where = f" in namespace {namespace!r}" if namespace else ""
            return _error(404, "not_found", f"no InferenceModel named {name!r}{where}")
        if len(found) > 1:
            spaces = ", ".join(sorted(m.namespace for m in found))
            return _error(
                400,
                "ambiguous",
                f"InferenceModel {name!r} exists in namespaces {spaces}: "
                f"add ?namespace= or use /models/NS/{name}/metrics",
            )
        return json_response(metrics_body(found[0]))

    @app.get("/models/<name>/metrics")
    def model_metrics(name: str) -> Response:
        namespace = request.args.get("namespace") or None
        return _find(namespace, name)

    @app.get("/models/<namespace>/<name>/metrics")
    def namespaced_model_metrics(namespace: str, name: str) -> Response:
        return _find(namespace, name)

    return app
