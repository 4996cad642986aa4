"""Prometheus metrics of the proxy, created per app so each test (and each gunicorn worker) gets its own.

Under several gunicorn workers `serving.runner` sets `PROMETHEUS_MULTIPROC_DIR` before the fork; the
metrics then write to shared files and `/metrics` merges every worker's. The hot path caches labelled
children per (model, status) so one request costs a dict lookup and an increment, not a `labels()` call.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
COLD_START_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 450, 600, 900)


class ProxyMetrics:
    """The proxy's counters, histograms and gauges, registered in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ibc_proxy_requests", "Requests answered, by model and HTTP status.", ["model", "status"], registry=r
        )
        self.rejections = Counter(
            "ibc_proxy_rejections",
            "Requests refused before reaching a backend, by model and reason "
            "(insufficient_memory, scale_denied, queue_full, cold_start_timeout, scaler_unavailable).",
            ["model", "reason"],
            registry=r,
        )
        self.cold_start = Histogram(
            "ibc_proxy_cold_start_seconds",
            "From the first held request of a cold model to its first ready backend.",
            ["model"],
            buckets=COLD_START_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "ibc_proxy_queue_depth",
            "Requests held while their model starts.",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.upstream_latency = Histogram(
            "ibc_proxy_upstream_latency_seconds",
            "From sending a request to a backend to its response headers.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "ibc_proxy_upstream_errors",
            "Backend calls that failed (unreachable, timeout, broken stream), by model and kind.",
            ["model", "kind"],
            registry=r,
        )
        self.prefix_routes = Counter(
            "ibc_proxy_prefix_routes",
            "Requests routed by prefix affinity, by model and outcome (affinity: to the replica that served "
            "the prefix last; new: a prefix no replica served, to its rendezvous replica; yielded: that "
            "replica was too busy, to the least loaded).",
            ["model", "outcome"],
            registry=r,
        )
        self.backend_in_flight = Gauge(
            "ibc_proxy_backend_in_flight",
            "Requests sent to one backend (a replica's base URL) and not finished yet: the load layer's "
            "per-replica signal in a cluster, summed over every proxy by the controller.",
            ["backend"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self._lock = threading.Lock()
        self._in_flight_children: dict[str, Gauge] = {}
        self._route_children: dict[tuple[str, str], Counter] = {}
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}

    def count_request(self, model: str, status: int) -> None:
        """One answered request (the hot path: a cached child, no label parsing)."""
        child = self._request_children.get((model, status))
        if child is None:
            with self._lock:
                child = self.requests.labels(model, str(status))
                self._request_children[(model, status)] = child
        child.inc()

    def count_in_flight(self, backend: str, delta: int) -> None:
        """One request more (+1) or less (-1) in flight to `backend` (the hot path: a cached child)."""
        children = self._in_flight_children
        (children.get(backend) or self._new_child(children, backend, self.backend_in_flight)).inc(delta)

    def _new_child(self, children: dict[str, Gauge], key: str, metric: Gauge) -> Gauge:
        with self._lock:
            child = children[key] = metric.labels(key)
        return child

    def count_route(self, model: str, outcome: str) -> None:
        """One request routed by prefix affinity (a cached child, as for count_request)."""
        child = self._route_children.get((model, outcome))
        if child is None:
            with self._lock:
                child = self.prefix_routes.labels(model, outcome)
                self._route_children[(model, outcome)] = child
        child.inc()

    def observe_upstream(self, model: str, seconds: float) -> None:
        child = self._latency_children.get(model)
        if child is None:
            with self._lock:
                child = self.upstream_latency.labels(model)
                self._latency_children[model] = child
        child.observe(seconds)

    def reject(self, model: str, reason: str) -> None:
        self.rejections.labels(model, reason).inc()
