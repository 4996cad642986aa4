"""A replica's own load report: vLLM's Prometheus metrics, read from its `/metrics`.

The load layer (:mod:`budget.load`) works from what the proxy counts (requests in flight) with any
backend; a vLLM replica also says how long its queue is and how full its KV cache is. Local mode's
scaler and the controller read them here, with prometheus_client's own text parser. Names are
vLLM's: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`
(before vLLM 0.10, `vllm:gpu_cache_usage_perc`; both are read, the new one wins).
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
T = TypeVar("T")

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
IN_FLIGHT = "ibc_proxy_backend_in_flight"  # proxy/metrics.py: requests each proxy has in flight per backend

SCRAPE_TIMEOUT_SECONDS = 0.5
"""A replica that cannot say its load in half a second is busy enough: the proxy's count stands in."""

MAX_BODY_BYTES = 4 * 2**20
"""vLLM's exposition is tens of kB (histograms per model); anything far larger is not a replica's."""

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via HTTP(S)_PROXY from the env


@dataclass(frozen=True)
class ReplicaMetrics:
    """What one replica reports; None where it does not (summed over its label sets, e.g. several models)."""

    waiting: int | None = None
    running: int | None = None
    kv_cache_usage: float | None = None


def parse_metrics(text: str) -> ReplicaMetrics:
    """vLLM's gauges from Prometheus text; a malformed exposition raises ValueError."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (WAITING, RUNNING, KV_USAGE, KV_USAGE_OLD):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    kv = sums.get(KV_USAGE, sums.get(KV_USAGE_OLD))
    return ReplicaMetrics(
        waiting=int(sums[WAITING]) if WAITING in sums else None,
        running=int(sums[RUNNING]) if RUNNING in sums else None,
        kv_cache_usage=kv,
    )


def parse_in_flight(text: str) -> dict[str, int]:
    """The proxy's `ibc_proxy_backend_in_flight{backend=...}` per backend URL; malformed text raises ValueError."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            backend = sample.labels.get("backend")
            if sample.name == IN_FLIGHT and backend:
                out[backend] = out.get(backend, 0) + max(0, int(sample.value))
    return out


def _read(base_url: str, parse: Callable[[str], T], timeout_seconds: float) -> T | None:
    """GET `<base_url>/metrics` and parse it; None when it does not answer, is too large or unreadable."""
    url = base_url.rstrip("/") + "/metrics"
    try:
        with _DIRECT.open(url, timeout=timeout_seconds) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        log.debug("no metrics from %s: %s", url, exc)
        return None
    if len(body) > MAX_BODY_BYTES:
        return None
    try:
        return parse(body.decode("utf-8", "replace"))
    except ValueError as exc:
        log.debug("unreadable metrics from %s: %s", url, exc)
        return None


def scrape(base_url: str, *, timeout_seconds: float = SCRAPE_TIMEOUT_SECONDS) -> ReplicaMetrics | None:
    """A replica's vLLM gauges from `<base_url>/metrics`; None when it does not serve them (or fails to)."""
    return _read(base_url, parse_metrics, timeout_seconds)


def scrape_in_flight(base_url: str, *, timeout_seconds: float = SCRAPE_TIMEOUT_SECONDS) -> dict[str, int] | None:
    """One proxy's requests in flight per backend URL, from its `/metrics`; None when it does not answer."""
    return _read(base_url, parse_in_flight, timeout_seconds)
