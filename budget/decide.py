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
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from budget.errors import BudgetError, UnknownModelError
from budget.quantity import format_bytes, format_duration
from budget.view import (
    ClusterView,
    Model,
    Node,
    Placement,
    PodRequest,
    Reservation,
    device_matches,
    matches,
    share_bytes,
)

# Stable, number-free reasons: kube-scheduler groups them as "0/N nodes are available: K <reason>".
REASON_INSUFFICIENT = "insufficient inference memory budget"
REASON_NO_BUDGET = "node has no inference memory budget"
REASON_SELECTOR = "node does not match the model's nodeSelector"
REASON_UNKNOWN_NODE = "node is unknown to the inference budget"
REASON_DEVICES = "node has too few devices for the model"  # deviceSelector or tensor parallelism

DEFAULT_RETRY_AFTER_SECONDS = 30


BlockingState = Literal["idle", "starting", "stopping", "orphan"]  # orphan: its model is gone, its pods are not


class Slot(NamedTuple):
    """Where one new replica goes: a node and the indices of the devices it takes there."""

    node: str
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Blocking:
    """A model holding memory the request would need: how long it has been idle and when it frees it."""

    model: str
    memory_bytes: int
    idle_for_seconds: float
    cooldown_seconds: float
    replicas: int = 1
    state: BlockingState = "idle"
    free_in_seconds: float | None = None  # when all its memory is free if nothing else changes; None: never
    key: str = ""  # namespace/name, to take it out of a view (what-if)
    pods: tuple[str, ...] = ()  # orphan: the pods (namespace/name) that still hold the memory

    @property
    def starting(self) -> bool:
        return self.state == "starting"

    @property
    def cooldown_remaining_seconds(self) -> float | None:
        """Seconds until idle scale-down frees it; None when its cooldown is disabled."""
        if self.cooldown_seconds <= 0:
            return None
        return max(0.0, self.cooldown_seconds - self.idle_for_seconds)


@dataclass(frozen=True)
class Decision:
    """The answer to "may this model have N replicas?": a value, serialized only at the edges.

    On a memory denial, `blocking` starts with the smallest set of models whose memory going (on their
    own schedule) lets the request fit, `retry_blocking` says how many those are, and
    `retry_after_seconds` is when that happens. `retry_after_seconds` is 0 when waiting cannot help.
    """

    allowed: bool
    # fits | no_change | decrease | insufficient_memory | no_matching_nodes | exceeds_node_capacity
    # | exceeds_pool_capacity
    reason: str
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
    retry_blocking: int = 0
    device_placements: tuple[Slot, ...] = ()  # fits: each new replica's node and device indices
    devices: int = 1  # devices per replica (the model's)
    available_node: str = ""  # where the largest placement in `available_bytes` is ("" when none)

    @property
    def retry_after(self) -> int | None:
        """The retry hint every answer gives (429 body, /status, deny): seconds, or None when waiting cannot help."""
        return self.retry_after_seconds or None

    @property
    def available(self) -> str:
        """The largest placement the pool can still make, for people: `48Gi`, or `2 x 30Gi on gpu-node-1`."""
        return _placement_text(self.devices, self.available_bytes // max(1, self.devices), self.available_node)

    @property
    def where(self) -> str:
        """The pool for people: `pool inference-pool=gpu-nodes`, or `the whole cluster` without a selector."""
        return self.pool if self.pool == WHOLE_CLUSTER else f"pool {self.pool}"


def _placement_text(count: int, share_bytes: int, node: str) -> str:
    """`48Gi` for one device (the seed's shape), `2 x 30Gi on gpu-node-1` for a replica split over several."""
    if count > 1 and node:
        return f"{count} x {format_bytes(share_bytes)} on {node}"
    return format_bytes(share_bytes * max(1, count))


WHOLE_CLUSTER = "the whole cluster"
NEVER_REASONS = frozenset({"no_matching_nodes", "exceeds_node_capacity", "exceeds_pool_capacity"})


def pool_name(selector: Mapping[str, str]) -> str:
    """How a pool is named in messages and status: its nodeSelector, or "the whole cluster"."""
    if not selector:
        return WHOLE_CLUSTER
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


Free = dict[str, dict[int, int]]
"""Free bytes per device index per budgeted node: the ground every placement step works on."""


class Need(NamedTuple):
    """What one replica asks of one node: `devices` devices matching `selector`, each with `share_bytes` free."""

    devices: int
    share_bytes: int
    selector: Mapping[str, str]

    @classmethod
    def of(cls, model: Model) -> Need:
        return cls(max(1, model.devices), model.device_share_bytes, model.device_selector)


Strategy = Literal["binpack", "spread"]


def choose_devices(
    node: Node, free: Mapping[int, int], need: Need, strategy: Strategy = "binpack"
) -> tuple[int, ...] | None:
    """The devices of `node` one replica takes (sorted indices), or None when fewer than `need.devices` fit;
    `free` holds every device of the node.

    Binpack takes the devices left fullest (least free that still fits), so large devices stay whole for
    large replicas; spread takes the emptiest. Ties go to the lower index, so the answer is deterministic.
    """
    fits = [d.index for d in node.devices if device_matches(need.selector, d) and free[d.index] >= need.share_bytes]
    if len(fits) < need.devices:
        return None
    sign = 1 if strategy == "binpack" else -1
    return tuple(sorted(sorted(fits, key=lambda i: (sign * free[i], i))[: need.devices]))


def _first_fit(view: ClusterView, free: Free, candidates: list[str], need: Need) -> tuple[str, tuple[int, ...]] | None:
    """The first candidate node with room for one replica, and its devices; their free bytes are taken."""
    for name in candidates:
        chosen = choose_devices(view.node_index[name], free[name], need)
        if chosen is not None:
            for i in chosen:
                free[name][i] -= need.share_bytes
            return name, chosen
    return None


def _candidates(nodes: Iterable[Node], selector: Mapping[str, str]) -> list[str]:
    return [n.name for n in nodes if n.capacity_bytes is not None and matches(selector, n.labels)]


Candidates = dict[tuple[tuple[str, str], ...], list[str]]


def _nodes_for(view: ClusterView, selector: Mapping[str, str], cache: Candidates) -> list[str]:
    """Budgeted nodes matching a selector, remembered per selector for the tries of one decision."""
    index = tuple(sorted(selector.items()))
    if index not in cache:
        cache[index] = _candidates(view.nodes, selector)
    return cache[index]


def _admitted(
    view: ClusterView, now: float, exclude: str, gone: frozenset[str], cache: Candidates
) -> tuple[Free, list[tuple[str, str, int]], dict[str, int]]:
    """Free bytes per device after placing other models' admitted, unplaced replicas (largest share first),
    where they land, and the replicas holding memory per model; `gone` models count as scaled to zero."""
    held, free = _holding(view, now, gone)
    pending: list[tuple[int, int, str, int]] = []
    for other_key, other in view.models.items():
        if other_key == exclude or other.memory_bytes <= 0 or other_key in gone:
            continue
        missing = other.replicas - held.get(other_key, 0)
        if missing > 0:
            pending.append((other.device_share_bytes, other.memory_bytes, other_key, missing))
    pending.sort(key=lambda item: (-item[0], -item[1], item[2]))
    landed: list[tuple[str, str, int]] = []
    for _, memory, other_key, missing in pending:
        other = view.models[other_key]
        where = _nodes_for(view, other.node_selector, cache)
        need = Need.of(other)
        for _ in range(missing):
            spot = _first_fit(view, free, where, need)
            if spot is not None:
                landed.append((other_key, spot[0], memory))
    return free, landed, held


@dataclass(frozen=True)
class _Fit:
    """Where the new replicas of one model would go on one view (the placement step of the decision)."""

    new: int  # replicas that need new memory
    slots: list[Slot]  # one per new replica placed
    pool_nodes: list[str]
    available: tuple[int, str]  # the largest replica the pool can still take: (bytes per device, node), after admitted
    starting: dict[str, int]  # model key -> memory of its admitted, unplaced replicas landing in the pool
    free: Free  # per device, after admitted replicas of others (before this model's new ones)

    @property
    def fits(self) -> bool:
        return len(self.slots) == self.new

    @property
    def placed(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for slot in self.slots:
            out[slot.node] = out.get(slot.node, 0) + 1
        return out


def _holding(view: ClusterView, now: float, gone: frozenset[str]) -> tuple[dict[str, int], Free]:
    """Replicas holding memory per model (placed or reserved) and free bytes per device, `gone` aside."""
    held: dict[str, int] = {}
    holders: list[Placement | Reservation] = [*view.placements, *view.live_reservations(now)]
    for holder in holders:
        if holder.model in gone:
            continue
        held[holder.model] = held.get(holder.model, 0) + 1
    return held, view.device_free(now, without=gone)


def _largest(view: ClusterView, free: Free, nodes: list[str], need: Need) -> tuple[int, str]:
    """The largest share `need.devices` matching devices of one node still have free, and that node."""
    best = (0, "")
    for name in nodes:
        frees = sorted(
            (free[name][d.index] for d in view.node_index[name].devices if device_matches(need.selector, d)),
            reverse=True,
        )
        if len(frees) >= need.devices and frees[need.devices - 1] > best[0]:
            best = (frees[need.devices - 1], name)
    return best


def _fit(
    view: ClusterView,
    model: Model,
    replicas: int,
    now: float,
    gone: frozenset[str] = frozenset(),
    candidates: Candidates | None = None,
) -> _Fit:
    """First-fit-decreasing of the model's new replicas after the replicas admitted for other models.

    Each replica takes `model.devices` devices of one node, each with `memory / devices` (rounded up) free.
    `gone` names models to treat as scaled to zero with their memory free (the retry plan's what-if),
    without building a new view; `candidates` caches nodes per selector across such tries.
    """
    cache = {} if candidates is None else candidates
    key = model.key
    pool_nodes = _nodes_for(view, model.node_selector, cache)
    free, landed, held = _admitted(view, now, key, gone, cache)
    starting: dict[str, int] = {}  # memory of admitted, not yet placed replicas landing in the target's pool
    for other_key, node, memory in landed:
        if node in pool_nodes:
            starting[other_key] = starting.get(other_key, 0) + memory
    need = Need.of(model)
    available = _largest(view, free, pool_nodes, need)
    new = max(0, replicas - held.get(key, 0)) if replicas >= model.replicas else 0
    slots: list[Slot] = []
    if model.memory_bytes > 0:
        work = {node: dict(per) for node, per in free.items()}
        for _ in range(new):
            spot = _first_fit(view, work, pool_nodes, need)
            if spot is None:
                break
            slots.append(Slot(*spot))
    else:
        new = 0
    return _Fit(new, slots, pool_nodes, available, starting, free)


def _free_in(
    model: Model | None, state: BlockingState, idle_for: float, ready_in: float, free_by: float | None, now: float
) -> float | None:
    """Seconds until a blocking model's memory is free if nothing else changes; None: not on its own."""
    if state == "stopping":
        return None if free_by is None else max(0.0, free_by - now)
    cooldown = model.cooldown_seconds if model else 0.0
    if cooldown <= 0:
        return None
    if state == "starting":
        # Ready first; the request that started it then counts as activity, so the cooldown runs from then.
        return ready_in + cooldown
    return max(0.0, cooldown - idle_for)


def _blocking(
    view: ClusterView, target_key: str, pool_nodes: set[str], now: float, starting: dict[str, int]
) -> tuple[tuple[Blocking, ...], tuple[Blocking, ...]]:
    """Models holding memory: (those in the pool, with their pool memory, in display order; every model
    holding memory anywhere, for the retry plan). A model's state and free time are the same in both:
    taking it away (what the plan does) frees all of it, so both come from all of its replicas."""
    pool_memory: dict[str, int] = {}
    all_memory: dict[str, int] = {}
    count: dict[str, int] = {}
    started: dict[str, list[float]] = {}
    states: dict[str, set[str]] = {}
    ready_in: dict[str, float] = {}
    free_by: dict[str, float | None] = {}

    pods: dict[str, list[str]] = {}  # model key -> its pods (and reserved pods), named when it is an orphan

    def hold(key: str, mem: int, node: str | None, state: str, started_at: float | None, by: float | None) -> None:
        if key == target_key:
            return
        all_memory[key] = all_memory.get(key, 0) + mem
        model = view.models.get(key)
        if node is None or node in pool_nodes:  # None: admitted, and the placement step put it in the pool
            pool_memory[key] = pool_memory.get(key, 0) + mem
            count[key] = count.get(key, 0) + (mem // model.memory_bytes if model and model.memory_bytes > 0 else 1)
        states.setdefault(key, set()).add(state)
        if started_at is not None:
            started.setdefault(key, []).append(started_at)
        if state == "starting":
            startup = model.startup_seconds if model else 0.0
            begun = now if started_at is None else min(now, started_at)
            ready_in[key] = max(ready_in.get(key, 0.0), max(0.0, begun + startup - now))
        if state == "stopping":
            previous = free_by.get(key, by)
            free_by[key] = None if by is None or previous is None else max(previous, by)

    for p in view.placements:
        hold(p.model, p.memory_bytes, p.node, p.state, p.started_at, p.free_by)
        pods.setdefault(p.model, []).append(p.pod)
    for r in view.live_reservations(now):
        hold(r.model, r.memory_bytes, r.node, "starting", None, None)
        pods.setdefault(r.model, []).append(r.pod)
    for key, mem in _unplaced(view, target_key, now).items():
        # Admitted, not holding memory yet: in the pool as far as the placement step put it there.
        in_pool = min(mem, starting.get(key, 0))
        if in_pool:
            hold(key, in_pool, None, "starting", None, None)
        if mem > in_pool:
            hold(key, mem - in_pool, "", "starting", None, None)

    def entry(key: str, mem: int) -> Blocking:
        model = view.models.get(key)
        seen = states[key]
        state: BlockingState = "stopping" if seen == {"stopping"} else "starting" if "starting" in seen else "idle"
        if model is None and state != "stopping":
            state = "orphan"  # no model to start, idle out or scale down: it holds its memory until deleted
        idle_for = 0.0 if state == "starting" else idle_seconds(model, started.get(key, []), now)
        return Blocking(
            model=(model.model_name or model.name) if model else key.split("/", 1)[-1],
            memory_bytes=mem,
            idle_for_seconds=idle_for,
            cooldown_seconds=model.cooldown_seconds if model else 0.0,
            replicas=max(1, count.get(key, 0)),
            state=state,
            free_in_seconds=_free_in(model, state, idle_for, ready_in.get(key, 0.0), free_by.get(key), now),
            key=key,
            pods=tuple(sorted(pods[key])) if state == "orphan" else (),  # an orphan is only ever seen by its pods
        )

    shown = sorted((entry(k, m) for k, m in pool_memory.items() if m > 0), key=_display_order)
    everyone = tuple(entry(k, m) for k, m in all_memory.items())
    return tuple(shown), everyone


_STATE_ORDER = {"idle": 0, "orphan": 1, "stopping": 2, "starting": 3}


def _display_order(b: Blocking) -> tuple[int, float, int, str]:
    """How blocking models are listed: idle ones first, longest idle, then the largest, then by name."""
    return (_STATE_ORDER[b.state], -b.idle_for_seconds, -b.memory_bytes, b.model)


def _unplaced(view: ClusterView, target_key: str, now: float) -> dict[str, int]:
    """Memory of replicas other models were admitted for and do not hold yet, by model key."""
    out = {}
    held, _ = _holding(view, now, frozenset())
    for other in view.models.values():
        missing = other.replicas - held.get(other.key, 0)
        if other.key != target_key and missing > 0 and other.memory_bytes > 0:
            out[other.key] = missing * other.memory_bytes
    return out


def without(view: ClusterView, keys: Iterable[str]) -> ClusterView:
    """The view once these models' memory is free: no replicas, placements or reservations (what-if)."""
    gone = set(keys)
    if not gone:
        return view
    models = [replace(m, replicas=0) if m.key in gone else m for m in view.models.values()]
    return ClusterView.build(
        nodes=view.nodes,
        models=models,
        placements=[p for p in view.placements if p.model not in gone],
        reservations=[r for r in view.reservations if r.model not in gone],
    )


class RetryPlan(NamedTuple):
    """The smallest set of blocking models whose memory going lets the request fit, and when that is."""

    blockers: tuple[Blocking, ...]
    after_seconds: float | None  # None: some of them never go on their own (cooldown disabled)


def plan_retry(
    view: ClusterView, model: Model, replicas: int, now: float, blocking: tuple[Blocking, ...]
) -> RetryPlan | None:
    """The earliest moment the request fits if nothing else changes; None when it never fits in the pool.

    Tries the blockers' free times in order; at the first time at which the models free by then make
    room, gives back (smallest first) every one the request does not need, so what is left is minimal.
    """

    def fits(keys: Iterable[str]) -> bool:
        return _fit(view, model, replicas, now, frozenset(keys), cache).fits

    def shortest(items: list[Blocking], ends: list[int]) -> int | None:
        """A prefix length among `ends` at which `fits` holds and the one before does not.

        A binary search (a few tries) when the longest prefix fits; else the first that fits, in order:
        taking models away can let others' admitted replicas into the room, so fitting is not monotone.
        """
        if not ends:
            return None
        if not fits(b.key for b in items[: ends[-1]]):
            return next((end for end in ends[:-1] if fits(b.key for b in items[:end])), None)
        lo, hi = 0, len(ends) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(b.key for b in items[: ends[mid]]):
                hi = mid
            else:
                lo = mid + 1
        return ends[lo]

    cache: Candidates = {}
    if not fits(b.key for b in blocking):
        return None
    timed = sorted((b for b in blocking if b.free_in_seconds is not None), key=lambda b: b.free_in_seconds or 0.0)
    # Models free at the same moment are taken together: prefixes end where the time changes.
    ends = [
        i + 1
        for i in range(len(timed))
        if i + 1 == len(timed) or timed[i + 1].free_in_seconds != timed[i].free_in_seconds
    ]
    k = shortest(timed, ends)
    chosen = timed[:k] if k is not None else list(blocking)  # else only models without a cooldown make room
    # The fewest of them: the largest first, then give back (smallest first) any the request does not need.
    chosen.sort(key=lambda x: (-x.memory_bytes, x.free_in_seconds if x.free_in_seconds is not None else math.inf))
    chosen = chosen[: shortest(chosen, list(range(1, len(chosen) + 1))) or len(chosen)]
    # Until none can be given back: with admitted replicas moving into freed room, fitting is not monotone.
    changed = True
    while changed:
        changed = False
        for b in sorted(chosen, key=lambda x: (x.memory_bytes, -(x.free_in_seconds or math.inf), x.model)):
            rest = [x for x in chosen if x is not b]
            if rest and fits(x.key for x in rest):
                chosen, changed = rest, True
    times = [b.free_in_seconds for b in chosen]
    after = None if any(t is None for t in times) else max([0.0, *(t for t in times if t is not None)])
    chosen.sort(key=lambda x: (x.free_in_seconds if x.free_in_seconds is not None else math.inf, x.model))
    return RetryPlan(tuple(chosen), after)


def _orphan_pods(b: Blocking) -> str:
    """`orphan pod ns/x-1` (or `orphan pods ns/x-1, ns/x-2`): what a user must delete."""
    return f"orphan pod{'s' if len(b.pods) > 1 else ''} {', '.join(b.pods)}"


def _describe_blocking(b: Blocking) -> str:
    if b.state == "orphan":
        return f"{b.model} ({format_bytes(b.memory_bytes)}, {_orphan_pods(b)}: its model is gone)"
    if b.state == "idle":
        return f"{b.model} ({format_bytes(b.memory_bytes)}, idle {format_duration(b.idle_for_seconds)})"
    return f"{b.model} ({format_bytes(b.memory_bytes)}, {b.state})"


def free_after_admitted(view: ClusterView, now: float, *, exclude: str = "") -> tuple[Free, list[tuple[str, str, int]]]:
    """Free bytes per device of each budgeted node once the replicas other models were admitted for, but
    that hold no memory yet, are placed (first-fit-decreasing), and where they land as (model key, node, bytes).

    `exclude` is the model being decided: its own missing replicas are the question, not the ground.
    """
    free, landed, _ = _admitted(view, now, exclude, frozenset(), {})
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
    where = pool if pool == WHOLE_CLUSTER else f"pool {pool}"
    fit = _fit(view, model, replicas, now)
    need = Need.of(model)

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
            available_bytes=fit.available[0] * need.devices,
            pool=pool,
            devices=need.devices,
            available_node=fit.available[1],
            **extra,
        )

    if replicas < model.replicas:
        return decision(True, "decrease", f"{name}: scaling down from {model.replicas} to {replicas}")
    if fit.new <= 0:
        return decision(True, "no_change", f"{name}: {replicas} replica(s) need no new memory")
    if fit.fits:
        return decision(
            True,
            "fits",
            f"{name} fits: {fit.new} new replica(s) of {format_bytes(model.memory_bytes)} in {where}",
            placements=fit.placed,
            device_placements=tuple(fit.slots),
        )

    asks = f"{name} needs {format_bytes(model.memory_bytes)}"
    if fit.new > 1:
        asks = f"{name} needs {fit.new} more replicas of {format_bytes(model.memory_bytes)}"
    if need.devices > 1:
        asks += f" on {need.devices} devices of one node ({format_bytes(need.share_bytes)} each)"
    if not fit.pool_nodes:
        return decision(False, "no_matching_nodes", f"{asks} but no budgeted node matches {where}")
    impossible = _never_fits(view, fit.pool_nodes, need, where)
    if impossible is not None:
        return decision(False, impossible[0], f"{asks} but {impossible[1]}")
    capacities = [n.capacity_bytes or 0 for n in view.nodes if n.name in fit.pool_nodes]
    # Taking a model away can move others' admitted replicas into the pool, so the plan weighs every model.
    blocking, everyone = _blocking(view, key, set(fit.pool_nodes), now, fit.starting)
    plan = plan_retry(view, model, replicas, now, everyone)
    if plan is None:
        total = sum(capacities)
        return decision(
            False,
            "exceeds_pool_capacity",
            f"{name} cannot have {replicas} replica(s) of {format_bytes(model.memory_bytes)}{_split(need)} in {where} "
            "even with "
            f"nothing else running ({len(capacities)} node(s), {format_bytes(total)} in all); "
            "it can never fit without more nodes",
            blocking=blocking,
        )
    shown = {b.key: b for b in blocking}
    plan = plan._replace(blockers=tuple(shown.get(b.key, b) for b in plan.blockers))
    named = {b.key for b in plan.blockers}
    # Those whose going lets the request fit come first; within each part, the one display order.
    ordered = tuple(sorted(plan.blockers, key=_display_order)) + tuple(b for b in blocking if b.key not in named)
    message = f"{asks} in {where}; {_placement_text(need.devices, *fit.available)} available"
    message += _per_device(view, fit, need)
    if ordered:
        message += "; blocked by " + ", ".join(_describe_blocking(b) for b in ordered)
    if plan.after_seconds is None:
        never = [b.model for b in plan.blockers if b.free_in_seconds is None and b.state != "orphan"]
        if never:
            message += f"; {', '.join(never)} never frees its memory on its own (no cooldown)"
        orphans = [_orphan_pods(b) for b in plan.blockers if b.state == "orphan"]
        if orphans:
            message += f"; only deleting {', '.join(orphans)} frees that memory"
        retry = default_retry_after_seconds
    else:
        retry = max(1, math.ceil(plan.after_seconds))
        if len(plan.blockers) < len(ordered):
            names = " and ".join(b.model for b in plan.blockers)
            message += f"; it fits once {names} {'is' if len(plan.blockers) == 1 else 'are'} gone, in {retry}s"
    return decision(
        False,
        "insufficient_memory",
        message,
        blocking=ordered,
        retry_after_seconds=retry,
        retry_blocking=len(plan.blockers),
    )


MAX_NODES_EXPLAINED = 3  # the per-device sentence names at most this many nodes ...
MAX_DEVICES_EXPLAINED = 4  # ... and this many devices of each, so a 429 stays one readable line


def _split(need: Need) -> str:
    return f" on {need.devices} devices each" if need.devices > 1 else ""


def _unified(view: ClusterView, nodes: Iterable[str]) -> bool:
    """True when every node is one unified-memory device: the answers and words of before devices existed."""
    return all(d.kind == "unified" for n in nodes for d in view.node_index[n].devices)


def _never_fits(view: ClusterView, pool_nodes: list[str], need: Need, where: str) -> tuple[str, str] | None:
    """Why a replica fits no node of the pool even with the pool empty (reason, words), or None if one would."""
    empty = {n: {d.index: d.memory_bytes for d in view.node_index[n].devices} for n in pool_nodes}
    largest, node = _largest(view, empty, pool_nodes, need)
    if largest >= need.share_bytes:
        return None
    if _unified(view, pool_nodes) and need.devices == 1 and not need.selector:
        capacity = max(view.node_index[n].capacity_bytes or 0 for n in pool_nodes)
        return "exceeds_node_capacity", (
            f"the largest node in {where} has {format_bytes(capacity)}; it can never fit without a larger node"
        )
    kinds = f" matching {pool_name(need.selector)}" if need.selector else ""
    if not node and not any(
        device_matches(need.selector, d) for n in pool_nodes for d in view.node_index[n].devices
    ):
        return "no_matching_nodes", f"no device in {where} matches deviceSelector {pool_name(need.selector)}"
    if not node:
        most = max(
            sum(1 for d in view.node_index[n].devices if device_matches(need.selector, d)) for n in pool_nodes
        )
        return "exceeds_node_capacity", (
            f"no node in {where} has {need.devices} devices{kinds} (at most {most}); "
            "it can never fit without such a node"
        )
    what = "device" if need.devices == 1 else f"{need.devices} devices of one node"
    return "exceeds_node_capacity", (
        f"the largest {what}{kinds} in {where} {'has' if need.devices == 1 else 'have'} {format_bytes(largest)}"
        f"{'' if need.devices == 1 else ' each'} ({node}); it can never fit without larger devices"
    )


def _per_device(view: ClusterView, fit: _Fit, need: Need) -> str:
    """Why not, per device (`; gpu-node-2: GPU 0 has 12Gi free of 40Gi, GPU 1 has 8Gi free of 40Gi`),
    bounded in length; nothing for unified-memory pools, where the node's free memory says it all."""
    if _unified(view, fit.pool_nodes):
        return ""
    parts = []
    for name in fit.pool_nodes[:MAX_NODES_EXPLAINED]:
        devices = [d for d in view.node_index[name].devices if device_matches(need.selector, d)]
        if len(devices) < need.devices:
            parts.append(f"{name}: {len(devices)} matching device(s) of the {need.devices} needed")
            continue
        said = [
            f"{d.label()} has {format_bytes(max(0, fit.free[name][d.index]))} free of {format_bytes(d.memory_bytes)}"
            for d in devices[:MAX_DEVICES_EXPLAINED]
        ]
        if len(devices) > MAX_DEVICES_EXPLAINED:
            said.append(f"{len(devices) - MAX_DEVICES_EXPLAINED} more")
        parts.append(f"{name}: {', '.join(said)}")
    if len(fit.pool_nodes) > MAX_NODES_EXPLAINED:
        parts.append(f"{len(fit.pool_nodes) - MAX_NODES_EXPLAINED} more node(s)")
    return "; " + "; ".join(parts)


def explain(decision: Decision) -> dict[str, Any]:
    """The 429 / deny body: the seed's shape plus a human sentence and the retry hint (null: waiting cannot help)."""
    body: dict[str, Any] = {
        "message": decision.message,
        "requested": {
            "model": decision.model,
            "memory": format_bytes(decision.memory_bytes),
            "replicas": decision.replicas_to,
        },
        "available": decision.available,
        "blocking": [_blocking_body(b) for b in decision.blocking],
    }
    if decision.devices > 1:
        body["requested"]["devices"] = decision.devices
    if not decision.allowed:
        body = {"error": decision.reason, **body, "retry_after_seconds": decision.retry_after}
    return body


def _blocking_body(b: Blocking) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": b.model,
        "memory": format_bytes(b.memory_bytes),
        "idle_for": format_duration(b.idle_for_seconds),
    }
    if b.state != "idle":
        out["state"] = b.state
    if b.pods:
        out["pods"] = list(b.pods)
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
    devices: tuple[int, ...] = ()  # passed: the device indices the pod would get (the bind annotation)


def filter_nodes(
    view: ClusterView, pod: PodRequest, node_names: Iterable[str], now: float, strategy: Strategy = "binpack"
) -> list[NodeVerdict]:
    """Verdict per node for a model pod, with the devices it would take on each node that passes; the pod's
    own reservation (same UID) does not count against it. Devices per replica: the pod's, else its model's."""
    model = view.models.get(pod.model)
    selector = dict(model.node_selector) if model else {}
    selector.update(pod.node_selector)
    device_selector = dict(model.device_selector) if model else {}
    device_selector.update(pod.device_selector)
    count = pod.devices or (model.devices if model else 1)
    need = Need(count, share_bytes(pod.memory_bytes, count), device_selector)
    used = view.used_bytes(now, exclude_uid=pod.uid)
    free_devices = view.device_free(now, exclude_uid=pod.uid)
    by_name = view.node_index
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
            matching = [d for d in node.devices if device_matches(need.selector, d)]
            if len(matching) < need.devices:
                verdicts.append(NodeVerdict(name, "unresolvable", REASON_DEVICES, free, capacity))
                continue
            chosen = choose_devices(node, free_devices[name], need, strategy)
            if sum(1 for d in matching if d.memory_bytes >= need.share_bytes) < need.devices:  # even when empty
                verdicts.append(NodeVerdict(name, "unresolvable", REASON_INSUFFICIENT, free, capacity))
            elif chosen is None:
                verdicts.append(NodeVerdict(name, "failed", REASON_INSUFFICIENT, free, capacity))
            else:
                verdicts.append(NodeVerdict(name, "passed", "", free, capacity, chosen))
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
        packed = max(0, min(10, round(10 * fraction_used_after)))
        # Spread mirrors the rounded binpack score: rounding 1 - x apart can give 1 + 10 (5 bytes on 100).
        scores[v.node] = packed if strategy == "binpack" else 10 - packed
    return scores
