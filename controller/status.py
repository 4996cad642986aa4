"""What an InferenceModel's status should say, and the smallest patch that makes it so.

Why this module exists: status is computed from what the controller saw (the model, its Deployment,
its pods, a reconcile problem, the memory advice) by pure functions, then diffed against the status the
API server has, so the controller writes only when something changed and a restarted controller writes
nothing at all. Conditions keep their ``lastTransitionTime`` while their status stays the same.

The controller owns every status field except ``lastRequestTime`` (the proxy's), which it never writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from budget.objects import rfc3339
from controller.translate import Workload, selector_string

# Status fields this controller writes; anything else (lastRequestTime) belongs to someone else.
OWNED_FIELDS = (
    "ready",
    "replicas",
    "readyReplicas",
    "selector",
    "observedGeneration",
    "conditions",
    "declaredMemory",
    "observedPeakMemory",
    "utilizationPercent",
    "recommendation",
    "lastObservation",
    "replicasWanted",
    "replicasAllowed",
    "loadMessage",
)
CONDITION_TYPES = ("Ready", "Scheduled", "Reconciled")


@dataclass(frozen=True)
class Problem:
    """Why the workload could not be reconciled: a CamelCase reason and a sentence for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class PendingPod:
    """A model pod the scheduler has not placed, with the scheduler's own words."""

    name: str
    reason: str  # PodScheduled condition reason (Unschedulable, SchedulerError) or "" when not tried yet
    message: str


@dataclass(frozen=True)
class LoadReport:
    """The load layer's word on a model (controller/load.py): replicas wanted, how many the budget allows
    (equal unless it refuses a step), and the last step or refusal in a sentence."""

    wanted: int
    allowed: int
    message: str


@dataclass(frozen=True)
class Advice:
    """The observed-memory fields of status, already formatted for people."""

    declared_memory: str
    observed_peak_memory: str | None = None
    utilization_percent: int | None = None
    recommendation: str | None = None
    last_observation: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything the status is computed from (no I/O: the controller fills it in)."""

    workload: Workload
    generation: int
    desired_replicas: int
    replicas: int = 0
    ready_replicas: int = 0
    pods_total: int = 0
    pending: Sequence[PendingPod] = field(default_factory=tuple)
    problem: Problem | None = None
    advice: Advice | None = None
    load: LoadReport | None = None
    clear_load: bool = False  # not load-scaled (any more): remove the load fields a former report left


def pending_pods(pods: Sequence[Mapping[str, Any]]) -> list[PendingPod]:
    """Model pods not bound to a node and not being deleted, with their PodScheduled condition."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        if spec.get("nodeName") or meta.get("deletionTimestamp") or status.get("phase") not in (None, "Pending"):
            continue
        reason, message = "", ""
        for cond in status.get("conditions") or []:
            if isinstance(cond, Mapping) and cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = str(cond.get("reason") or "Unschedulable")
                message = str(cond.get("message") or "")
        out.append(PendingPod(str(meta.get("name") or "?"), reason, message))
    out.sort(key=lambda p: p.name)
    return out


def live_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods not being deleted and not terminated."""
    return [
        p
        for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]


def _ready(o: Observed) -> tuple[bool, dict[str, str]]:
    """The Ready condition: can the model answer a request right now, and why (not)."""
    if o.problem is not None and o.ready_replicas == 0:
        return False, {"status": "False", "reason": o.problem.reason, "message": o.problem.message}
    mode = o.workload.mode
    if mode == "external":
        return True, {"status": "True", "reason": "External", "message": "served by spec.backendUrl; no Deployment"}
    if mode == "none":
        return False, {
            "status": "False",
            "reason": "NoWorkload",
            "message": "set spec.template, spec.deploymentRef or spec.backendUrl",
        }
    if o.desired_replicas == 0 and o.ready_replicas == 0:
        return False, {
            "status": "False",
            "reason": "ScaledToZero",
            "message": "0 replicas; the proxy starts one on the next request",
        }
    counts = f"{o.ready_replicas}/{o.desired_replicas} replicas ready"
    if o.ready_replicas > 0:
        if o.problem is not None:
            counts += f"; not reconciled: {o.problem.message}"
        return True, {"status": "True", "reason": "Available", "message": counts}
    if o.pending and o.pending[0].reason:
        return False, {"status": "False", "reason": "Unschedulable", "message": f"{counts}; pods cannot be placed"}
    return False, {"status": "False", "reason": "Starting", "message": counts}


def _scheduled(o: Observed) -> dict[str, str]:
    """The Scheduled condition, quoting the scheduler when a pod cannot be placed."""
    refused = [p for p in o.pending if p.reason]
    if refused:
        first = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        return {"status": "False", "reason": first.reason, "message": f"pod {first.name}{more}: {first.message}"}
    if o.pending:
        return {
            "status": "Unknown",
            "reason": "Scheduling",
            "message": f"{len(o.pending)} pod(s) waiting for the scheduler",
        }
    if o.pods_total == 0:
        return {"status": "True", "reason": "NoPods", "message": "no pods to schedule"}
    return {"status": "True", "reason": "AllScheduled", "message": f"{o.pods_total} pod(s) bound to nodes"}


def _reconciled(o: Observed) -> dict[str, str]:
    if o.problem is not None:
        return {"status": "False", "reason": o.problem.reason, "message": o.problem.message}
    reason, message = {
        "template": ("DeploymentApplied", f"Deployment {o.workload.deployment_name} matches the model"),
        "deploymentRef": ("DeploymentAdopted", f"Deployment {o.workload.deployment_name} follows the model"),
        "external": ("External", "no Deployment: the model is served by spec.backendUrl"),
        "none": ("NoWorkload", "nothing to reconcile: no template, deploymentRef or backendUrl"),
    }[o.workload.mode]
    return {"status": "True", "reason": reason, "message": message}


def desired_status(name: str, o: Observed) -> dict[str, Any]:
    """The controller-owned status fields, conditions without times (see :func:`with_times`)."""
    ready, ready_cond = _ready(o)
    conditions = {"Ready": ready_cond, "Scheduled": _scheduled(o), "Reconciled": _reconciled(o)}
    status: dict[str, Any] = {
        "ready": ready,
        "replicas": o.replicas,
        "readyReplicas": o.ready_replicas,
        "selector": selector_string(name),
        "observedGeneration": o.generation,
        "conditions": [{"type": t, **conditions[t], "observedGeneration": o.generation} for t in CONDITION_TYPES],
    }
    if o.advice is not None:
        status["declaredMemory"] = o.advice.declared_memory
        optional = {
            "observedPeakMemory": o.advice.observed_peak_memory,
            "utilizationPercent": o.advice.utilization_percent,
            "recommendation": o.advice.recommendation,
            "lastObservation": o.advice.last_observation,
        }
        status.update({k: v for k, v in optional.items() if v is not None})
    if o.load is not None:
        status.update(replicasWanted=o.load.wanted, replicasAllowed=o.load.allowed, loadMessage=o.load.message)
    elif o.clear_load:  # None in a merge patch deletes the field; status_patch sends it only if it is there
        status.update(replicasWanted=None, replicasAllowed=None, loadMessage=None)
    return status


def with_times(desired: Mapping[str, Any], current: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Give each condition a lastTransitionTime: the current one if its status did not change, else now."""
    old = {c.get("type"): c for c in (current.get("conditions") or []) if isinstance(c, Mapping) and c.get("type")}
    out = dict(desired)
    conditions = []
    for cond in desired.get("conditions") or []:
        prev = old.get(cond["type"])
        if prev is not None and prev.get("status") == cond["status"] and prev.get("lastTransitionTime"):
            when = prev["lastTransitionTime"]
        else:
            when = rfc3339(now)
        conditions.append({**cond, "lastTransitionTime": when})
    out["conditions"] = conditions
    # Conditions of types this controller does not manage (someone else's) are kept as they are.
    conditions.extend(dict(c) for t, c in old.items() if t not in CONDITION_TYPES)
    return out


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch for `/status` (only the fields that differ), or None when nothing changed."""
    current = current or {}
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    return patch or None
