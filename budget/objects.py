"""Kubernetes objects -> the budget view: the one translation every source uses.

Objects are plain dicts as the API returns them (the live cache calls `ApiClient.sanitize_for_serialization`
or reads raw JSON; snapshots are YAML). Only the fields the budget needs are read, and a malformed
one raises :class:`ObjectError` naming the object and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from budget.errors import BudgetError, ObjectError
from budget.quantity import parse_duration, parse_quantity
from budget.view import ClusterView, Model, Node, Placement, PodRequest, model_key

GROUP = "inference.eh-ops.io"  # the InferenceModel API group, also the prefix of our labels and annotations
VERSION = "v1alpha1"  # the InferenceModel API version
LABEL_MODEL = f"{GROUP}/model"
ANNOTATION_MEMORY = f"{GROUP}/memory"
ANNOTATION_CAPACITY = f"{GROUP}/memory-capacity"
ANNOTATION_CAPTURED_AT = f"{GROUP}/captured-at"
GFD_MEMORY = "nvidia.com/gpu.memory"
GFD_COUNT = "nvidia.com/gpu.count"
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


def node_from_object(obj: Obj) -> Node:
    """Capacity: the memory-capacity annotation, else GFD labels (MiB per GPU x count), else none."""
    _, name = _name(obj)
    labels = _str_map(obj, "metadata.labels")
    annotations = _str_map(obj, "metadata.annotations")
    try:
        if ANNOTATION_CAPACITY in annotations:
            capacity = parse_quantity(annotations[ANNOTATION_CAPACITY], field=f"annotation {ANNOTATION_CAPACITY}")
            return Node(name, labels, capacity, "annotation")
        if GFD_MEMORY in labels:
            mib = parse_quantity(labels[GFD_MEMORY], field=f"label {GFD_MEMORY}")
            count = parse_quantity(labels.get(GFD_COUNT, "1"), field=f"label {GFD_COUNT}")
            return Node(name, labels, mib * 2**20 * count, "gfd-labels")
    except BudgetError as exc:
        raise _wrap(obj, exc) from exc
    return Node(name, labels)  # not budgeted


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
        **policy,
    )


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
    started = parse_time(_map(obj, "status").get("startTime"), field="status.startTime")
    deleting = parse_time(meta.get("deletionTimestamp"), field="metadata.deletionTimestamp")
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
    """Nodes, Pods, Deployments and InferenceModels -> one ClusterView (other kinds are ignored)."""
    nodes: list[Node] = []
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
    return ClusterView.build(nodes=nodes, models=models.values(), placements=sorted(placements, key=lambda p: p.pod))


def object_key(obj: Obj) -> str:
    """`namespace/name` of a namespaced object, `name` of a cluster-scoped one (as the cache keys them)."""
    meta = _map(obj, "metadata")
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))
