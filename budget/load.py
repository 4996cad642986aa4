"""The load layer's rule: how many replicas a model's traffic needs, from what each replica reports.

The budget layer answers "may it start?", the idle layer "may it stop?"; this one answers "how many
does its traffic need?". It is one pure function, :func:`desired_replicas`, fed per-replica signals
(requests in flight as the proxy counts them, and vLLM's own queue and KV-cache use when a replica
serves them) and the model's :class:`LoadTuning`. It steps one replica at a time, never while a
replica is starting, and only once a condition has held for its stabilization window; the caller
keeps the :class:`LoadState` between evaluations and passes `now` (no clock here). What it wants is
then put to the budget like any other scale-up (:func:`budget.replicas.budget_for`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

DEFAULT_KV_SATURATION = 0.8
"""vLLM preempts requests once its KV cache is nearly full; at 80 % a replica has no room for a burst."""

DEFAULT_WAITING_SATURATION = 5
"""Five queued requests mean the next one waits several whole generations: the replica is saturated."""

DEFAULT_MARGIN = 0.2
"""Spare capacity (1 - load) the non-saturated replicas keep on average; under it, one more replica."""

DEFAULT_SCALE_UP_WINDOW_SECONDS = 5.0
"""Pressure must last this long before a step up: one burst of a few seconds does not buy a replica."""

DEFAULT_SCALE_DOWN_WINDOW_SECONDS = 60.0
"""Slack must last this long before a step down (HPA uses 300 s; replicas here are costlier to restart
than to keep, but memory held by an unneeded replica blocks other models, so one minute)."""

Direction = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class LoadTuning:
    """Per-model thresholds of the rule (InferenceModel `spec.load`, local `load:`)."""

    kv_saturation: float = DEFAULT_KV_SATURATION
    waiting_saturation: int = DEFAULT_WAITING_SATURATION
    concurrency: int | None = None  # requests one replica runs at once; the proxy's in-flight beyond it wait
    margin: float = DEFAULT_MARGIN
    scale_up_window_seconds: float = DEFAULT_SCALE_UP_WINDOW_SECONDS
    scale_down_window_seconds: float = DEFAULT_SCALE_DOWN_WINDOW_SECONDS


@dataclass(frozen=True)
class ReplicaSignals:
    """What one replica is doing; None where nobody reports it."""

    replica: str  # its base URL (or pod name)
    in_flight: int = 0  # requests the proxy sent and has not finished
    waiting: int | None = None  # the replica's own queue (vllm:num_requests_waiting)
    running: int | None = None  # vllm:num_requests_running
    kv_cache_usage: float | None = None  # 0..1 (vllm:kv_cache_usage_perc, formerly gpu_cache_usage_perc)
    starting: bool = False  # not serving yet


@dataclass(frozen=True)
class LoadState:
    """Carried by the caller between evaluations: since when each condition has held."""

    pressure_since: float | None = None
    slack_since: float | None = None


@dataclass(frozen=True)
class LoadDecision:
    """How many replicas the traffic needs now, why, and the state to pass next time."""

    desired: int
    direction: Direction
    reason: str
    state: LoadState
    saturated: int = 0  # replicas saturated now
    spare: float = 1.0  # average spare capacity of the non-saturated replicas (0 when none)


def waiting(signal: ReplicaSignals, tuning: LoadTuning) -> int | None:
    """The replica's queue: its own report, else the proxy's in-flight beyond the replica's concurrency."""
    if signal.waiting is not None:
        return signal.waiting
    if tuning.concurrency is not None:
        return max(0, signal.in_flight - tuning.concurrency)
    return None


def load(signal: ReplicaSignals, tuning: LoadTuning) -> float:
    """How full a replica is, 1.0 at saturation: the largest of its KV use, queue and running share."""
    terms = [0.0]
    if signal.kv_cache_usage is not None:
        terms.append(signal.kv_cache_usage / tuning.kv_saturation)
    queue = waiting(signal, tuning)
    if queue is not None:
        terms.append(queue / tuning.waiting_saturation)
    if tuning.concurrency is not None:
        busy = signal.running if signal.running is not None else signal.in_flight
        # A replica running all it can is full even with an empty queue; the queue then adds to it.
        terms.append(min(busy, tuning.concurrency) / tuning.concurrency + (queue or 0) / tuning.waiting_saturation)
    return max(terms)


def saturated(signal: ReplicaSignals, tuning: LoadTuning) -> bool:
    """KV use at or over its threshold, or a queue at or over its threshold."""
    kv = signal.kv_cache_usage
    queue = waiting(signal, tuning)
    return (kv is not None and kv >= tuning.kv_saturation) or (queue is not None and queue >= tuning.waiting_saturation)


def desired_replicas(
    signals: Sequence[ReplicaSignals],
    *,
    current: int,
    min_replicas: int,
    max_replicas: int,
    tuning: LoadTuning,
    state: LoadState,
    now: float,
) -> LoadDecision:
    """The replicas the traffic needs: `current` plus or minus one at most, within [min, max].

    Scale from zero is the proxy's (a request arrives), to zero the idle layer's: with no replica,
    only `min_replicas` raises the count; load never takes the last replica away.
    """
    def decided(desired: int, direction: Direction, reason: str, state: LoadState = LoadState()) -> LoadDecision:
        return LoadDecision(desired, direction, reason, state, count, 1.0 - busy)

    count, busy = 0, 0.0
    if current < min_replicas:
        return decided(min_replicas, "up", f"kept warm: minReplicas is {min_replicas}")
    if current > max_replicas:
        return decided(max_replicas, "down", f"maxReplicas is {max_replicas}")
    if current == 0:
        return decided(0, "hold", "no replica: a request starts one")
    serving = [s for s in signals if not s.starting]
    if len(serving) < max(current, len(signals)):
        return decided(current, "hold", "a replica is starting")
    loads = [load(s, tuning) for s in serving]
    # Spare capacity of the non-saturated replicas: one past its concurrency has none, not a negative amount.
    open_loads = [min(1.0, load(s, tuning)) for s in serving if not saturated(s, tuning)]
    count = len(serving) - len(open_loads)
    busy = sum(open_loads) / len(open_loads) if open_loads else 1.0
    summary = f"{count} of {len(serving)} saturated, spare {1.0 - busy:.2f}"
    if busy > 1.0 - tuning.margin:  # spare under the margin (compared as load: 1 - 4/5 is not 0.2 in floats)
        if current >= max_replicas:
            return decided(current, "hold", f"{summary}; at maxReplicas {max_replicas}")
        since = state.pressure_since if state.pressure_since is not None else now
        if now - since < tuning.scale_up_window_seconds:
            return decided(current, "hold", f"{summary}; waiting out the window", LoadState(since))
        return decided(current + 1, "up", f"{summary} (margin {tuning.margin:.2f})")
    floor = max(min_replicas, 1)
    if current > floor and count == 0 and _fits_fewer(loads, current - 1, tuning):
        since = state.slack_since if state.slack_since is not None else now
        if now - since < tuning.scale_down_window_seconds:
            return decided(current, "hold", f"{summary}; slack, waiting out the window", LoadState(None, since))
        return decided(current - 1, "down", f"{summary}; {current - 1} keep the margin")
    return decided(current, "hold", summary)


def _fits_fewer(loads: Sequence[float], replicas: int, tuning: LoadTuning) -> bool:
    """The same load spread over `replicas` keeps every replica under saturation with the margin spare."""
    return sum(loads) / replicas <= 1.0 - tuning.margin
