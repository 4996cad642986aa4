"""What a review asks for, and the budget's answer to it: the webhook's logic, free of I/O.

Two steps. :func:`classify` turns a request into either an immediate :class:`Verdict` (not a model
workload, a decrease, a malformed object) or a :class:`Demand`: the model as it will be, and its desired
replicas before and after. The parent of a `/scale` request (a Scale has no memory, no labels) comes from
an :class:`ObjectLookup`. :func:`decide` answers a demand on a view plus the admission ledger's live
entries with :func:`budget.decide_scale` (the one decision the proxy and `ibc plan` use too) and names
the ledger entry to commit when the answer is a scale-up that fits. Neither step touches the network,
so the unit tests drive both with captured requests and a cache filled by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from budget import BudgetError, ClusterView, Decision, Model, decide_scale, format_bytes, parse_quantity
from budget.objects import GROUP, model_from_deployment, model_from_inferencemodel, model_label
from webhook.ledger import LedgerEntry, Outcome, view_with_entries
from webhook.review import AdmissionRequest, InvalidObject, MalformedReview, Verdict, allowed, denied

log = logging.getLogger(__name__)

CHECKED_OPERATIONS = frozenset({"CREATE", "UPDATE"})
BUSY_CODE = 429  # "retry": the apiserver passes it through, clients back off


class LookupFailed(Exception):
    """The parent object could not be read (API error, timeout); the message names the object."""


class ObjectLookup(Protocol):
    """Reads the parent object of a `/scale` request (and an owning InferenceModel) by name.

    Returns None when the object does not exist; raises LookupFailed when it cannot tell.
    """

    def inference_model(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    def deployment(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class Demand:
    """A change that may need new memory: `model` as it will be, desired replicas from -> to."""

    model: Model
    replicas_from: int
    replicas_to: int
    what: str  # "scale inferencemodels default/x from 0 to 1", for logs
    replace_placements: bool = False  # memory grew or nodeSelector changed: every replica placed afresh
    owner_replicas: int | None = None  # set for a Deployment its InferenceModel controls: the model's spec
    warnings: tuple[str, ...] = ()


def denial_message(decision: Decision) -> str:
    """The deny text: the Decision's own message (requested, available, blocking with idle), as the 429."""
    message = f"{decision.reason}: {decision.message}"
    if decision.retry_after_seconds:
        message += f"; retry after {decision.retry_after_seconds}s"
    return message


def overprovision_warning(
    model_name: str, declared_bytes: int, status: Mapping[str, Any] | None, over_ratio: float
) -> str | None:
    """A kubectl Warning when declared memory is more than `over_ratio` above the observed peak."""
    if not isinstance(status, Mapping) or status.get("observedPeakMemory") in (None, ""):
        return None
    try:
        peak = parse_quantity(status["observedPeakMemory"], field="status.observedPeakMemory")
    except BudgetError:
        return None  # advice only: a bad status never blocks or warns
    if peak <= 0 or declared_bytes <= peak * (1 + over_ratio):
        return None
    percent = round((declared_bytes / peak - 1) * 100)
    return (
        f"{model_name[:40]} declares {format_bytes(declared_bytes)} but peaked at {format_bytes(peak)} "
        f"({percent}% over); consider lowering spec.memory"
    )


# ----- classification -----
def _replicas(obj: Mapping[str, Any] | None, where: str) -> int:
    """spec.replicas of an object or Scale; missing is 0 (a CRD's /scale omits a zero)."""
    if obj is None:
        return 0
    spec = obj.get("spec")
    if spec is None:
        return 0
    if not isinstance(spec, Mapping):
        raise InvalidObject(f"{where}.spec must be an object, got {type(spec).__name__}")
    value = spec.get("replicas", 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidObject(f"{where}.spec.replicas must be a non-negative integer, got {value!r}")
    return value


def _status(obj: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    status = obj.get("status") if obj is not None else None
    return status if isinstance(status, Mapping) else None


def _grew(old: Model | None, new: Model) -> bool:
    """True when running replicas would need more (or other) memory: memory up, another pool, or other
    devices (another split, or a deviceSelector the devices they hold may not match)."""
    if old is None:
        return False
    return (
        new.memory_bytes > old.memory_bytes
        or dict(new.node_selector) != dict(old.node_selector)
        or new.devices != old.devices
        or dict(new.device_selector) != dict(old.device_selector)
    )


def _name_of(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else None


def _owner_model(obj: Mapping[str, Any], label: str) -> str | None:
    """The InferenceModel controlling this Deployment, when it is the model of the same key."""
    meta = obj.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, Mapping) else None
    if not isinstance(refs, list):
        return None
    for ref in refs:
        if (
            isinstance(ref, Mapping)
            and ref.get("controller") is True
            and ref.get("kind") == "InferenceModel"
            and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
            and ref.get("name") == label
        ):
            return label
    return None


class Classifier:
    """Turns a request into a Verdict or a Demand; holds the lookup and the warning threshold."""

    def __init__(self, lookup: ObjectLookup, *, warn_over_ratio: float = 0.2) -> None:
        self.lookup = lookup
        self.warn_over_ratio = warn_over_ratio

    def classify(self, req: AdmissionRequest) -> Verdict | Demand:
        """What the request asks; raises InvalidObject / MalformedReview for bad input."""
        if req.operation not in CHECKED_OPERATIONS:
            return allowed("not_checked", f"{req.operation} never needs memory")
        if req.group == GROUP and req.resource == "inferencemodels":
            if req.sub_resource == "scale":
                return self._model_scale(req)
            if req.sub_resource == "":
                return self._model_object(req)
        elif req.group == "apps" and req.resource == "deployments":
            if req.sub_resource == "scale":
                return self._deployment_scale(req)
            if req.sub_resource == "":
                return self._deployment_object(req)
        return allowed("not_checked", f"{req.target} is not budgeted by this webhook")

    @staticmethod
    def _need_object(req: AdmissionRequest) -> Mapping[str, Any]:
        if req.obj is None:
            raise MalformedReview(f"request.object is required for {req.operation} of {req.target}", uid=req.uid)
        return req.obj

    @staticmethod
    def _fast_path(what: str, replicas_from: int, replicas_to: int) -> Verdict | None:
        if replicas_to < replicas_from:
            return allowed("decrease", f"{what}: decreases are always allowed")
        if replicas_to == replicas_from or replicas_to == 0:
            return allowed("no_change", f"{what}: no new replicas")
        return None

    def _warning(self, model: Model, status: Mapping[str, Any] | None) -> tuple[str, ...]:
        w = overprovision_warning(model.model_name or model.name, model.memory_bytes, status, self.warn_over_ratio)
        return (w,) if w else ()

    def _model_object(self, req: AdmissionRequest) -> Verdict | Demand:
        obj = self._need_object(req)
        try:
            model = model_from_inferencemodel(obj)
        except BudgetError as exc:
            raise InvalidObject(f"invalid InferenceModel: {exc}", uid=req.uid) from exc
        old: Model | None = None
        if req.operation == "UPDATE" and req.old_obj is not None:
            try:
                old = model_from_inferencemodel(req.old_obj)
            except BudgetError:
                old = None  # a stored object we cannot read: judge the new one from zero
        replicas_from = old.replicas if old is not None else 0
        what = f"{req.operation.lower()} inferencemodel {model.key} with {model.replicas} replica(s)"
        grew = _grew(old, model)
        warnings = self._warning(model, _status(obj))
        if not grew:
            fast = self._fast_path(what, replicas_from, model.replicas)
            if fast is not None:
                return replace(fast, warnings=warnings)
        elif model.replicas == 0:
            return allowed("no_change", f"{what}: no replicas to place", warnings)
        return Demand(model, replicas_from, model.replicas, what, replace_placements=grew, warnings=warnings)

    def _model_scale(self, req: AdmissionRequest) -> Verdict | Demand:
        obj = self._need_object(req)
        replicas_to = _replicas(obj, "object")
        replicas_from = _replicas(req.old_obj, "oldObject")
        what = f"scale inferencemodel {req.namespace}/{req.name} from {replicas_from} to {replicas_to}"
        fast = self._fast_path(what, replicas_from, replicas_to)
        if fast is not None:
            return fast
        parent = self.lookup.inference_model(req.namespace, req.name)
        if parent is None:
            return denied(
                BUSY_CODE,
                "unknown_model",
                f"InferenceModel {req.namespace}/{req.name} is not known to the budget webhook yet; retry",
            )
        try:
            model = model_from_inferencemodel(parent)
        except BudgetError as exc:
            raise InvalidObject(f"invalid InferenceModel: {exc}", uid=req.uid) from exc
        return Demand(model, replicas_from, replicas_to, what, warnings=self._warning(model, _status(parent)))

    def _deployment_model(self, req: AdmissionRequest, obj: Mapping[str, Any]) -> Model | None:
        try:
            return model_from_deployment(obj)
        except BudgetError as exc:
            raise InvalidObject(f"invalid model Deployment: {exc}", uid=req.uid) from exc

    def _owner_replicas(self, obj: Mapping[str, Any], model: Model) -> int | None:
        """The model's spec.replicas when its controller runs this Deployment: a controller owner reference
        to the InferenceModel of the same key, or that model's `spec.deploymentRef` naming it (adoption)."""
        parent = self.lookup.inference_model(model.namespace, model.name)
        if parent is None:
            return None
        spec = parent.get("spec")
        ref = spec.get("deploymentRef") if isinstance(spec, Mapping) else None
        adopted = isinstance(ref, Mapping) and ref.get("name") == _name_of(obj)
        if _owner_model(obj, model.name) is None and not adopted:
            return None
        try:
            return model_from_inferencemodel(parent).replicas
        except BudgetError:
            return None

    def _model_status(self, model: Model) -> Mapping[str, Any] | None:
        return _status(self.lookup.inference_model(model.namespace, model.name))

    def _deployment_object(self, req: AdmissionRequest) -> Verdict | Demand:
        obj = self._need_object(req)
        model = self._deployment_model(req, obj)
        if model is None:
            return allowed("not_a_model", f"deployment {req.namespace}/{req.name} has no model label")
        old = None
        if req.operation == "UPDATE" and req.old_obj is not None:
            try:
                old = model_from_deployment(req.old_obj)
            except BudgetError:
                old = None
        replicas_from = old.replicas if old is not None and old.key == model.key else 0
        what = (
            f"{req.operation.lower()} deployment {req.namespace}/{req.name} of model {model.key} "
            f"with {model.replicas} replica(s)"
        )
        grew = old is not None and old.key == model.key and _grew(old, model)
        if not grew:
            fast = self._fast_path(what, replicas_from, model.replicas)
            if fast is not None:
                return fast
        elif model.replicas == 0:
            return allowed("no_change", f"{what}: no replicas to place")
        return Demand(
            model,
            replicas_from,
            model.replicas,
            what,
            replace_placements=grew,
            owner_replicas=self._owner_replicas(obj, model),
            warnings=self._warning(model, self._model_status(model)),
        )

    def _deployment_scale(self, req: AdmissionRequest) -> Verdict | Demand:
        obj = self._need_object(req)
        replicas_to = _replicas(obj, "object")
        replicas_from = _replicas(req.old_obj, "oldObject")
        what = f"scale deployment {req.namespace}/{req.name} from {replicas_from} to {replicas_to}"
        fast = self._fast_path(what, replicas_from, replicas_to)
        if fast is not None:
            return fast
        parent = self.lookup.deployment(req.namespace, req.name)
        if parent is None:
            # Not among the model Deployments and not found by name: not ours to budget.
            return allowed("not_a_model", f"deployment {req.namespace}/{req.name} is not a model workload")
        try:
            label = model_label(parent)
        except BudgetError as exc:
            raise InvalidObject(f"invalid Deployment: {exc}", uid=req.uid) from exc
        if not label:
            return allowed("not_a_model", f"deployment {req.namespace}/{req.name} has no model label")
        model = self._deployment_model(req, parent)
        assert model is not None  # labelled
        return Demand(
            model,
            replicas_from,
            replicas_to,
            what + f" (model {model.key})",
            owner_replicas=self._owner_replicas(parent, model),
            warnings=self._warning(model, self._model_status(model)),
        )


# ----- the decision on a view plus the ledger -----
def decide(
    demand: Demand,
    view: ClusterView,
    entries: tuple[LedgerEntry, ...],
    now: float,
    *,
    deny_code: int = 403,
    ttl_seconds: float = 60.0,
) -> Outcome:
    """Answer a demand on the view with the ledger's admitted demand counted; name the entry to commit."""
    key = demand.model.key
    if demand.owner_replicas is not None:
        limit = max([demand.owner_replicas] + [e.replicas for e in entries if e.model == key])
        if demand.replicas_to <= limit:
            return Outcome(
                allowed(
                    "admitted_on_model",
                    f"{demand.what}: within the {limit} replica(s) admitted on the InferenceModel",
                    demand.warnings,
                )
            )
    view = view_with_entries(view, entries, now)
    replicas_from = demand.replicas_from
    if demand.replace_placements:
        view = replace(view, placements=tuple(p for p in view.placements if p.model != key))
        replicas_from = 0
    view = view.with_model(replace(demand.model, replicas=replicas_from))
    decision = decide_scale(view, key, demand.replicas_to, now)
    if not decision.allowed:
        return Outcome(denied(deny_code, decision.reason, denial_message(decision), demand.warnings), None, decision)
    commit = None
    if decision.reason == "fits":
        commit = LedgerEntry(
            model=key,
            replicas=demand.replicas_to,
            memory_bytes=demand.model.memory_bytes,
            expires_at=now + ttl_seconds,
            admitted_at=now,
            node_selector=dict(demand.model.node_selector),
            model_name=demand.model.model_name,
        )
    return Outcome(allowed(decision.reason, decision.message, demand.warnings), commit, decision)
