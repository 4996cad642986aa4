"""The `/metrics` exposition every server answers with: its own registry, or, under several gunicorn
workers (`PROMETHEUS_MULTIPROC_DIR` set by `serving.runner`), every worker's values merged."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from budget.advice import ModelMemory

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def render(registry: CollectorRegistry, *, multiprocess: bool | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type. `multiprocess=None` follows the environment; a server
    whose metrics live in one process (the controller) passes False."""
    if multiprocess is None:
        multiprocess = bool(os.environ.get(MULTIPROC_ENV))
    if multiprocess:
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MemoryCollector(Collector):
    """The per-model memory gauges (`inference_model_memory_*`), built from the current records at each
    scrape, so a deleted model's series disappear with it; the controller and local mode both serve them.
    `current=True` adds the memory in use now (local mode samples it)."""

    def __init__(
        self,
        models: Callable[[], Iterable[ModelMemory]],
        *,
        declared_help: str = "Memory declared in the InferenceModel (spec.memory)",
        current: bool = False,
    ) -> None:
        self._models = models
        self._declared_help = declared_help
        self._current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "namespace"]
        declared = GaugeMetricFamily("inference_model_memory_declared_bytes", self._declared_help, labels=labels)
        peak = GaugeMetricFamily(
            "inference_model_memory_observed_peak_bytes", "Peak memory one replica was observed to use", labels=labels
        )
        ratio = GaugeMetricFamily(
            "inference_model_memory_utilization_ratio", "Observed peak divided by declared memory", labels=labels
        )
        now = GaugeMetricFamily(
            "inference_model_memory_observed_bytes", "Memory the largest replica uses now", labels=labels
        )
        for m in self._models():
            values = [m.name, m.namespace]
            if m.declared_bytes is not None:
                declared.add_metric(values, float(m.declared_bytes))
            if m.observed_peak_bytes is not None:
                peak.add_metric(values, float(m.observed_peak_bytes))
                if m.declared_bytes:
                    ratio.add_metric(values, m.observed_peak_bytes / m.declared_bytes)
            if m.observed_bytes is not None:
                now.add_metric(values, float(m.observed_bytes))
        yield from (declared, peak, ratio)
        if self._current:
            yield now


class ReplicasCollector(Collector):
    """The load layer's gauges: replicas a model's traffic wants and replicas the budget allows; when they
    differ the budget refuses the step (the model's status and `/v1/models` say who blocks it)."""

    def __init__(self, models: Callable[[], Iterable[tuple[str, str, int, int]]]) -> None:
        self._models = models  # (name, namespace, wanted, allowed)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "namespace"]
        wanted = GaugeMetricFamily(
            "ibc_model_replicas_wanted", "Replicas the load layer wants for the traffic it sees", labels=labels
        )
        allowed = GaugeMetricFamily(
            "ibc_model_replicas_allowed", "Of the replicas wanted, how many the memory budget allows", labels=labels
        )
        for name, namespace, want, allow in self._models():
            wanted.add_metric([name, namespace], float(want))
            allowed.add_metric([name, namespace], float(allow))
        yield from (wanted, allowed)
