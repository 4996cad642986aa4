"""Kubernetes objects -> the budget view: the one translation every source uses.

Objects are plain dicts as the API returns them (the live cache calls `ApiClient.sanitize_for_serialization`
or reads raw JSON; snapshots are YAML). Only the fields the budget needs are read, and a malformed
one raises :class:`ObjectError` naming the object and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from budget.errors import BudgetError, ObjectError
from budget.load import LoadTuning
from budget.quantity import parse_duration, parse_quantity
from budget.view import (
    DEVICE_SELECTOR_KEYS,
    ClusterView,
    Device,
    DeviceKind,
    Model,
    Node,
    Placement,
    PodRequest,
    model_key,
)

GROUP = "inference.eh-ops.io"  # the InferenceModel API group, also the prefix of our labels and annotations
VERSION = "v1alpha1"  # the InferenceModel API version
LABEL_MODEL = f"{GROUP}/model"
ANNOTATION_MEMORY = f"{GROUP}/memory"
ANNOTATION_CAPACITY = f"{GROUP}/memory-capacity"
ANNOTATION_CAPTURED_AT = f"{GROUP}/captured-at"
# On a Node: the devices and their memory (`4x80Gi`, `80Gi,80Gi,40Gi`); on a pod: the indices it was bound
# to (`0,1`), set by the extender at bind for the model server to select (CUDA_VISIBLE_DEVICES).
ANNOTATION_DEVICES = f"{GROUP}/devices"
GFD_MEMORY = "nvidia.com/gpu.memory"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_MIG_STRATEGY = "nvidia.com/mig.strategy"
# GFD's mixed strategy: nvidia.com/mig-<profile>.count and nvidia.com/mig-<profile>.memory (MiB) per profile.
_GFD_MIG = re.compile(r"^nvidia\.com/mig-(?P<profile>[^/]+)\.(?P<field>count|memory)$")
# The MIG profile at the end of a single-strategy product label: `NVIDIA-A100-SXM4-40GB-MIG-1g.5gb`.
_MIG_PRODUCT = re.compile(r"-MIG-(?P<profile>[0-9]+g\.[0-9]+gb)$")
RESOURCE_API = "resource.k8s.io/v1"  # the DRA API whose ResourceSlices are read (GA since Kubernetes 1.34)
MAX_DEVICES_PER_NODE = 1024  # far above any node's; bounds `1000000x1Gi` before it is built
DEVICE_KINDS: frozenset[str] = frozenset({"gpu", "mig", "unified"})
DEFAULT_COOLDOWN = "10m"
DEFAULT_REPLICAS = 1
TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})

Obj = Mapping[str, Any]


def _describe(obj: Obj) -> str:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        meta = {}
    kind = obj.get("kind") or "object"
    name = meta.get("name", "?")
    ns = meta.get("namespace")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _map(obj: Obj, path: str) -> Mapping[str, Any]:
    """Follow a dotted path of mappings; a missing step is {}, a non-mapping step is an error."""
    current: Any = obj
    for part in path.split("."):
        if current is None:
            return {}
        if not isinstance(current, Mapping):
            raise ObjectError(f"{_describe(obj)}: {path} must be an object")
        current = current.get(part)
    if current is None:
        return {}
    if not isinstance(current, Mapping):
        raise ObjectError(f"{_describe(obj)}: {path} must be an object, got {type(current).__name__}")
    return current


def _str_map(obj: Obj, path: str) -> dict[str, str]:
    value = _map(obj, path)
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ObjectError(f"{_describe(obj)}: {path} must map strings to strings ({k!r}: {v!r})")
        out[k] = v
    return out


def _name(obj: Obj) -> tuple[str, str]:
    meta = _map(obj, "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{obj.get('kind') or 'object'} without metadata.name")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise ObjectError(f"{_describe(obj)}: metadata.namespace must be a string")
    return namespace, name


def rfc3339(moment: float | datetime) -> str:
    """POSIX seconds (or an aware datetime) to RFC 3339 UTC with whole seconds, `2026-01-15T10:30:00Z`, as
    metav1.Time serializes it: the one formatter for status fields, Events and log lines."""
    seconds = moment.timestamp() if isinstance(moment, datetime) else moment
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object, *, field: str = "time") -> float | None:
    """RFC 3339 (`2026-01-15T10:30:00Z`) to POSIX seconds; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if not isinstance(value, str):
        raise ObjectError(f"{field}: expected an RFC 3339 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)  # Python 3.11+ reads RFC 3339's trailing Z
    except ValueError as exc:
        raise ObjectError(f"{field}: {value!r} is not an RFC 3339 time") from exc
    if parsed.tzinfo is None:
        raise ObjectError(f"{field}: {value!r} has no time zone (use Z or +00:00)")
    return parsed.timestamp()


def _wrap(obj: Obj, exc: BudgetError) -> ObjectError:
    return ObjectError(f"{_describe(obj)}: {exc}")


def parse_devices(value: object, *, field: str = f"annotation {ANNOTATION_DEVICES}") -> list[int]:
    """A node's devices as the annotation and local mode's config write them, to bytes per device.

    Comma-separated items, each a memory quantity (the one whole-byte grammar) or `<count>x<quantity>`:
    `4x80Gi` is four devices of 80Gi, `80Gi,80Gi,40Gi` three; `2x80Gi,40Gi` mixes both.
    """
    if not isinstance(value, str) or not value:
        raise ObjectError(f"{field}: expected devices like 4x80Gi or 80Gi,80Gi,40Gi, got {value!r}")
    sizes: list[int] = []
    for item in value.split(","):
        count_text, times, quantity = item.rpartition("x")
        count = 1
        if times:
            if not count_text.isdigit() or not count_text.isascii() or int(count_text) < 1:
                raise ObjectError(f"{field}: {item!r}: the count before 'x' must be a whole number >= 1")
            count = int(count_text)
        if len(sizes) + count > MAX_DEVICES_PER_NODE:
            raise ObjectError(f"{field}: {value!r} has more than {MAX_DEVICES_PER_NODE} devices")
        try:
            memory = parse_quantity(quantity, field=f"{field}: device {item!r}")
        except BudgetError as exc:
            raise ObjectError(str(exc)) from exc
        if memory <= 0:
            raise ObjectError(f"{field}: device {item!r} has no memory")
        sizes.extend([memory] * count)
    return sizes


def parse_device_indices(value: object) -> tuple[int, ...]:
    """A pod's devices annotation (`0,1`) to indices; () when absent or unreadable (devices not known)."""
    if not isinstance(value, str) or not value:
        return ()
    parts = value.split(",")
    if not all(p.isascii() and p.isdigit() for p in parts) or len(parts) > MAX_DEVICES_PER_NODE:
        return ()
    indices = tuple(int(p) for p in parts)
    return indices if len(set(indices)) == len(indices) else ()


def format_device_indices(indices: Iterable[int]) -> str:
    """Indices as the pod annotation and CUDA_VISIBLE_DEVICES write them: `0,1`."""
    return ",".join(str(i) for i in indices)


def _gfd_devices(labels: Mapping[str, str]) -> tuple[tuple[Device, ...], str] | None:
    """Devices from NVIDIA GPU Feature Discovery labels (MiB per device), with the source; None without any."""
    product = labels.get(GFD_PRODUCT, "")
    profiles: dict[str, dict[str, str]] = {}
    for key, value in labels.items():
        found = _GFD_MIG.match(key)
        if found:
            profiles.setdefault(found["profile"], {})[found["field"]] = value
    if profiles:  # mixed strategy: one device per MIG slice, per profile (sorted), numbered in that order
        devices: list[Device] = []
        for profile in sorted(profiles):
            fields = profiles[profile]
            memory_label = f"nvidia.com/mig-{profile}.memory"
            if "memory" not in fields:
                raise ObjectError(f"label {memory_label} is required beside nvidia.com/mig-{profile}.count")
            mib = parse_quantity(fields["memory"], field=f"label {memory_label}")
            count = _count(fields.get("count", "1"), f"label nvidia.com/mig-{profile}.count", len(devices))
            first = len(devices)
            devices.extend(Device(first + i, mib * 2**20, "mig", profile, product) for i in range(count))
        return tuple(devices), "gfd-mig-labels"
    if GFD_MEMORY not in labels:
        return None
    mib = parse_quantity(labels[GFD_MEMORY], field=f"label {GFD_MEMORY}")
    count = _count(labels.get(GFD_COUNT, "1"), f"label {GFD_COUNT}", 0)
    mig = _MIG_PRODUCT.search(product)
    if labels.get(GFD_MIG_STRATEGY) == "single" and mig:  # single strategy: the GPU labels describe the slices
        return tuple(Device(i, mib * 2**20, "mig", mig["profile"], product) for i in range(count)), "gfd-mig-labels"
    return tuple(Device(i, mib * 2**20, "gpu", "", product) for i in range(count)), "gfd-labels"


def _count(text: str, field: str, already: int) -> int:
    count = parse_quantity(text, field=field)
    if already + count > MAX_DEVICES_PER_NODE:
        raise ObjectError(f"{field}: {text!r} is more than {MAX_DEVICES_PER_NODE} devices")
    return count


def node_from_object(obj: Obj) -> Node:
    """Capacity and devices: the devices annotation, else the memory-capacity annotation (one unified-memory
    device), else GFD labels (MIG slices per profile, or GPUs: MiB per device x count), else none."""
    _, name = _name(obj)
    labels = _str_map(obj, "metadata.labels")
    annotations = _str_map(obj, "metadata.annotations")
    try:
        if ANNOTATION_DEVICES in annotations:
            sizes = parse_devices(annotations[ANNOTATION_DEVICES])
            product = labels.get(GFD_PRODUCT, "")
            devices = tuple(Device(i, size, "gpu", "", product) for i, size in enumerate(sizes))
            return Node(name, labels, None, "devices-annotation", devices)
        if ANNOTATION_CAPACITY in annotations:
            capacity = parse_quantity(annotations[ANNOTATION_CAPACITY], field=f"annotation {ANNOTATION_CAPACITY}")
            return Node(name, labels, capacity, "annotation")
        gfd = _gfd_devices(labels)
    except BudgetError as exc:
        raise _wrap(obj, exc) from exc
    if gfd is not None and gfd[0]:
        return Node(name, labels, None, gfd[1], gfd[0])
    if gfd is not None:  # a GPU count of 0: budgeted, with nothing to place on
        return Node(name, labels, 0, gfd[1], ())
    return Node(name, labels)  # not budgeted


def _attribute(device: Mapping[str, Any], name: str) -> object:
    """A DRA device attribute's value by its name, qualified (`gpu.nvidia.com/profile`) or not."""
    attributes = device.get("attributes")
    if not isinstance(attributes, Mapping):
        return None
    for key, value in attributes.items():
        if isinstance(key, str) and key.rpartition("/")[2] == name and isinstance(value, Mapping):
            for kind in ("string", "int"):  # the kinds of the attributes read here (profile, type, productName, index)
                if kind in value:
                    return value[kind]
    return None


def _memory_capacity(obj: Obj, device: Mapping[str, Any]) -> int | None:
    capacity = device.get("capacity")
    if not isinstance(capacity, Mapping):
        return None
    for key, value in capacity.items():
        if isinstance(key, str) and key.rpartition("/")[2] == "memory":
            amount = value.get("value") if isinstance(value, Mapping) else None
            try:
                return parse_quantity(amount, field=f"device {device.get('name')!r} capacity {key}")
            except BudgetError as exc:
                raise _wrap(obj, exc) from exc
    return None


def _natural(name: str) -> tuple[tuple[bool, Any], ...]:
    """`gpu-10` after `gpu-2`: digit runs compare as numbers, and before text at the same place."""
    return tuple((not part.isdigit(), int(part) if part.isdigit() else part) for part in re.split(r"([0-9]+)", name))


def devices_from_resourceslices(slices: Iterable[Obj]) -> dict[str, tuple[Device, ...]]:
    """`resource.k8s.io/v1` ResourceSlices -> devices with a memory capacity, per node (a pure translation).

    Only slices with `spec.nodeName` count (devices of one node), and per driver pool only the highest
    `spec.pool.generation` (older slices are stale, as the DRA API says). A device with a `profile`
    attribute (or `type: mig`) is a MIG slice; `productName` is its product. A node's devices are
    numbered 0.. by driver, then the `index` attribute (GPUs without one last), then name (`gpu-2` before
    `gpu-10`), so full GPUs keep the index the driver gives them.
    """
    latest: dict[tuple[str, str], int] = {}
    usable: list[tuple[Obj, str, str, int]] = []
    for obj in slices:
        spec = _map(obj, "spec")
        node = spec.get("nodeName")
        if not isinstance(node, str) or not node:
            continue
        driver = str(spec.get("driver") or "")
        pool = _map(obj, "spec.pool")
        generation = pool.get("generation", 0)
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise ObjectError(f"{_describe(obj)}: spec.pool.generation must be an integer, got {generation!r}")
        key = (driver, str(pool.get("name") or node))
        latest[key] = max(latest.get(key, generation), generation)
        usable.append((obj, node, driver, generation))
    found: dict[str, list[tuple[tuple[Any, ...], Device]]] = {}
    for obj, node, driver, generation in usable:
        pool_name = str(_map(obj, "spec.pool").get("name") or node)
        if generation != latest[(driver, pool_name)]:
            continue
        devices = _map(obj, "spec").get("devices") or []
        if not isinstance(devices, list):
            raise ObjectError(f"{_describe(obj)}: spec.devices must be a list")
        for device in devices:
            if not isinstance(device, Mapping):
                raise ObjectError(f"{_describe(obj)}: spec.devices entries must be objects")
            memory = _memory_capacity(obj, device)
            if memory is None:
                continue  # not an accelerator with memory (a NIC, a counter set): not budgeted
            name = str(device.get("name") or "")
            profile = _attribute(device, "profile")
            kind: DeviceKind = "mig" if profile or _attribute(device, "type") == "mig" else "gpu"
            index = _attribute(device, "index")
            has_index = isinstance(index, int) and not isinstance(index, bool) and kind == "gpu"
            order = (driver, not has_index, index if has_index else 0, _natural(name))
            product = _attribute(device, "productName")
            found.setdefault(node, []).append(
                (order, Device(0, memory, kind, str(profile or ""), str(product or ""), name))
            )
    return {
        node: tuple(replace(d, index=i) for i, (_, d) in enumerate(sorted(entries, key=lambda e: e[0])))
        for node, entries in found.items()
    }


def apply_resourceslices(nodes: Iterable[Node], slices: Iterable[Obj]) -> list[Node]:
    """Nodes with the devices their ResourceSlices publish: slices win over labels and annotations."""
    published = devices_from_resourceslices(slices)
    return [
        replace(n, capacity_bytes=None, capacity_source="resourceslice", devices=published[n.name])
        if published.get(n.name)
        else n
        for n in nodes
    ]


def model_from_inferencemodel(obj: Obj) -> Model:
    namespace, name = _name(obj)
    spec = _map(obj, "spec")
    status = _map(obj, "status")
    try:
        if "memory" not in spec:
            raise ObjectError("spec.memory is required")
        memory = parse_quantity(spec["memory"], field="spec.memory")
        cooldown = parse_duration(spec.get("cooldownPeriod", DEFAULT_COOLDOWN), field="spec.cooldownPeriod")
        replicas = spec.get("replicas", DEFAULT_REPLICAS)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ObjectError(f"spec.replicas must be a non-negative integer, got {replicas!r}")
        model_name = spec.get("modelName") or name
        if not isinstance(model_name, str):
            raise ObjectError(f"spec.modelName must be a string, got {model_name!r}")
        backend = spec.get("backendUrl")
        if backend is not None and not isinstance(backend, str):
            raise ObjectError(f"spec.backendUrl must be a string, got {backend!r}")
        last = parse_time(status.get("lastRequestTime"), field="status.lastRequestTime")
        policy = _eviction_policy(obj)
        devices = spec.get("devices", 1)
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ObjectError(f"spec.devices must be an integer >= 1, got {devices!r}")
        device_selector = device_selector_from(_str_map(obj, "spec.deviceSelector"), "spec.deviceSelector")
        scaling = load_fields(obj)
    except ObjectError as exc:
        raise _wrap(obj, exc) from exc
    except BudgetError as exc:
        raise _wrap(obj, exc) from exc
    return Model(
        namespace=namespace,
        name=name,
        memory_bytes=memory,
        model_name=model_name,
        node_selector=_str_map(obj, "spec.nodeSelector"),
        cooldown_seconds=cooldown,
        replicas=replicas,
        last_request_time=last,
        backend_url=backend,
        devices=devices,
        device_selector=device_selector,
        **policy,
        **scaling,
    )


def device_selector_from(selector: Mapping[str, str], field: str) -> dict[str, str]:
    """A deviceSelector checked: keys kind, profile, product; kind one of gpu, mig, unified."""
    for key, value in selector.items():
        if key not in DEVICE_SELECTOR_KEYS:
            raise ObjectError(f"{field}: unknown key {key!r} (use {', '.join(sorted(DEVICE_SELECTOR_KEYS))})")
        if key == "kind" and value not in DEVICE_KINDS:
            raise ObjectError(f"{field}.kind must be one of {', '.join(sorted(DEVICE_KINDS))}, got {value!r}")
    return dict(selector)


def _eviction_policy(obj: Obj) -> dict[str, Any]:
    """spec.eviction.idleAfter, spec.priority, spec.pinned and spec.admission.maxWait as Model fields."""
    spec = _map(obj, "spec")
    idle_after = _map(obj, "spec.eviction").get("idleAfter")
    max_wait = _map(obj, "spec.admission").get("maxWait")
    priority = spec.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ObjectError(f"spec.priority must be an integer, got {priority!r}")
    pinned = spec.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ObjectError(f"spec.pinned must be true or false, got {pinned!r}")
    return {
        "evict_idle_after_seconds": None
        if idle_after is None
        else parse_duration(idle_after, field="spec.eviction.idleAfter"),
        "priority": priority,
        "pinned": pinned,
        "max_wait_seconds": 0.0 if max_wait is None else parse_duration(max_wait, field="spec.admission.maxWait"),
    }


def _whole(spec: Mapping[str, Any], field: str, default: int, where: str = "spec") -> int:
    value = spec.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ObjectError(f"{where}.{field} must be a non-negative integer, got {value!r}")
    return value


def _fraction(spec: Mapping[str, Any], field: str, default: float) -> float:
    """A number in (0, 1], given as a number or a string (the CRD takes "0.8" too)."""
    value = spec.get(field, default)
    problem = ObjectError(f"spec.load.{field} must be a number above 0 and at most 1, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise problem
    try:
        number = float(value)
    except ValueError:
        raise problem from None
    if not 0 < number <= 1:  # NaN too
        raise problem
    return number


def load_fields(obj: Obj) -> dict[str, Any]:
    """spec.minReplicas, spec.maxReplicas (min <= max) and spec.load as Model fields (budget.load)."""
    spec = _map(obj, "spec")
    low = _whole(spec, "minReplicas", 0)
    high = _whole(spec, "maxReplicas", 1)
    if low > high:
        raise ObjectError(f"spec.minReplicas ({low}) must not exceed spec.maxReplicas ({high})")
    raw = spec.get("load") or {}
    if not isinstance(raw, Mapping):
        raise ObjectError(f"spec.load must be an object, got {type(raw).__name__}")
    default = LoadTuning()
    concurrency = raw.get("concurrency")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ObjectError(f"spec.load.concurrency must be a positive integer, got {concurrency!r}")
    waiting = _whole(raw, "waitingSaturation", default.waiting_saturation, "spec.load")
    if waiting < 1:
        raise ObjectError(f"spec.load.waitingSaturation must be at least 1, got {waiting!r}")
    up, down = raw.get("scaleUpStabilization"), raw.get("scaleDownStabilization")
    tuning = LoadTuning(
        kv_saturation=_fraction(raw, "kvCacheSaturation", default.kv_saturation),
        waiting_saturation=waiting,
        concurrency=concurrency,
        margin=_fraction(raw, "margin", default.margin),
        scale_up_window_seconds=default.scale_up_window_seconds
        if up is None
        else parse_duration(up, field="spec.load.scaleUpStabilization"),
        scale_down_window_seconds=default.scale_down_window_seconds
        if down is None
        else parse_duration(down, field="spec.load.scaleDownStabilization"),
    )
    return {"min_replicas": low, "max_replicas": high, "load": tuning}


def model_label(obj: Obj) -> str | None:
    """The InferenceModel name a Pod or Deployment belongs to, from its label."""
    return _str_map(obj, "metadata.labels").get(LABEL_MODEL)


def model_from_deployment(obj: Obj) -> Model | None:
    """A labelled Deployment as a model (memory from its pod template's annotation); None if unlabelled."""
    label = model_label(obj)
    if not label:
        return None
    namespace, _ = _name(obj)
    annotations = _str_map(obj, "spec.template.metadata.annotations")
    try:
        if ANNOTATION_MEMORY not in annotations:
            raise ObjectError(f"spec.template.metadata.annotations[{ANNOTATION_MEMORY!r}] is required")
        memory = parse_quantity(annotations[ANNOTATION_MEMORY], field=f"annotation {ANNOTATION_MEMORY}")
        replicas = _map(obj, "spec").get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ObjectError(f"spec.replicas must be a non-negative integer, got {replicas!r}")
    except BudgetError as exc:
        raise _wrap(obj, exc) from exc
    return Model(
        namespace=namespace,
        name=label,
        memory_bytes=memory,
        model_name=label,
        node_selector=_str_map(obj, "spec.template.spec.nodeSelector"),
        cooldown_seconds=0.0,
        replicas=replicas,
        source="Deployment",
    )


def pod_memory(obj: Obj) -> int | None:
    annotations = _str_map(obj, "metadata.annotations")
    if ANNOTATION_MEMORY not in annotations:
        return None
    try:
        return parse_quantity(annotations[ANNOTATION_MEMORY], field=f"annotation {ANNOTATION_MEMORY}")
    except BudgetError as exc:
        raise _wrap(obj, exc) from exc


def _ready_condition(obj: Obj) -> str | None:
    """The status of the pod's Ready condition ("True", "False", ...), None when it has none."""
    conditions = _map(obj, "status").get("conditions") or []
    if not isinstance(conditions, list):
        return None
    for c in conditions:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            return str(c.get("status"))
    return None


def _pod_ready(obj: Obj) -> bool:
    return _ready_condition(obj) == "True"


def _pod_state(obj: Obj, phase: str, deleting: float | None) -> str:
    """stopping once deleted; starting while Pending or explicitly not Ready; else running."""
    if deleting is not None:
        return "stopping"
    if phase == "Pending" or _ready_condition(obj) not in (None, "True"):
        return "starting"
    return "running"


def placement_from_pod(obj: Obj, *, fallback_memory: int | None = None) -> Placement | None:
    """A model pod bound to a node and not terminated holds its memory there; anything else is None."""
    label = model_label(obj)
    if not label:
        return None
    namespace, name = _name(obj)
    node = _map(obj, "spec").get("nodeName")
    phase = _map(obj, "status").get("phase") or "Pending"
    if not node or phase in TERMINATED_PHASES:
        return None
    memory = pod_memory(obj)
    if memory is None:
        memory = fallback_memory
    if memory is None:
        raise ObjectError(f"{_describe(obj)}: model pod without annotation {ANNOTATION_MEMORY!r}")
    meta = _map(obj, "metadata")
    try:
        started = parse_time(_map(obj, "status").get("startTime"), field="status.startTime")
        deleting = parse_time(meta.get("deletionTimestamp"), field="metadata.deletionTimestamp")
    except BudgetError as exc:
        raise _wrap(obj, exc) from exc
    ready = _pod_ready(obj)
    # A deleted pod holds its memory until it is gone: at the latest at its deletionTimestamp (grace end).
    state = _pod_state(obj, str(phase), deleting)
    return Placement(
        pod=f"{namespace}/{name}",
        node=str(node),
        memory_bytes=memory,
        model=model_key(namespace, label),
        uid=str(meta.get("uid") or ""),
        phase=str(phase),
        started_at=started,
        ready=ready,
        state=state,
        free_by=deleting,
        devices=parse_device_indices(_str_map(obj, "metadata.annotations").get(ANNOTATION_DEVICES)),
    )


def pod_request_from_pod(obj: Obj, *, fallback_memory: int | None = None) -> PodRequest | None:
    """The extender's question for a pod; None when the pod is not a budgeted model replica."""
    label = model_label(obj)
    if not label:
        return None
    namespace, name = _name(obj)
    memory = pod_memory(obj)
    if memory is None:
        memory = fallback_memory
    if memory is None:
        return None
    return PodRequest(
        namespace=namespace,
        name=name,
        uid=str(_map(obj, "metadata").get("uid") or ""),
        model=model_key(namespace, label),
        memory_bytes=memory,
        node_selector=_str_map(obj, "spec.nodeSelector"),
    )


def flatten(objects: Iterable[Any]) -> list[Obj]:
    """Expand `kind: List` / `*List` documents into their items; drop empty documents."""
    out: list[Obj] = []
    for obj in objects:
        if obj is None:
            continue
        if not isinstance(obj, Mapping):
            raise ObjectError(f"expected a Kubernetes object (a mapping), got {type(obj).__name__}")
        kind = obj.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in obj:
            items = obj.get("items") or []
            if not isinstance(items, list):
                raise ObjectError(f"{kind}: items must be a list")
            out.extend(flatten(items))
        else:
            out.append(obj)
    return out


def fallback_memory(pod: Obj, models: Mapping[str, Model]) -> int | None:
    """The memory of a model pod without the annotation (an adopted Deployment's): its model's, if known."""
    label = model_label(pod)
    if not label:
        return None
    found = models.get(model_key(_name(pod)[0], label))
    return found.memory_bytes if found else None


def merge_models(inference_models: Iterable[Model], deployment_models: Iterable[Model]) -> dict[str, Model]:
    """InferenceModels win; a labelled Deployment adds a model or raises its desired replicas.

    Callers pass both in a fixed order (by object key), so the result never depends on arrival order."""
    models = {m.key: m for m in inference_models}
    for dm in deployment_models:
        existing = models.get(dm.key)
        if existing is None:
            models[dm.key] = dm
        elif dm.replicas > existing.replicas:
            # The Deployment asks for more than the model object: budget for the larger.
            models[dm.key] = replace(existing, replicas=dm.replicas)
    return models


def view_from_objects(objects: Iterable[Any]) -> ClusterView:
    """Nodes, ResourceSlices, Pods, Deployments and InferenceModels -> one ClusterView (other kinds are ignored)."""
    nodes: list[Node] = []
    slices: list[Obj] = []
    inference_models: list[tuple[str, Model]] = []
    deployment_models: list[tuple[str, Model]] = []
    pods: list[Obj] = []
    for obj in flatten(objects):
        kind = obj.get("kind")
        if kind == "Node":
            nodes.append(node_from_object(obj))
        elif kind == "InferenceModel":
            inference_models.append((object_key(obj), model_from_inferencemodel(obj)))
        elif kind == "Deployment":
            dm = model_from_deployment(obj)
            if dm is not None:
                deployment_models.append((object_key(obj), dm))
        elif kind == "Pod":
            pods.append(obj)
        elif kind == "ResourceSlice":
            slices.append(obj)
        elif not isinstance(kind, str):
            raise ObjectError(f"{_describe(obj)}: missing kind")
    models = merge_models(
        (m for _, m in sorted(inference_models, key=lambda km: km[0])),
        (m for _, m in sorted(deployment_models, key=lambda km: km[0])),
    )
    placements = []
    for pod in pods:
        p = placement_from_pod(pod, fallback_memory=fallback_memory(pod, models))
        if p is not None:
            placements.append(p)
    return ClusterView.build(
        nodes=apply_resourceslices(nodes, slices),
        models=models.values(),
        placements=sorted(placements, key=lambda p: p.pod),
    )


def object_key(obj: Obj) -> str:
    """`namespace/name` of a namespaced object, `name` of a cluster-scoped one (as the cache keys them)."""
    meta = _map(obj, "metadata")
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))
