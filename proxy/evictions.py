"""Making room: who is busy, what was evicted for whom, and the metric that counts it.

The decision is :func:`budget.plan_eviction`; each scaler acts on it its own way (local mode stops the
victims' processes under its one lock; the Kubernetes scaler scales them to 0 through `/scale`, with
resourceVersion preconditions, then asks for the requested model through the webhook). This module holds
the small pieces both share: the record of evictions and their Prometheus counter, and the busy source
through which the proxy tells a scaler which models it is serving or holding requests for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

BusySource = Callable[[], tuple[Collection[str], Collection[str]]]
"""Returns (backend URLs with requests in flight, model keys with requests held for a start)."""


def nobody_busy() -> tuple[Collection[str], Collection[str]]:
    """The busy source of a scaler not wired to a proxy (tests of the scaler alone)."""
    return (), ()


@dataclass
class EvictionLog:
    """Evictions so far, by (evicted model, model it made room for), and the last message per requester."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # requester key -> "stopping model-a (...) to make room ..."
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, evicted: list[str], for_model: str, for_key: str, message: str) -> None:
        with self._lock:
            for name in evicted:
                self.counts[(name, for_model)] = self.counts.get((name, for_model), 0) + 1
            self.notes[for_key] = message

    def note(self, for_key: str) -> str | None:
        with self._lock:
            return self.notes.get(for_key)

    def forget(self, for_key: str) -> None:
        with self._lock:
            self.notes.pop(for_key, None)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)


class EvictionCollector(Collector):
    """`ibc_evictions_total{model,for_model}`: models stopped before their cooldown to make room."""

    def __init__(self, evictions: EvictionLog) -> None:
        self._evictions = evictions

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "ibc_evictions", "Idle models stopped early to make room for another model", labels=["model", "for_model"]
        )
        for (model, for_model), count in sorted(self._evictions.snapshot().items()):
            family.add_metric([model, for_model], float(count))
        yield family
