"""InferenceModel -> Deployment and Service: the pure translation the controller applies.

Why this module exists: the shape of a model's workload is a function of the InferenceModel alone, so
it is computed here without I/O, tested as a table, and sent with server-side apply (the API server
merges; the controller never read-modify-writes). A template that cannot become a Deployment raises
:class:`TemplateError` naming the field, which the controller turns into a condition and an Event.

Every model pod carries the label ``inference.eh-ops.io/model: <name>``, the annotation
``inference.eh-ops.io/memory: <spec.memory>`` and the budget-aware ``schedulerName``, so the extender
and the webhook see exactly what the model declared.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from budget import BudgetError, parse_quantity
from budget.objects import ANNOTATION_MEMORY, DEFAULT_REPLICAS, GROUP, LABEL_MODEL, VERSION
from controller.errors import SpecError, TemplateError

API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceModel"
FIELD_MANAGER = "inference-budget-controller"
DEFAULT_SCHEDULER_NAME = "inference-budget-scheduler"
DEFAULT_PORT = 8000
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "inference-budget-controller"
# A rollout must never need memory beyond the budget: replace pods one by one, no surge.
ROLLING_UPDATE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Obj = Mapping[str, Any]
Mode = Literal["template", "deploymentRef", "external", "none"]


@dataclass(frozen=True)
class Workload:
    """How a model's replicas come to exist: its own Deployment, an adopted one, an external URL, or nothing."""

    mode: Mode
    deployment_name: str | None = None

    @property
    def managed(self) -> bool:
        """True when the controller scales a Deployment for this model."""
        return self.mode in ("template", "deploymentRef")


def _meta(obj: Obj) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Obj) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def name_of(obj: Obj) -> tuple[str, str]:
    """(namespace, name) of an object; namespace defaults to `default`."""
    meta = _meta(obj)
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def workload_of(model: Obj) -> Workload:
    """Which workload a model has; raises SpecError when the spec asks for two or names nothing usable."""
    spec = _spec(model)
    template = spec.get("template")
    ref = spec.get("deploymentRef")
    if template is not None and ref is not None:
        raise SpecError("spec.template and spec.deploymentRef are exclusive: set one", reason="InvalidSpec")
    if ref is not None:
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref.get("name"):
            raise SpecError("spec.deploymentRef.name must name a Deployment in the model's namespace")
        return Workload("deploymentRef", str(ref["name"]))
    if template is not None:
        return Workload("template", name_of(model)[1])
    if spec.get("backendUrl"):
        return Workload("external")
    return Workload("none")


def memory_text(model: Obj) -> str:
    """spec.memory as written (the pod annotation carries it verbatim); raises SpecError if not a quantity."""
    value = _spec(model).get("memory")
    if value is None:
        raise SpecError("spec.memory is required", reason="InvalidSpec")
    try:
        parse_quantity(value, field="spec.memory")
    except BudgetError as exc:
        raise SpecError(str(exc), reason="InvalidSpec") from exc
    return str(value)


def desired_replicas(model: Obj) -> int:
    """spec.replicas with the CRD's default; a bad value is a SpecError."""
    replicas = _spec(model).get("replicas", DEFAULT_REPLICAS)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise SpecError(f"spec.replicas must be a non-negative integer, got {replicas!r}")
    return replicas


def model_port(model: Obj) -> int:
    port = _spec(model).get("port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError(f"spec.port must be an integer 1..65535, got {port!r}")
    return port


def selector_labels(name: str) -> dict[str, str]:
    """The label every pod of the model carries, and the Deployment and Service select on."""
    return {LABEL_MODEL: name}


def selector_string(name: str) -> str:
    """The model's label selector as a string (status.selector, read by the scale subresource)."""
    return f"{LABEL_MODEL}={name}"


def owner_reference(model: Obj) -> dict[str, Any]:
    """A controller owner reference: deleting the model garbage-collects what it owns."""
    meta = _meta(model)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": str(meta.get("name") or ""),
        "uid": str(meta.get("uid") or ""),
        "controller": True,
    }


def controlled_by(obj: Obj, model: Obj) -> bool:
    """True when `obj` has a controller owner reference to this very model (same UID)."""
    uid = _meta(model).get("uid")
    refs = _meta(obj).get("ownerReferences") or []
    return any(
        isinstance(r, Mapping) and r.get("controller") and r.get("kind") == KIND and r.get("uid") == uid for r in refs
    )


def _string_map(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TemplateError(f"{path} must be an object mapping strings to strings")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TemplateError(f"{path} must map strings to strings; {k!r}: {v!r} is not")
        out[k] = v
    return out


def _check_model_name(name: str) -> None:
    if not name:
        raise SpecError("metadata.name is missing")
    if len(name) > 63 or not _LABEL_VALUE.match(name):
        raise SpecError(
            f"metadata.name {name!r} cannot be a label value (at most 63 characters, alphanumeric, "
            "'-', '_' or '.'): model pods are labelled with it"
        )


def _merged_node_selector(model: Obj, pod_spec: Mapping[str, Any], path: str) -> dict[str, str]:
    """The template's nodeSelector plus the model's pool; a key with two values is an error."""
    merged = _string_map(pod_spec.get("nodeSelector"), f"{path}.nodeSelector")
    pool = _string_map(_spec(model).get("nodeSelector"), "spec.nodeSelector")
    for key, value in pool.items():
        if key in merged and merged[key] != value:
            raise TemplateError(f"{path}.nodeSelector[{key!r}] is {merged[key]!r} but spec.nodeSelector says {value!r}")
        merged[key] = value
    return merged


def _check_containers(pod_spec: Mapping[str, Any]) -> None:
    containers = pod_spec.get("containers")
    path = "spec.template.spec.containers"
    if not isinstance(containers, list) or not containers:
        raise TemplateError(f"{path} must list at least one container")
    seen: set[str] = set()
    for i, container in enumerate(containers):
        if not isinstance(container, Mapping):
            raise TemplateError(f"{path}[{i}] must be an object")
        name = container.get("name")
        if not isinstance(name, str) or not _DNS1123_LABEL.match(name) or len(name) > 63:
            raise TemplateError(f"{path}[{i}].name must be a DNS-1123 label (e.g. 'server'), got {name!r}")
        if name in seen:
            raise TemplateError(f"{path}[{i}].name {name!r} is used twice")
        seen.add(name)
        image = container.get("image")
        if not isinstance(image, str) or not image.strip():
            raise TemplateError(f"{path}[{i}] ({name}) needs an image")


def pod_template(model: Obj, template: Any, *, scheduler_name: str) -> dict[str, Any]:
    """A model's PodTemplateSpec made budget-aware: label, memory annotation, scheduler, pool."""
    _, name = name_of(model)
    _check_model_name(name)
    memory = memory_text(model)
    if not isinstance(template, Mapping):
        raise TemplateError("spec.template must be an object (a PodTemplateSpec)")
    meta = template.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        raise TemplateError("spec.template.metadata must be an object")
    meta = meta or {}
    pod_spec = template.get("spec")
    if not isinstance(pod_spec, Mapping):
        raise TemplateError("spec.template.spec is required (the pod's containers)")
    _check_containers(pod_spec)
    restart = pod_spec.get("restartPolicy")
    if restart not in (None, "Always"):
        raise TemplateError(f"spec.template.spec.restartPolicy must be Always for a Deployment, got {restart!r}")
    labels = _string_map(meta.get("labels"), "spec.template.metadata.labels")
    if labels.get(LABEL_MODEL, name) != name:
        raise TemplateError(
            f"spec.template.metadata.labels[{LABEL_MODEL!r}] is {labels[LABEL_MODEL]!r}; "
            f"it must be the model's name {name!r} or absent"
        )
    labels[LABEL_MODEL] = name
    annotations = _string_map(meta.get("annotations"), "spec.template.metadata.annotations")
    annotations[ANNOTATION_MEMORY] = memory
    node_selector = _merged_node_selector(model, pod_spec, "spec.template.spec")

    out_spec = copy.deepcopy(dict(pod_spec))
    out_spec["schedulerName"] = scheduler_name
    if node_selector:
        out_spec["nodeSelector"] = node_selector
    out_meta = {k: copy.deepcopy(v) for k, v in meta.items() if k not in ("name", "namespace")}
    out_meta["labels"] = labels
    out_meta["annotations"] = annotations
    return {"metadata": out_meta, "spec": out_spec}


def desired_deployment(model: Obj, *, scheduler_name: str = DEFAULT_SCHEDULER_NAME) -> dict[str, Any]:
    """The Deployment a template-mode model owns, as a server-side apply configuration."""
    namespace, name = name_of(model)
    template = pod_template(model, _spec(model).get("template"), scheduler_name=scheduler_name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**selector_labels(name), LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "replicas": desired_replicas(model),
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": copy.deepcopy(ROLLING_UPDATE),
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def adoption_config(model: Obj, deployment: Obj, *, scheduler_name: str = DEFAULT_SCHEDULER_NAME) -> dict[str, Any]:
    """The fields the controller owns on an adopted Deployment (replicas, pod label/annotation/scheduler).

    No owner reference: the Deployment was made by someone else and outlives the model.
    """
    namespace, name = name_of(model)
    _check_model_name(name)
    dep_ns, dep_name = name_of(deployment)
    template = _spec(deployment).get("template")
    if not isinstance(template, Mapping):
        raise TemplateError(f"Deployment {dep_name} has no spec.template")
    raw_spec = template.get("spec")
    pod_spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    labels = _string_map(_meta(template).get("labels"), f"Deployment {dep_name} spec.template.metadata.labels")
    if labels.get(LABEL_MODEL, name) != name:
        raise SpecError(
            f"Deployment {dep_name} pods are labelled {LABEL_MODEL}={labels[LABEL_MODEL]}, "
            f"not {name}: it belongs to another model",
            reason="DeploymentConflict",
        )
    node_selector = _merged_node_selector(model, pod_spec, f"Deployment {dep_name} spec.template.spec")
    pod: dict[str, Any] = {"schedulerName": scheduler_name}
    if node_selector:
        pod["nodeSelector"] = node_selector
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": dep_name, "namespace": dep_ns or namespace, "labels": selector_labels(name)},
        "spec": {
            "replicas": desired_replicas(model),
            "template": {
                "metadata": {
                    "labels": selector_labels(name),
                    "annotations": {ANNOTATION_MEMORY: memory_text(model)},
                },
                "spec": pod,
            },
        },
    }


def desired_service(model: Obj) -> dict[str, Any] | None:
    """A ClusterIP Service selecting the model's pods on spec.port; None if the name cannot be a Service."""
    namespace, name = name_of(model)
    if len(name) > 63 or not _DNS1035_LABEL.match(name):
        return None
    port = model_port(model)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**selector_labels(name), LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def contains(live: Any, desired: Any) -> bool:
    """True when every field of `desired` is present in `live` with the same value (lists element-wise).

    The API server adds defaults (imagePullPolicy, terminationMessagePath, ...): those are ignored, so
    an unchanged object is never re-applied.
    """
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(k in live and contains(live[k], v) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return False
        return all(contains(lv, dv) for lv, dv in zip(live, desired, strict=True))
    return bool(live == desired)
