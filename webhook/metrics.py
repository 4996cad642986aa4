"""Prometheus metrics of the admission webhook: how often it allows and denies, and how fast.

Each app gets its own registry (tests create many apps). Under gunicorn with several workers,
`serving.runner` sets `PROMETHEUS_MULTIPROC_DIR`; values then live in the shared directory and `/metrics`
aggregates every worker.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# A review answered from the cache takes well under a millisecond; one that commits to the ledger adds
# a GET and a PUT to the API server (a few ms); the tail shows conflicts and retries.
LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The webhook's collectors, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.reviews = Counter(
            "ibc_webhook_reviews_total",
            "Admission reviews answered, by resource (with subresource), result and reason.",
            ["resource", "result", "reason"],
            registry=self.registry,
        )
        self.review_seconds = Histogram(
            "ibc_webhook_review_duration_seconds",
            "Time to answer one review, by resource (with subresource).",
            ["resource"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "ibc_webhook_queue_seconds",
            "Time a review waited for a worker thread before the webhook saw it (counts against the "
            "API server's timeoutSeconds).",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0),
            registry=self.registry,
        )
        self.ledger_conflicts = Counter(
            "ibc_webhook_ledger_conflicts_total",
            "Ledger writes that lost the optimistic-concurrency race (409) and were decided again.",
            registry=self.registry,
        )
        self.bad_requests = Counter(
            "ibc_webhook_bad_requests_total",
            "Bodies refused with HTTP 400 because they were not an AdmissionReview with a uid.",
            registry=self.registry,
        )
