"""The cluster as the budget sees it: nodes with capacity, models, placements and reservations.

A view is an immutable snapshot. Sources (the live list+watch cache in `kubeview`, an offline YAML
snapshot, local mode's process table) build one, and every decision reads one. Times are POSIX
seconds (float) so the core stays free of clocks: callers pass `now`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any


def model_key(namespace: str, name: str) -> str:
    """The one way a model is named across the product: `namespace/name`."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class Node:
    """A node and its inference memory budget; `capacity_bytes` None means not budgeted."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity_bytes: int | None = None
    capacity_source: str = "none"  # "annotation", "gfd-labels" or "none"


@dataclass(frozen=True)
class Model:
    """One model: memory per replica, where it may run, how long it may idle, how many it wants."""

    namespace: str
    name: str
    memory_bytes: int
    model_name: str = ""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    cooldown_seconds: float = 600.0
    replicas: int = 0
    last_request_time: float | None = None
    backend_url: str | None = None
    source: str = "InferenceModel"  # or "Deployment" for a labelled Deployment without a model object
    startup_seconds: float = 0.0  # how long a replica takes to become ready (estimate; 0 when unknown)
    evict_idle_after_seconds: float | None = None  # idle this long, it may be stopped for another; None: never
    priority: int = 0  # a request may evict only models of lower or equal priority
    pinned: bool = False  # never evicted, whatever its idle time
    max_wait_seconds: float = 0.0  # how long a request that does not fit waits for room by default (0: 429 at once)

    @property
    def key(self) -> str:
        return model_key(self.namespace, self.name)


@dataclass(frozen=True)
class Placement:
    """A replica that holds memory on a node: a bound, not terminated model pod."""

    pod: str  # namespace/name
    node: str
    memory_bytes: int
    model: str  # model key
    uid: str = ""
    phase: str = "Pending"
    started_at: float | None = None
    ready: bool = False
    state: str = "running"  # running | starting (not ready yet) | stopping (asked to go, memory not free yet)
    free_by: float | None = None  # stopping: when its memory is free at the latest (grace period end)


@dataclass(frozen=True)
class Reservation:
    """Memory promised to a pod (by the extender) or to a scale-up (by admission) until `expires_at`."""

    uid: str
    model: str
    memory_bytes: int
    expires_at: float
    node: str
    pod: str = ""


@dataclass(frozen=True)
class PodRequest:
    """A model pod asking for a node (the extender's question)."""

    namespace: str
    name: str
    uid: str
    model: str  # model key
    memory_bytes: int
    node_selector: Mapping[str, str] = field(default_factory=dict)


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every key of the nodeSelector has the same value among the labels."""
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class ClusterView:
    """Everything one decision needs, immutable; build a new view rather than changing one."""

    nodes: tuple[Node, ...] = ()
    models: Mapping[str, Model] = field(default_factory=dict)
    placements: tuple[Placement, ...] = ()
    reservations: tuple[Reservation, ...] = ()

    @classmethod
    def build(
        cls,
        nodes: Iterable[Node] = (),
        models: Iterable[Model] = (),
        placements: Iterable[Placement] = (),
        reservations: Iterable[Reservation] = (),
    ) -> ClusterView:
        return cls(
            nodes=tuple(sorted(nodes, key=lambda n: n.name)),
            models={m.key: m for m in models},
            placements=tuple(placements),
            reservations=tuple(reservations),
        )

    @cached_property
    def node_index(self) -> dict[str, Node]:
        """Nodes by name, built once per view (views are immutable)."""
        return {n.name: n for n in self.nodes}

    @cached_property
    def _placed(self) -> tuple[dict[str, int], dict[str, Placement]]:
        """Placed bytes per node and placements by pod UID, computed once per view."""
        per_node: dict[str, int] = {}
        by_uid: dict[str, Placement] = {}
        for p in self.placements:
            per_node[p.node] = per_node.get(p.node, 0) + p.memory_bytes
            if p.uid:
                by_uid[p.uid] = p
        return per_node, by_uid

    def live_reservations(self, now: float) -> tuple[Reservation, ...]:
        """Reservations not expired and not already confirmed by a placement of the same pod UID."""
        placed = self._placed[1]
        return tuple(r for r in self.reservations if r.expires_at > now and r.uid not in placed)

    def used_bytes(self, now: float, *, exclude_uid: str = "") -> dict[str, int]:
        """Declared memory held per node with any (placements plus live reservations); absent means 0."""
        per_node, by_uid = self._placed
        used = dict(per_node)
        own = by_uid.get(exclude_uid) if exclude_uid else None
        if own is not None:
            used[own.node] -= own.memory_bytes
        for r in self.live_reservations(now):
            if exclude_uid and r.uid == exclude_uid:
                continue
            used[r.node] = used.get(r.node, 0) + r.memory_bytes
        return used

    def free_bytes(self, now: float) -> dict[str, int]:
        """Free budget per budgeted node (may be negative if something overcommitted behind our back)."""
        used = self.used_bytes(now)
        return {
            n.name: n.capacity_bytes - used.get(n.name, 0) for n in self.nodes if n.capacity_bytes is not None
        }

    def _derived(self, **changes: Any) -> ClusterView:
        """A copy with other models or reservations; placements and nodes are the same, so are their caches."""
        new = replace(self, **changes)
        for name in ("_placed", "node_index"):
            if name in self.__dict__:
                new.__dict__[name] = self.__dict__[name]
        return new

    def with_model(self, model: Model) -> ClusterView:
        models = dict(self.models)
        models[model.key] = model
        return self._derived(models=models)

    def with_reservations(self, reservations: Iterable[Reservation]) -> ClusterView:
        return self._derived(reservations=self.reservations + tuple(reservations))

    def find_model(self, ref: str) -> Model | None:
        """Find by `namespace/name`, by bare name, or by the `modelName` clients send (first match)."""
        if ref in self.models:
            return self.models[ref]
        for m in self.models.values():
            if m.name == ref:
                return m
        for m in self.models.values():
            if m.model_name == ref:
                return m
        return None
