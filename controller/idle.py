"""When an idle model should scale to zero: the budget's idle rule, plus when to look again.

Why this module exists: "idle" must mean the same thing in the 429's `blocking` list and in the
controller's scale-down, so the idle time comes from the budget core's rule (:func:`budget.idle_seconds`:
now minus the later of the last request and the latest replica start).

One addition, conservative only: when a model wants replicas but none has started yet, the moment this
controller saw the scale-up stands in for the replica start. Without it a model scaled up by hand, whose
last request was long ago, would be scaled back to zero before its first pod even started.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from budget import Model, Placement, idle_seconds


def idle_for_seconds(
    model: Model, placements: Iterable[Placement], now: float, *, awake_since: float | None = None
) -> float:
    """Seconds since the model's last activity (last request, or latest replica start), by the budget's rule."""
    started = [p.started_at for p in placements if p.model == model.key and p.started_at is not None]
    if not started and awake_since is not None:
        started = [awake_since]
    return idle_seconds(model, started, now)


@dataclass(frozen=True)
class IdleVerdict:
    """Scale to zero now, or look again in `recheck_in_seconds` (None: nothing to wait for)."""

    scale_to_zero: bool
    idle_for_seconds: float
    recheck_in_seconds: float | None
    reason: str


def idle_verdict(
    model: Model, placements: Iterable[Placement], now: float, *, awake_since: float | None = None
) -> IdleVerdict:
    """Decide idle scale-to-zero for one model; pure (``now`` in POSIX seconds)."""
    if model.cooldown_seconds <= 0:
        return IdleVerdict(False, 0.0, None, "cooldown disabled (cooldownPeriod 0)")
    if model.replicas == 0:
        return IdleVerdict(False, 0.0, None, "already at zero replicas")
    if model.min_replicas > 0:
        return IdleVerdict(False, 0.0, None, f"kept warm (minReplicas {model.min_replicas})")
    placements = list(placements)
    has_start = any(p.model == model.key and p.started_at is not None for p in placements)
    if model.last_request_time is None and not has_start and awake_since is None:
        return IdleVerdict(False, 0.0, model.cooldown_seconds, "no activity known yet")
    idle = idle_for_seconds(model, placements, now, awake_since=awake_since)
    if idle >= model.cooldown_seconds:
        return IdleVerdict(True, idle, None, "cooldown elapsed")
    return IdleVerdict(False, idle, model.cooldown_seconds - idle, "within cooldown")
