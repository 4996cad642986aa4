"""The decisions: may a model scale to N replicas (admission), and which nodes may take a pod (extender).

One admission rule answers for the proxy's fast path, the webhook and `ibc plan`: a scale-up is
allowed iff every desired replica of every model in the pool can be placed, with existing
placements fixed and new replicas placed first-fit-decreasing on nodes matching each model's
nodeSelector. Replicas already admitted for other models are placed before the new ones, so an
admission never takes memory another admitted model is counting on. Decreases always pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from budget.errors import BudgetError, UnknownModelError
from budget.quantity import format_bytes, format_duration
from budget.view import ClusterView, Model, Node, PodRequest, matches

# Stable, number-free reasons: kube-scheduler groups them as "0/N nodes are available: K <reason>".
REASON_INSUFFICIENT = "insufficient inference memory budget"
REASON_NO_BUDGET = "node has no inference memory budget"
REASON_SELECTOR = "node does not match the model's nodeSelector"
REASON_UNKNOWN_NODE = "node is unknown to the inference budget"

DEFAULT_RETRY_AFTER_SECONDS = 30


@dataclass(frozen=True)
class Blocking:
    """A model holding memory the request would need, and how long it has been idle."""

    model: str
    memory_bytes: int
    idle_for_seconds: float
    cooldown_seconds: float
    replicas: int = 1
    starting: bool = False  # admitted replicas that do not hold a node yet (they will, soon)

    @property
    def cooldown_remaining_seconds(self) -> float | None:
        """Seconds until idle scale-down frees it; None when its cooldown is disabled."""
        if self.cooldown_seconds <= 0:
            return None
        return max(0.0, self.cooldown_seconds - self.idle_for_seconds)


@dataclass(frozen=True)
class Decision:
    """The answer to "may this model have N replicas?": a value, serialized only at the edges."""

    allowed: bool
    reason: str  # fits | no_change | decrease | insufficient_memory | no_matching_nodes | exceeds_node_capacity
    message: str
    model: str
    model_key: str
    memory_bytes: int
    replicas_from: int
    replicas_to: int
    available_bytes: int
    pool: str
    blocking: tuple[Blocking, ...] = ()
    retry_after_seconds: int = 0
    placements: Mapping[str, int] = field(default_factory=dict)  # node -> new replicas placed there


def pool_name(selector: Mapping[str, str]) -> str:
    """How a pool is named in messages and status: its nodeSelector, or "all budgeted nodes"."""
    if not selector:
        return "all budgeted nodes"
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def idle_seconds(model: Model | None, started: list[float], now: float) -> float:
    """How long a model has been idle: now minus the later of its last request and its latest replica start.

    The one idle rule: the 429's `idle_for`, the controller's cooldown and local mode's stop all use it.
    0 when neither time is known.
    """
    marks = [t for t in started if t is not None]
    if model is not None and model.last_request_time is not None:
        marks.append(model.last_request_time)
    if not marks:
        return 0.0
    return max(0.0, now - max(marks))


def _held(view: ClusterView, key: str, now: float) -> int:
    """Replicas of a model that already hold memory on a node (placed, or reserved by the extender)."""
    placed = sum(1 for p in view.placements if p.model == key)
    reserved = sum(1 for r in view.live_reservations(now) if r.model == key)
    return placed + reserved


def _first_fit(free: dict[str, int], candidates: list[str], memory: int) -> str | None:
    for name in candidates:
        if free[name] >= memory:
            free[name] -= memory
            return name
    return None


def _candidates(nodes: Iterable[Node], selector: Mapping[str, str]) -> list[str]:
    return [n.name for n in nodes if n.capacity_bytes is not None and matches(selector, n.labels)]


def _blocking(
    view: ClusterView, target_key: str, pool_nodes: set[str], now: float, starting: dict[str, int]
) -> tuple[Blocking, ...]:
    """Models holding memory in the pool: placed replicas, then admitted replicas still starting."""
    memory: dict[str, int] = {}
    count: dict[str, int] = {}
    started: dict[str, list[float]] = {}
    for p in view.placements:
        if p.node not in pool_nodes or p.model == target_key:
            continue
        memory[p.model] = memory.get(p.model, 0) + p.memory_bytes
        count[p.model] = count.get(p.model, 0) + 1
        if p.started_at is not None:
            started.setdefault(p.model, []).append(p.started_at)
    out = []
    for key, mem in memory.items():
        model = view.models.get(key)
        out.append(
            Blocking(
                model=model.model_name or model.name if model else key.split("/", 1)[-1],
                memory_bytes=mem,
                idle_for_seconds=idle_seconds(model, started.get(key, []), now),
                cooldown_seconds=model.cooldown_seconds if model else 0.0,
                replicas=count[key],
            )
        )
    out.sort(key=lambda b: (-b.idle_for_seconds, -b.memory_bytes, b.model))
    pending = []
    for key, mem in sorted(starting.items()):
        model = view.models[key]
        pending.append(
            Blocking(
                model=model.model_name or model.name,
                memory_bytes=mem,
                idle_for_seconds=0.0,
                cooldown_seconds=model.cooldown_seconds,
                replicas=mem // model.memory_bytes,
                starting=True,
            )
        )
    return tuple(out + pending)


def _retry_after(blocking: tuple[Blocking, ...], default: int) -> int:
    remaining = [b.cooldown_remaining_seconds for b in blocking]
    known = [r for r in remaining if r is not None]
    if not known:
        return default
    return max(1, math.ceil(min(known)))


def free_after_admitted(
    view: ClusterView, now: float, *, exclude: str = ""
) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
    """Free bytes per budgeted node once the replicas other models were admitted for, but that hold no
    memory yet, are placed (first-fit-decreasing), and where they land as (model key, node, bytes).

    `exclude` is the model being decided: its own missing replicas are the question, not the ground.
    """
    free = view.free_bytes(now)
    pending: list[tuple[int, str, Model]] = []
    for other in view.models.values():
        if other.key == exclude or other.memory_bytes <= 0:
            continue
        missing = other.replicas - _held(view, other.key, now)
        pending.extend((other.memory_bytes, other.key, other) for _ in range(max(0, missing)))
    pending.sort(key=lambda item: (-item[0], item[1]))
    landed: list[tuple[str, str, int]] = []
    for memory, other_key, other in pending:
        node = _first_fit(free, _candidates(view.nodes, other.node_selector), memory)
        if node is not None:
            landed.append((other_key, node, memory))
    return free, landed


def decide_scale(
    view: ClusterView,
    model_ref: str,
    replicas: int,
    now: float,
    *,
    default_retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS,
) -> Decision:
    """May `model_ref` (key, name or modelName) have `replicas` desired replicas? Pure; `now` in POSIX s."""
    model = view.find_model(model_ref)
    if model is None:
        raise UnknownModelError(f"unknown model {model_ref!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise BudgetError(f"replicas must be a non-negative integer, got {replicas!r}")
    key = model.key
    name = model.model_name or model.name
    pool = pool_name(model.node_selector)
    pool_nodes = _candidates(view.nodes, model.node_selector)
    free, landed = free_after_admitted(view, now, exclude=key)
    starting: dict[str, int] = {}  # memory of admitted, not yet placed replicas landing in the target's pool
    for other_key, where, memory in landed:
        if where in pool_nodes:
            starting[other_key] = starting.get(other_key, 0) + memory

    available = max((free[n] for n in pool_nodes), default=0)

    def decision(allowed: bool, reason: str, message: str, **extra: Any) -> Decision:
        return Decision(
            allowed=allowed,
            reason=reason,
            message=message,
            model=name,
            model_key=key,
            memory_bytes=model.memory_bytes,
            replicas_from=model.replicas,
            replicas_to=replicas,
            available_bytes=max(0, available),
            pool=pool,
            **extra,
        )

    if replicas < model.replicas:
        return decision(True, "decrease", f"{name}: scaling down from {model.replicas} to {replicas}")
    held = _held(view, key, now)
    new = replicas - held
    if new <= 0 or model.memory_bytes == 0:
        return decision(True, "no_change", f"{name}: {replicas} replica(s) need no new memory")

    placed: dict[str, int] = {}
    for _ in range(new):
        node = _first_fit(free, pool_nodes, model.memory_bytes)
        if node is None:
            break
        placed[node] = placed.get(node, 0) + 1
    if sum(placed.values()) == new:
        return decision(
            True,
            "fits",
            f"{name} fits: {new} new replica(s) of {format_bytes(model.memory_bytes)} in pool {pool}",
            placements=placed,
        )

    need = f"{name} needs {format_bytes(model.memory_bytes)}"
    if new > 1:
        need = f"{name} needs {new} more replicas of {format_bytes(model.memory_bytes)}"
    if not pool_nodes:
        return decision(
            False,
            "no_matching_nodes",
            f"{need} but no budgeted node matches pool {pool}",
            retry_after_seconds=default_retry_after_seconds,
        )
    capacities = [n.capacity_bytes or 0 for n in view.nodes if n.name in pool_nodes]
    if model.memory_bytes > max(capacities):
        return decision(
            False,
            "exceeds_node_capacity",
            f"{need} but the largest node in pool {pool} has {format_bytes(max(capacities))}; "
            "it can never fit without a larger node",
            retry_after_seconds=default_retry_after_seconds,
        )
    blocking = _blocking(view, key, set(pool_nodes), now, starting)
    message = f"{need} in pool {pool}; {format_bytes(max(0, available))} available"
    if blocking:
        parts = [
            f"{b.model} ({format_bytes(b.memory_bytes)}, "
            + ("starting" if b.starting else f"idle {format_duration(b.idle_for_seconds)}")
            + ")"
            for b in blocking
        ]
        message += "; blocked by " + ", ".join(parts)
    return decision(
        False,
        "insufficient_memory",
        message,
        blocking=blocking,
        retry_after_seconds=_retry_after(blocking, default_retry_after_seconds),
    )


def explain(decision: Decision) -> dict[str, Any]:
    """The 429 / deny body: the seed's shape plus a human sentence and the retry hint."""
    body: dict[str, Any] = {
        "message": decision.message,
        "requested": {
            "model": decision.model,
            "memory": format_bytes(decision.memory_bytes),
            "replicas": decision.replicas_to,
        },
        "available": format_bytes(decision.available_bytes),
        "blocking": [_blocking_body(b) for b in decision.blocking],
    }
    if not decision.allowed:
        body = {"error": decision.reason, **body, "retry_after_seconds": decision.retry_after_seconds}
    return body


def _blocking_body(b: Blocking) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": b.model,
        "memory": format_bytes(b.memory_bytes),
        "idle_for": format_duration(b.idle_for_seconds),
    }
    if b.starting:
        out["state"] = "starting"
    return out


Status = Literal["passed", "failed", "unresolvable"]


class NodeVerdict(NamedTuple):
    """Whether one node may take one pod; `reason` is one of the stable REASON_* strings.

    A NamedTuple, not a frozen dataclass: the extender builds one per node per filter call.
    """

    node: str
    status: Status
    reason: str = ""
    free_bytes: int = 0
    capacity_bytes: int = 0


def filter_nodes(view: ClusterView, pod: PodRequest, node_names: Iterable[str], now: float) -> list[NodeVerdict]:
    """Verdict per node for a model pod; the pod's own reservation (same UID) does not count against it."""
    model = view.models.get(pod.model)
    selector = dict(model.node_selector) if model else {}
    selector.update(pod.node_selector)
    used = view.used_bytes(now, exclude_uid=pod.uid)
    by_name = view.node_index
    need = pod.memory_bytes
    verdicts = []
    for name in node_names:
        node = by_name.get(name)
        if node is None:
            verdicts.append(NodeVerdict(name, "unresolvable", REASON_UNKNOWN_NODE))
            continue
        capacity = node.capacity_bytes
        if capacity is None:
            verdicts.append(NodeVerdict(name, "unresolvable", REASON_NO_BUDGET))
        elif selector and not matches(selector, node.labels):
            verdicts.append(NodeVerdict(name, "unresolvable", REASON_SELECTOR, capacity_bytes=capacity))
        else:
            free = capacity - used.get(name, 0)
            if need > capacity:
                verdicts.append(NodeVerdict(name, "unresolvable", REASON_INSUFFICIENT, free, capacity))
            elif need > free:
                verdicts.append(NodeVerdict(name, "failed", REASON_INSUFFICIENT, free, capacity))
            else:
                verdicts.append(NodeVerdict(name, "passed", "", free, capacity))
    return verdicts


def score_nodes(
    verdicts: Iterable[NodeVerdict], memory_bytes: int, strategy: Literal["binpack", "spread"] = "binpack"
) -> dict[str, int]:
    """0..10 per node: bin-packing favours the node left fullest, spread the one left emptiest."""
    scores: dict[str, int] = {}
    for v in verdicts:
        if v.status != "passed" or v.capacity_bytes <= 0:
            scores[v.node] = 0
            continue
        fraction_used_after = 1 - (v.free_bytes - memory_bytes) / v.capacity_bytes
        fraction = fraction_used_after if strategy == "binpack" else 1 - fraction_used_after
        scores[v.node] = max(0, min(10, round(10 * fraction)))
    return scores
