"""The status document: what holds the memory, how long until it frees, what waits, what was refused.

One pure function, :func:`build_status`, turns the budget view plus the request path's counters into
the document `GET /status`, `ibc status` and the web page all show. Its numbers come from the functions
the 429 uses (`free_after_admitted` and `decide_scale` for room, `idle_seconds` and the cooldown rule of
:class:`Blocking` for timers, `explain` for refusals, `advise` for memory advice), so the page and the
429 can never disagree. :func:`status_body` serializes it (bytes and seconds as numbers, with the
`60Gi` / `2m` forms beside them for people).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from budget.advice import MI, SizingAdvice, advise
from budget.decide import Blocking, Decision, decide_scale, explain, free_after_admitted, idle_seconds, pool_name
from budget.errors import BudgetError
from budget.objects import rfc3339
from budget.quantity import format_bytes, format_duration, parse_quantity
from budget.view import ClusterView, Model, matches, model_key

STATES = ("ready", "starting", "stopping", "stopped", "failed")


@dataclass(frozen=True)
class Refusal:
    """A refused start: when, and the decision that refused it (its explanation is the 429's body)."""

    at: float  # POSIX seconds
    decision: Decision


@dataclass(frozen=True)
class Counters:
    """What only the request path and the runtime know; every field is optional (a snapshot has none)."""

    states: Mapping[str, str] = field(default_factory=dict)  # model key -> the scaler's state
    held: Mapping[str, int] = field(default_factory=dict)  # model key -> requests held for its start
    queue_limit: int | None = None  # requests one model may hold while it starts
    refusals: Mapping[str, Refusal] = field(default_factory=dict)  # model key -> the last refusal
    observed_peak_bytes: Mapping[str, int] = field(default_factory=dict)  # model key -> largest replica peak


@dataclass(frozen=True)
class Replica:
    """One replica holding memory on a node (a placement), or memory promised to one (a reservation)."""

    model: str  # model key
    name: str  # what clients send
    node: str
    pod: str
    memory_bytes: int
    ready: bool
    reserved: bool = False


@dataclass(frozen=True)
class NodeStatus:
    """One budgeted node: capacity, declared use, free, and the largest replica a decision could place."""

    name: str
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    largest_placeable_bytes: int  # on one device, once replicas already admitted elsewhere take their room
    replicas: tuple[Replica, ...]
    devices: tuple[DeviceStatus, ...] = ()


@dataclass(frozen=True)
class DeviceStatus:
    """One device of a node: what it has, what is declared on it, and what is left once admitted replicas land."""

    index: int
    label: str  # `GPU 0`, `MIG 1g.10gb 2`, `memory`
    kind: str
    capacity_bytes: int
    used_bytes: int
    placeable_bytes: int


@dataclass(frozen=True)
class PoolStatus:
    """The nodes one nodeSelector matches (the pool a 429 names), summed."""

    name: str
    nodes: tuple[str, ...]
    models: tuple[str, ...]  # model keys whose nodeSelector is this pool
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    largest_placeable_bytes: int


@dataclass(frozen=True)
class ModelStatus:
    """One model: state, replicas, memory, timers, the waiting room, the last refusal and the advice."""

    key: str
    name: str
    state: str
    pool: str
    replicas_desired: int
    replicas_ready: int
    memory_bytes: int  # declared, per replica
    held_bytes: int  # declared memory its replicas hold now
    replicas: tuple[Replica, ...]
    idle_for_seconds: float | None  # None while it holds no memory (nothing to free)
    cooldown_seconds: float
    cooldown_remaining_seconds: float | None  # None: not running, or its cooldown is disabled
    held_requests: int
    queue_limit: int | None
    last_refusal: Refusal | None
    observed_peak_bytes: int | None
    advice: SizingAdvice | None
    next_start: Decision | None  # for a model holding nothing: would a request start it now?


@dataclass(frozen=True)
class Status:
    """The whole document at one moment."""

    now: float
    source: str
    pools: tuple[PoolStatus, ...]
    nodes: tuple[NodeStatus, ...]
    models: tuple[ModelStatus, ...]


def _display(model: Model) -> str:
    return model.model_name or model.name


def _state(model: Model, placed: int, ready: int, scaler_state: str | None) -> str:
    """The scaler's word when it has one (it knows failures); else what the view shows."""
    if scaler_state in STATES:
        return scaler_state
    if model.replicas == 0:
        return "stopping" if placed else "stopped"  # scaled to zero: its pods still hold memory until gone
    return "ready" if ready else "starting"


def build_status(view: ClusterView, now: float, counters: Counters | None = None, *, source: str = "") -> Status:
    """The status document for `view` at `now` (POSIX seconds). Pure."""
    counters = counters or Counters()
    replicas_by_node: dict[str, list[Replica]] = {}
    replicas_by_model: dict[str, list[Replica]] = {}
    started: dict[str, list[float]] = {}
    for p in view.placements:
        m = view.models.get(p.model)
        replica = Replica(p.model, _display(m) if m else p.model, p.node, p.pod, p.memory_bytes, p.ready)
        replicas_by_node.setdefault(p.node, []).append(replica)
        replicas_by_model.setdefault(p.model, []).append(replica)
        if p.started_at is not None:
            started.setdefault(p.model, []).append(p.started_at)
    for r in view.live_reservations(now):
        m = view.models.get(r.model)
        replica = Replica(r.model, _display(m) if m else r.model, r.node, r.pod, r.memory_bytes, False, reserved=True)
        replicas_by_node.setdefault(r.node, []).append(replica)
        replicas_by_model.setdefault(r.model, []).append(replica)

    used = view.used_bytes(now)
    device_used = view.device_used(now)
    placeable, _ = free_after_admitted(view, now)
    nodes = tuple(
        NodeStatus(
            name=n.name,
            capacity_bytes=n.capacity_bytes,
            used_bytes=used.get(n.name, 0),
            free_bytes=n.capacity_bytes - used.get(n.name, 0),
            largest_placeable_bytes=max(0, *placeable[n.name].values()),
            replicas=tuple(sorted(replicas_by_node.get(n.name, ()), key=lambda r: (-r.memory_bytes, r.name, r.pod))),
            devices=tuple(
                DeviceStatus(
                    d.index,
                    d.label(),
                    d.kind,
                    d.memory_bytes,
                    device_used.get(n.name, {}).get(d.index, 0),
                    max(0, placeable[n.name][d.index]),
                )
                for d in n.devices
            ),
        )
        for n in view.nodes
        if n.capacity_bytes is not None
    )
    by_name = {n.name: n for n in nodes}

    pools: dict[str, PoolStatus] = {}
    for model in sorted(view.models.values(), key=lambda m: m.key):
        name = pool_name(model.node_selector)
        if name in pools:
            pool = pools[name]
            pools[name] = replace(pool, models=(*pool.models, model.key))
            continue
        members = tuple(n.name for n in view.nodes if n.name in by_name and matches(model.node_selector, n.labels))
        pools[name] = _pool(name, [by_name[n] for n in members], (model.key,))
    if not pools:
        pools[pool_name({})] = _pool(pool_name({}), list(nodes), ())

    statuses = [
        _model_status(view, m, now, counters, replicas_by_model.get(m.key, []), started) for m in view.models.values()
    ]
    models = tuple(sorted(statuses, key=lambda s: (-s.held_bytes, -s.memory_bytes, s.name, s.key)))
    return Status(now=now, source=source, pools=tuple(pools.values()), nodes=nodes, models=models)


def _pool(name: str, members: list[NodeStatus], models: tuple[str, ...]) -> PoolStatus:
    return PoolStatus(
        name=name,
        nodes=tuple(n.name for n in members),
        models=models,
        capacity_bytes=sum(n.capacity_bytes for n in members),
        used_bytes=sum(n.used_bytes for n in members),
        free_bytes=sum(n.free_bytes for n in members),
        largest_placeable_bytes=max((n.largest_placeable_bytes for n in members), default=0),
    )


def _model_status(
    view: ClusterView,
    model: Model,
    now: float,
    counters: Counters,
    replicas: list[Replica],
    started: Mapping[str, list[float]],
) -> ModelStatus:
    key = model.key
    placed = [r for r in replicas if not r.reserved]
    ready = sum(1 for r in placed if r.ready)
    held_bytes = sum(r.memory_bytes for r in replicas)
    idle: float | None = None
    remaining: float | None = None
    if placed:
        idle = idle_seconds(model, list(started.get(key, [])), now)
        # The 429's own rule for "how long until its cooldown frees it".
        remaining = Blocking(_display(model), held_bytes, idle, model.cooldown_seconds).cooldown_remaining_seconds
    peak = counters.observed_peak_bytes.get(key)
    advice = advise(_display(model), model.memory_bytes, peak) if peak is not None and model.memory_bytes > 0 else None
    next_start = None
    if not replicas:
        try:
            next_start = decide_scale(view, key, max(1, model.replicas), now)
        except BudgetError:
            next_start = None
    return ModelStatus(
        key=key,
        name=_display(model),
        state=_state(model, len(placed), ready, counters.states.get(key)),
        pool=pool_name(model.node_selector),
        replicas_desired=model.replicas,
        replicas_ready=ready,
        memory_bytes=model.memory_bytes,
        held_bytes=held_bytes,
        replicas=tuple(replicas),
        idle_for_seconds=idle,
        cooldown_seconds=model.cooldown_seconds,
        cooldown_remaining_seconds=remaining,
        held_requests=counters.held.get(key, 0),
        queue_limit=counters.queue_limit,
        last_refusal=counters.refusals.get(key),
        observed_peak_bytes=peak,
        advice=advice,
        next_start=next_start,
    )


# ----- serialization (the JSON of GET /status; `ibc status` and the page read only this) -----


def _peak(n: int | None) -> str | None:
    """An observed peak for people: rounded up to whole Mi (a peak of 22144Ki reads 22Mi)."""
    return None if n is None else format_bytes(-(-n // MI) * MI)


def _duration(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


def _replica_body(r: Replica) -> dict[str, Any]:
    return {
        "model": r.name,
        "key": r.model,
        "node": r.node,
        "pod": r.pod,
        "memory": format_bytes(r.memory_bytes),
        "memory_bytes": r.memory_bytes,
        "ready": r.ready,
        "reserved": r.reserved,
    }


def _room(capacity: int, used: int, free: int, placeable: int) -> dict[str, Any]:
    return {
        "capacity": format_bytes(capacity),
        "capacity_bytes": capacity,
        "used": format_bytes(used),
        "used_bytes": used,
        "free": format_bytes(max(0, free)),
        "free_bytes": free,
        "largest_placeable": format_bytes(placeable),
        "largest_placeable_bytes": placeable,
    }


def _refusal_body(refusal: Refusal, now: float) -> dict[str, Any]:
    body = explain(refusal.decision)
    return {
        "at": rfc3339(refusal.at),
        "at_seconds": refusal.at,
        "ago_seconds": max(0.0, now - refusal.at),
        "reason": refusal.decision.reason,
        **{k: v for k, v in body.items() if k != "error"},
    }


def _model_body(m: ModelStatus, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": m.name,
        "key": m.key,
        "state": m.state,
        "pool": m.pool,
        "replicas": {"desired": m.replicas_desired, "ready": m.replicas_ready, "holding": len(m.replicas)},
        "memory": format_bytes(m.memory_bytes),
        "memory_bytes": m.memory_bytes,
        "held": format_bytes(m.held_bytes),
        "held_bytes": m.held_bytes,
        "placements": [_replica_body(r) for r in m.replicas],
        "idle_for": _duration(m.idle_for_seconds),
        "idle_for_seconds": m.idle_for_seconds,
        "cooldown": format_duration(m.cooldown_seconds) if m.cooldown_seconds > 0 else None,
        "cooldown_seconds": m.cooldown_seconds,
        "cooldown_remaining": _duration(m.cooldown_remaining_seconds),
        "cooldown_remaining_seconds": m.cooldown_remaining_seconds,
        "held_requests": m.held_requests,
        "queue_limit": m.queue_limit,
        "last_refusal": _refusal_body(m.last_refusal, now) if m.last_refusal else None,
        "observed_peak": _peak(m.observed_peak_bytes),
        "observed_peak_bytes": m.observed_peak_bytes,
        "advice": None,
        "next_start": None,
    }
    if m.advice is not None:
        out["advice"] = {
            "recommendation": m.advice.recommendation,
            "recommended_memory": format_bytes(m.advice.recommendation_bytes)
            if m.advice.recommendation_bytes
            else None,
            "utilization_percent": m.advice.utilization_percent,
        }
    if m.next_start is not None:
        d = m.next_start
        out["next_start"] = {"allowed": d.allowed, "reason": d.reason, "message": d.message, **_start_extra(d)}
    return out


def _start_extra(d: Decision) -> dict[str, Any]:
    if d.allowed:
        return {}
    body = explain(d)
    return {k: body[k] for k in ("available", "blocking", "retry_after_seconds")}


def status_body(status: Status) -> dict[str, Any]:
    """The JSON document: pools, nodes (with the replicas on each), models (largest holder first)."""
    return {
        "now": rfc3339(status.now),
        "now_seconds": status.now,
        "source": status.source,
        "pools": [
            {
                "name": p.name,
                "nodes": list(p.nodes),
                "models": list(p.models),
                **_room(p.capacity_bytes, p.used_bytes, p.free_bytes, p.largest_placeable_bytes),
            }
            for p in status.pools
        ],
        "nodes": [
            {
                "name": n.name,
                **_room(n.capacity_bytes, n.used_bytes, n.free_bytes, n.largest_placeable_bytes),
                "replicas": [_replica_body(r) for r in n.replicas],
                "devices": [
                    {"index": d.index, "label": d.label, "kind": d.kind,
                     **_room(d.capacity_bytes, d.used_bytes, d.capacity_bytes - d.used_bytes, d.placeable_bytes)}
                    for d in n.devices
                ],
            }
            for n in status.nodes
        ],
        "models": [_model_body(m, status.now) for m in status.models],
    }


def observed_peaks(objects: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """`status.observedPeakMemory` of InferenceModel objects (the controller writes it), by model key.

    Objects of other kinds are skipped; objects without a `kind` (items of a list) count as InferenceModels.
    """
    peaks: dict[str, int] = {}
    for obj in objects:
        if obj.get("kind", "InferenceModel") != "InferenceModel":  # list items carry no kind
            continue
        meta = obj.get("metadata") or {}
        peak = (obj.get("status") or {}).get("observedPeakMemory") if isinstance(obj.get("status"), dict) else None
        if not peak or not isinstance(meta, dict):
            continue
        try:
            peaks[model_key(str(meta.get("namespace") or "default"), str(meta.get("name")))] = parse_quantity(peak)
        except BudgetError:
            continue  # advice only: a malformed status field must not hide the rest of the document
    return peaks
