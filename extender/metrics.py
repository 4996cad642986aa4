"""Prometheus metrics of the extender: numbers belong here and in logs, never in scheduler reasons.

Each app gets its own registry (tests create many apps). Under gunicorn with
`PROMETHEUS_MULTIPROC_DIR` set, values live in the shared directory and `/metrics` (`serving.metrics`)
aggregates them.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Filter answers in about a millisecond at 1,000 nodes (NodeNames); the tail up to a second shows
# Nodes-form requests carrying thousands of full Node objects.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The extender's collectors, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.filter_seconds = Histogram(
            "ibc_extender_filter_duration_seconds",
            "Time to answer a filter call, by request form (nodes or nodenames).",
            ["form"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.filter_nodes = Histogram(
            "ibc_extender_filter_nodes",
            "Nodes per filter call (kube-scheduler sends only the nodes its own filters left, and stops "
            "after percentageOfNodesToScore of them).",
            ["form"],
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=self.registry,
        )
        self.decisions = Counter(
            "ibc_extender_decisions_total",
            "Answers per pod: verb (filter, prioritize, bind), result and stable reason.",
            ["verb", "result", "reason"],
            registry=self.registry,
        )
        self.node_verdicts = Counter(
            "ibc_extender_node_verdicts_total",
            "Per-node filter verdicts for model pods: passed, failed or unresolvable, with the reason.",
            ["result", "reason"],
            registry=self.registry,
        )
        self.reservations = Gauge(
            "ibc_extender_reservations",
            "Reservations held: pods answered by filter or bind and not yet seen bound by the watch.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.bad_requests = Counter(
            "ibc_extender_bad_requests_total",
            "Requests refused before any decision (malformed envelope), by verb.",
            ["verb"],
            registry=self.registry,
        )

    def count_verdicts(self, counts: Iterable[tuple[tuple[str, str], int]]) -> None:
        """Add aggregated (result, reason) -> count pairs (one call per filter, not one per node)."""
        for (result, reason), count in counts:
            if count:
                self.node_verdicts.labels(result, reason or "none").inc(count)
