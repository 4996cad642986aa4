"""Observed memory of model pods, from a pluggable source: Prometheus, the metrics API, or none.

Why this module exists: declared memory is what the budget counts; observed memory only advises
(status, metrics, log hints), so the source is a plug. On discrete GPUs the useful number is the
framebuffer a pod uses (DCGM exporter's ``DCGM_FI_DEV_FB_USED``, MiB, through Prometheus); on
unified-memory nodes (GH200, GB10, Apple-like SoCs) GPU memory *is* the container's memory, which
the metrics API (``metrics.k8s.io/v1beta1``) reports. Each source answers "bytes used per pod now";
the controller keeps the peak.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from budget import BudgetError, parse_quantity
from budget.objects import LABEL_MODEL
from controller.errors import ControllerError, ObservationError
from controller.kube import Kube
from kubeview.api import ApiError

log = logging.getLogger(__name__)

# Bytes used by one pod's GPUs: DCGM reports MiB per GPU; sum the pod's GPUs, convert to bytes.
DEFAULT_PROMETHEUS_QUERY = 'sum(DCGM_FI_DEV_FB_USED{namespace="{namespace}",pod="{pod}"}) * 1048576'
PLACEHOLDERS = ("{namespace}", "{pod}", "{model}")


class MemorySource(Protocol):
    """Answers: how many bytes does each of these pods of one model use right now?"""

    name: str

    def observe(self, namespace: str, model: str, pods: Sequence[str]) -> dict[str, int]:
        """pod name -> bytes in use; pods without a measurement are left out. Raises ObservationError."""
        ...


class NoSource:
    """Observation disabled: status keeps only declaredMemory."""

    name = "none"

    def observe(self, namespace: str, model: str, pods: Sequence[str]) -> dict[str, int]:
        return {}


def render_query(template: str, *, namespace: str, pod: str, model: str) -> str:
    """Fill `{namespace}`, `{pod}`, `{model}` (plain replacement: PromQL's own braces stay as they are)."""
    values = {"{namespace}": namespace, "{pod}": pod, "{model}": model}
    out = template
    for placeholder, value in values.items():
        out = out.replace(placeholder, value.replace("\\", "\\\\").replace('"', '\\"'))
    return out


def check_query_template(template: str) -> None:
    """A template must mention at least `{pod}` or `{model}`, else every pod would get the same number."""
    if "{pod}" not in template and "{model}" not in template:
        raise ValueError("the Prometheus query template must contain {pod} or {model}")


def parse_prometheus_value(body: Any) -> int | None:
    """Bytes from an `/api/v1/query` answer: the sum of a vector's samples or a scalar; None when empty."""
    if not isinstance(body, Mapping) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, Mapping) else None
        raise ObservationError(f"Prometheus query failed: {error or 'not a Prometheus API answer'}")
    data = body.get("data")
    if not isinstance(data, Mapping):
        raise ObservationError("Prometheus answer without data")
    kind, result = data.get("resultType"), data.get("result")
    samples: list[Any]
    if kind == "vector" and isinstance(result, list):
        samples = [r.get("value") for r in result if isinstance(r, Mapping)]
    elif kind == "scalar":
        samples = [result]
    else:
        raise ObservationError(f"Prometheus answered a {kind!r}; the query must return an instant vector")
    if not samples:
        return None
    total = 0.0
    for sample in samples:
        if not isinstance(sample, list) or len(sample) != 2:
            raise ObservationError(f"malformed Prometheus sample {sample!r}")
        try:
            value = float(sample[1])
        except (TypeError, ValueError) as exc:
            raise ObservationError(f"Prometheus sample value {sample[1]!r} is not a number") from exc
        if not math.isfinite(value) or value < 0:
            raise ObservationError(f"Prometheus sample value {sample[1]!r} is not a byte count")
        total += value
    return math.ceil(total)


class PrometheusSource:
    """One instant query per pod against the Prometheus HTTP API; the query must return bytes."""

    name = "prometheus"

    def __init__(
        self,
        url: str,
        query_template: str = DEFAULT_PROMETHEUS_QUERY,
        *,
        timeout_seconds: float = 5.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        check_query_template(query_template)
        self.url = url.rstrip("/")
        self.query_template = query_template
        self._client = httpx.Client(timeout=timeout_seconds, transport=transport)

    def query(self, promql: str) -> int | None:
        """Run one instant query; bytes or None when Prometheus has no sample."""
        try:
            resp = self._client.get(f"{self.url}/api/v1/query", params={"query": promql})
        except httpx.HTTPError as exc:
            raise ObservationError(f"Prometheus at {self.url} unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError as exc:
            raise ObservationError(f"Prometheus answered HTTP {resp.status_code} without JSON") from exc
        return parse_prometheus_value(body)

    def observe(self, namespace: str, model: str, pods: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        if "{pod}" not in self.query_template:
            value = self.query(render_query(self.query_template, namespace=namespace, pod="", model=model))
            if value is not None and pods:
                out[pods[0]] = value  # a per-model query: one number standing for the busiest replica
            return out
        for pod in pods:
            value = self.query(render_query(self.query_template, namespace=namespace, pod=pod, model=model))
            if value is not None:
                out[pod] = value
        return out

    def close(self) -> None:
        self._client.close()


def pod_usage_bytes(item: Mapping[str, Any]) -> int:
    """Sum of `containers[].usage.memory` of one PodMetrics item."""
    total = 0
    for container in item.get("containers") or []:
        memory = ((container or {}).get("usage") or {}).get("memory")
        if memory is None:
            continue
        try:
            total += parse_quantity(memory, field="usage.memory")
        except BudgetError as exc:
            raise ObservationError(f"metrics API: {exc}") from exc
    return total


class MetricsApiSource:
    """Container memory from `metrics.k8s.io/v1beta1` (metrics-server): one list call per model."""

    name = "metrics-api"

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def observe(self, namespace: str, model: str, pods: Sequence[str]) -> dict[str, int]:
        path = f"/apis/metrics.k8s.io/v1beta1/namespaces/{quote(namespace)}/pods"
        try:
            body = self.kube.request("GET", path, query={"labelSelector": f"{LABEL_MODEL}={model}"})
        except (ControllerError, ApiError) as exc:
            raise ObservationError(f"metrics API: {exc}") from exc
        wanted = set(pods)
        out: dict[str, int] = {}
        for item in body.get("items") or []:
            name = ((item or {}).get("metadata") or {}).get("name")
            if name in wanted:
                out[name] = pod_usage_bytes(item)
        return out
