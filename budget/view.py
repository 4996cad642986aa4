"""The cluster as the budget sees it: nodes with capacity, models, placements and reservations.

A view is an immutable snapshot. Sources (the live list+watch cache in `kubeview`, an offline YAML
snapshot, local mode's process table) build one, and every decision reads one. Times are POSIX
seconds (float) so the core stays free of clocks: callers pass `now`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from budget.load import LoadTuning

DeviceKind = Literal["gpu", "mig", "unified"]

DEVICE_SELECTOR_KEYS = frozenset({"kind", "profile", "product"})
"""The keys a model's deviceSelector may use: a device matches when each equals its field of that name."""


def model_key(namespace: str, name: str) -> str:
    """The one way a model is named across the product: `namespace/name`."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class Device:
    """One accelerator of a node that a replica's memory is placed on: a GPU, a MIG slice, or unified memory.

    `index` is the number the runtime and the pod annotation `inference.eh-ops.io/devices` use
    (CUDA_VISIBLE_DEVICES); `profile` is a MIG profile (`1g.10gb`), `product` the GPU product, `name`
    the DRA device name; each is "" when the source does not say.
    """

    index: int
    memory_bytes: int
    kind: DeviceKind = "gpu"
    profile: str = ""
    product: str = ""
    name: str = ""

    def label(self) -> str:
        """How people read it: `GPU 1`, `MIG 1g.10gb 3`, `memory` (a unified-memory node's one device)."""
        if self.kind == "unified":
            return "memory"
        if self.kind == "mig":
            return f"MIG {self.profile} {self.index}" if self.profile else f"MIG {self.index}"
        return f"GPU {self.index}"


@dataclass(frozen=True)
class Node:
    """A node and its inference memory budget; `capacity_bytes` None means not budgeted.

    `devices` is where that memory is: a node built with a capacity and no devices has one unified-memory
    device of that size (what every node was before devices existed); one built with devices and no
    capacity has their sum. The two always agree, so readers of `capacity_bytes` keep working.
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity_bytes: int | None = None
    # "annotation" (memory-capacity), "gfd-labels", "gfd-mig-labels", "devices-annotation", "resourceslice",
    # "config" (local mode) or "none"
    capacity_source: str = "none"
    devices: tuple[Device, ...] = ()

    def __post_init__(self) -> None:
        unified = len(self.devices) == 1 and self.devices[0].kind == "unified"
        if unified and self.capacity_bytes is not None:  # derived from the capacity: follows it (replace())
            object.__setattr__(self, "devices", ())
        if self.devices:
            indices = [d.index for d in self.devices]
            if len(set(indices)) != len(indices):
                raise ValueError(f"node {self.name}: device indices must be unique, got {indices}")
            total = sum(d.memory_bytes for d in self.devices)
            if self.capacity_bytes is None:
                object.__setattr__(self, "capacity_bytes", total)
            elif self.capacity_bytes != total:
                raise ValueError(
                    f"node {self.name}: capacity_bytes {self.capacity_bytes} is not the sum of its devices ({total})"
                )
        elif self.capacity_bytes is not None:
            object.__setattr__(self, "devices", (Device(0, self.capacity_bytes, "unified"),))

    def device(self, index: int) -> Device | None:
        """The device with this index, None when the node has none such."""
        return next((d for d in self.devices if d.index == index), None)


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
    devices: int = 1  # a replica is split evenly over this many devices of one node (tensor parallelism)
    device_selector: Mapping[str, str] = field(default_factory=dict)  # keys in DEVICE_SELECTOR_KEYS

    @property
    def device_share_bytes(self) -> int:
        """What each of its devices must have free for one replica: memory / devices, rounded up."""
        return share_bytes(self.memory_bytes, self.devices)
    min_replicas: int = 0  # kept warm: never scaled below this by load or idleness (> 0: exempt from cooldown)
    max_replicas: int = 1  # the load layer adds replicas up to this (1: one replica, as before)
    load: LoadTuning = field(default_factory=LoadTuning)  # the load layer's thresholds (budget.load)

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
    devices: tuple[int, ...] = ()  # device indices on the node; () = not known (see ClusterView.device_used)


@dataclass(frozen=True)
class Reservation:
    """Memory promised to a pod (by the extender) or to a scale-up (by admission) until `expires_at`."""

    uid: str
    model: str
    memory_bytes: int
    expires_at: float
    node: str
    pod: str = ""
    devices: tuple[int, ...] = ()  # device indices on the node; () = not known (see ClusterView.device_used)


@dataclass(frozen=True)
class PodRequest:
    """A model pod asking for a node (the extender's question)."""

    namespace: str
    name: str
    uid: str
    model: str  # model key
    memory_bytes: int
    node_selector: Mapping[str, str] = field(default_factory=dict)
    devices: int = 0  # devices per replica; 0 = the model's (1 when the model is unknown)
    device_selector: Mapping[str, str] = field(default_factory=dict)  # added to the model's


def share_bytes(memory_bytes: int, devices: int) -> int:
    """Memory each of `devices` devices holds for one replica of `memory_bytes`: the ceiling, never less."""
    return -(-memory_bytes // max(1, devices))


def device_matches(selector: Mapping[str, str], device: Device) -> bool:
    """True when every key of a deviceSelector (kind, profile, product) equals that field of the device."""
    return not selector or all(k in DEVICE_SELECTOR_KEYS and getattr(device, k) == v for k, v in selector.items())


def _start_order(h: Placement | Reservation) -> tuple[float, str]:
    """Placements by start time (unknown last), then name; reservations (no start) by pod and UID."""
    started = h.started_at if isinstance(h, Placement) else None
    return math.inf if started is None else started, h.pod or h.uid


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

    @cached_property
    def _placed_devices(self) -> dict[str, dict[int, int]]:
        """Bytes held per device per node by placements alone, computed once per view."""
        return self._charge_devices(self.placements, {})

    def _charge_devices(
        self, holders: Iterable[Placement | Reservation], used: dict[str, dict[int, int]]
    ) -> dict[str, dict[int, int]]:
        """Charge each holder's memory to its devices; holders whose devices are not known come after those
        whose are, in the order given, on the first devices (lowest index) with room (see `device_used`)."""
        later: list[Placement | Reservation] = []
        for h in holders:
            node = self.node_index.get(h.node)
            if node is None:
                continue
            known = [i for i in h.devices if node.device(i) is not None]
            if not h.devices or len(known) != len(set(h.devices)):
                later.append(h)
                continue
            per = used.setdefault(h.node, {})
            for i in known:
                per[i] = per.get(i, 0) + share_bytes(h.memory_bytes, len(known))
        for h in sorted(later, key=_start_order):
            node = self.node_index[h.node]
            model = self.models.get(h.model)
            count = min(len(node.devices), model.devices if model else 1)
            share = share_bytes(h.memory_bytes, count)
            per = used.setdefault(h.node, {})
            free = {d.index: d.memory_bytes - per.get(d.index, 0) for d in node.devices}
            order = sorted(free, key=lambda i: (free[i] < share, i))  # first fit, else (overcommitted) lowest
            for i in order[:count]:
                per[i] = per.get(i, 0) + share
        return used

    def device_used(
        self, now: float, *, exclude_uid: str = "", without: frozenset[str] = frozenset()
    ) -> dict[str, dict[int, int]]:
        """Declared memory held per device per node (placements, then live reservations); absent means 0.

        A replica whose devices are not known (a pod from before devices existed, or without the annotation)
        is charged after those whose devices are, in start order, to the lowest-index devices with room for
        its share: where a process that does not choose its device lands first (CUDA's device 0).
        `exclude_uid` leaves out one pod (the extender's question), `without` every replica of those models.
        """
        placed = self._placed[1]
        if without or (exclude_uid and exclude_uid in placed):
            kept = (p for p in self.placements if not (exclude_uid and p.uid == exclude_uid) and p.model not in without)
            base = self._charge_devices(kept, {})
        else:
            base = self._placed_devices
        used = {node: dict(per) for node, per in base.items()}
        live = [
            r
            for r in self.live_reservations(now)
            if not (exclude_uid and r.uid == exclude_uid) and r.model not in without
        ]
        return self._charge_devices(live, used)

    def device_free(
        self, now: float, *, exclude_uid: str = "", without: frozenset[str] = frozenset()
    ) -> dict[str, dict[int, int]]:
        """Free bytes per device per budgeted node (negative if something overcommitted behind our back)."""
        used = self.device_used(now, exclude_uid=exclude_uid, without=without)
        return {
            n.name: {d.index: d.memory_bytes - used.get(n.name, {}).get(d.index, 0) for d in n.devices}
            for n in self.nodes
            if n.capacity_bytes is not None
        }

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
        for name in ("_placed", "node_index") + (() if "models" in changes else ("_placed_devices",)):
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
