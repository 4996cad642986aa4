"""Right-sizing advice: declared memory against the observed peak. Advice only; nothing here changes a spec.

The controller (Kubernetes) and local mode (process RSS) both call :func:`advise` and both describe a
model with one :class:`ModelMemory` (`metrics_body` is its JSON), so their status, logs, metrics and
`GET /models/{name}/metrics` read the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from budget.quantity import format_bytes

GI = 2**30
MI = 2**20
DEFAULT_HEADROOM_PERCENT = 4.0
# Below this much over-provisioning a change is not worth a redeploy.
SIGNIFICANT_PERCENT = 3


@dataclass(frozen=True)
class SizingAdvice:
    """What the numbers say, for status fields, log hints and metrics."""

    declared_bytes: int
    observed_peak_bytes: int
    utilization_percent: int  # floor(peak / declared * 100)
    utilization_ratio: float  # peak / declared, rounded to 2 places for people, exact for metrics
    overprovisioned_percent: int  # round((declared - peak) / declared * 100); negative when under-provisioned
    recommendation_bytes: int | None  # None: keep the declared value
    recommendation: str
    hint: str | None  # a log line worth printing, or None


def _round_up(n: int) -> int:
    """A clean value people would write: whole Gi from 8Gi up, else 256Mi steps."""
    step = GI if n >= 8 * GI else 256 * MI
    return max(step, math.ceil(n / step) * step)


def advise(
    model: str, declared_bytes: int, observed_peak_bytes: int, *, headroom_percent: float = DEFAULT_HEADROOM_PERCENT
) -> SizingAdvice:
    """Compare declared memory with the observed peak and suggest a value with headroom, rounded up."""
    if declared_bytes <= 0:
        raise ValueError(f"{model}: declared memory must be positive, got {declared_bytes}")
    if observed_peak_bytes < 0:
        raise ValueError(f"{model}: observed peak must be >= 0, got {observed_peak_bytes}")
    ratio = observed_peak_bytes / declared_bytes
    over_exact = (declared_bytes - observed_peak_bytes) / declared_bytes * 100
    over = int(math.copysign(math.floor(abs(over_exact) + 0.5), over_exact))  # half away from zero
    suggested = _round_up(math.ceil(observed_peak_bytes * (1 + headroom_percent / 100)))
    declared, peak = format_bytes(declared_bytes), format_bytes(_round_up_to_mi(observed_peak_bytes))
    if observed_peak_bytes > declared_bytes:
        return SizingAdvice(
            declared_bytes, observed_peak_bytes, math.floor(ratio * 100), ratio, over, suggested,
            f"Observed peak exceeds declared memory: raise memory to {format_bytes(suggested)} to avoid OOM",
            f"{model} declared {declared} but observed peak is {peak} ({-over}% underprovisioned)",
        )
    if suggested < declared_bytes and over >= SIGNIFICANT_PERCENT:
        return SizingAdvice(
            declared_bytes, observed_peak_bytes, math.floor(ratio * 100), ratio, over, suggested,
            f"Consider reducing memory to {format_bytes(suggested)} for better packing",
            f"{model} declared {declared} but observed peak is {peak} ({over}% overprovisioned)",
        )
    return SizingAdvice(
        declared_bytes, observed_peak_bytes, math.floor(ratio * 100), ratio, over, None,
        "Declared memory matches observed usage", None,
    )


def _round_up_to_mi(n: int) -> int:
    return math.ceil(n / MI) * MI


@dataclass(frozen=True)
class ModelMemory:
    """One model's declared and observed memory, as `GET /models/{name}/metrics` and the
    `inference_model_memory_*` gauges show it. The controller fills it from the InferenceModel and its
    observations; local mode from its config and its processes, adding the live state, the current use
    and why the last process ended (None in a cluster)."""

    namespace: str
    name: str
    model_name: str
    declared_bytes: int | None
    observed_peak_bytes: int | None = None
    utilization_percent: int | None = None
    recommended_bytes: int | None = None
    recommendation: str | None = None
    last_observation: str | None = None  # RFC 3339
    replicas: int = 0
    ready_replicas: int = 0
    source: str = "none"
    state: str | None = None
    observed_bytes: int | None = None
    last_failure: str | None = None
    last_failure_time: str | None = None  # RFC 3339
    next_start_attempt: str | None = None  # RFC 3339, during a crash-loop backoff
    recent_failures: tuple[tuple[str, str], ...] = ()  # (RFC 3339 time, message), oldest first
    log: str | None = None  # local mode: the file the model's processes write their output to


def metrics_body(m: ModelMemory) -> dict[str, Any]:
    """The body of `GET /models/{name}/metrics`: bytes as integers, and as quantities for people (observed
    use rounded up to a MiB: a process's RSS is rarely a round number)."""

    def fmt(n: int | None) -> str | None:
        return None if n is None else format_bytes(n)

    def fmt_observed(n: int | None) -> str | None:
        return None if n is None else format_bytes(_round_up_to_mi(n))

    ratio = None
    if m.declared_bytes and m.observed_peak_bytes is not None:
        ratio = round(m.observed_peak_bytes / m.declared_bytes, 4)
    body: dict[str, Any] = {
        "model": m.name,
        "namespace": m.namespace,
        "modelName": m.model_name,
        "declaredMemory": fmt(m.declared_bytes),
        "declaredMemoryBytes": m.declared_bytes,
        "observedPeakMemory": fmt_observed(m.observed_peak_bytes),
        "observedPeakMemoryBytes": m.observed_peak_bytes,
        "utilizationPercent": m.utilization_percent,
        "utilizationRatio": ratio,
        "recommendedMemory": fmt(m.recommended_bytes),
        "recommendation": m.recommendation,
        "lastObservation": m.last_observation,
        "replicas": m.replicas,
        "readyReplicas": m.ready_replicas,
        "source": m.source,
    }
    if m.state is not None:  # local mode: the process side
        body["state"] = m.state
        body["observedMemory"] = fmt_observed(m.observed_bytes) if m.observed_bytes else None
        body["observedMemoryBytes"] = m.observed_bytes
        # Why the last process ended without being asked to (its exit and last output lines), kept across
        # good starts, with when, the next start attempt during a crash-loop backoff, and a short history.
        body["lastFailure"] = m.last_failure
        body["lastFailureTime"] = m.last_failure_time
        body["nextStartAttempt"] = m.next_start_attempt
        body["recentFailures"] = [{"time": t, "message": message} for t, message in m.recent_failures]
        body["log"] = m.log  # the model's own log file (its stdout and stderr)
    return body
