"""Making room: which idle models to stop so that a request that does not fit can start.

A model may be evicted (stopped before its cooldown ends) only when its policy says so: it has an
`evict_idle_after_seconds`, has been idle at least that long, is not pinned, has a priority lower than
or equal to the requester's, is not serving or awaiting a request (the caller's `busy` set) and is not
starting. Among the evictable models, the cheapest set is the one that frees the fewest bytes beyond
the need, then has the lowest priority, then has been idle longest. Whether a set makes room is
answered by :func:`budget.decide.decide_scale` on the view without it, so eviction can never admit
what admission would refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

from budget.decide import Decision, decide_scale, idle_seconds, without
from budget.errors import UnknownModelError
from budget.quantity import format_bytes, format_duration
from budget.view import ClusterView, Model, matches

MAX_CANDIDATES = 12
"""Subsets are searched exhaustively (2^12 = 4096 at most); beyond this the most idle, lowest-priority
candidates are kept. One machine or one pool rarely runs more than a handful of idle models."""


@dataclass(frozen=True)
class Victim:
    """A model that may be stopped to make room: all its replicas, with what they hold in the pool."""

    model: str  # model key
    name: str  # the name clients use
    memory_bytes: int  # held on the requester's pool nodes
    idle_for_seconds: float
    priority: int

    def describe(self) -> str:
        return f"{self.name} ({format_bytes(self.memory_bytes)}, idle {format_duration(self.idle_for_seconds)})"


@dataclass(frozen=True)
class Eviction:
    """The cheapest set of victims and the admission decision that holds once they are gone."""

    victims: tuple[Victim, ...]
    decision: Decision  # allowed, computed on the view without the victims

    @property
    def freed_bytes(self) -> int:
        return sum(v.memory_bytes for v in self.victims)

    @property
    def message(self) -> str:
        stopped = ", ".join(v.describe() for v in self.victims)
        return f"stopping {stopped} to make room for {self.decision.model}"


def _label(model: Model) -> str:
    return model.model_name or model.name


def evictable(view: ClusterView, model_ref: str, now: float, *, busy: Iterable[str] = ()) -> tuple[Victim, ...]:
    """Models that policy allows to stop for `model_ref`'s sake, most idle first (pure; `now` in POSIX s)."""
    target = view.find_model(model_ref)
    if target is None:
        raise UnknownModelError(f"unknown model {model_ref!r}")
    busy_keys = set(busy)
    pool = {n.name for n in view.nodes if n.capacity_bytes is not None and matches(target.node_selector, n.labels)}
    reserved = {r.model for r in view.live_reservations(now)}
    out = []
    for model in view.models.values():
        if model.key == target.key or model.key in busy_keys or model.key in reserved:
            continue
        if model.pinned or model.evict_idle_after_seconds is None or model.priority > target.priority:
            continue
        mine = [p for p in view.placements if p.model == model.key]
        if not mine or len(mine) < model.replicas or not all(p.ready for p in mine):
            continue  # nothing to free, or a replica is still starting: someone is waiting for it
        held = sum(p.memory_bytes for p in mine if p.node in pool)
        if held <= 0:
            continue
        idle = idle_seconds(model, [p.started_at for p in mine if p.started_at is not None], now)
        if idle < model.evict_idle_after_seconds:
            continue
        out.append(Victim(model.key, _label(model), held, idle, model.priority))
    out.sort(key=lambda v: (v.priority, -v.idle_for_seconds, v.memory_bytes, v.model))
    return tuple(out)


def _cost(victims: tuple[Victim, ...]) -> tuple[int, int, float, tuple[str, ...]]:
    """Fewest bytes freed (the need is fixed, so fewest beyond it), lowest priority, longest idle."""
    return (
        sum(v.memory_bytes for v in victims),
        max(v.priority for v in victims),
        -min(v.idle_for_seconds for v in victims),
        tuple(sorted(v.model for v in victims)),
    )


def plan_eviction(
    view: ClusterView, model_ref: str, replicas: int, now: float, *, busy: Iterable[str] = ()
) -> Eviction | None:
    """The cheapest eviction that lets `model_ref` have `replicas` replicas, or None when none does.

    When the request already fits, the eviction is empty. `busy` holds the keys of models serving or
    awaiting a request: they are never evicted.
    """
    decision = decide_scale(view, model_ref, replicas, now)
    if decision.allowed:
        return Eviction((), decision)
    if decision.reason != "insufficient_memory":
        return None  # no node matches, or the model is larger than any node: stopping others cannot help
    candidates = evictable(view, model_ref, now, busy=busy)[:MAX_CANDIDATES]
    # A cheap necessary condition first: the pool's free bytes plus what a set frees must cover the need.
    target = view.models[decision.model_key]
    free = view.free_bytes(now)
    pool_free = sum(free.get(n.name, 0) for n in view.nodes if matches(target.node_selector, n.labels))
    held = sum(1 for p in view.placements if p.model == target.key)
    held += sum(1 for r in view.live_reservations(now) if r.model == target.key)
    shortage = (replicas - held) * target.memory_bytes - pool_free
    subsets = [
        c
        for size in range(1, len(candidates) + 1)
        for c in combinations(candidates, size)
        if sum(v.memory_bytes for v in c) >= shortage
    ]
    subsets.sort(key=_cost)
    for subset in subsets:
        after = decide_scale(without(view, (v.model for v in subset)), model_ref, replicas, now)
        if after.allowed:
            return Eviction(tuple(sorted(subset, key=lambda v: v.model)), after)
    return None
