"""The webhook's two steps without HTTP: what a review asks for (`Classifier.classify`) and the answer on a
view plus the ledger (`decide`), each checked as the whole value the apiserver and kubectl end up showing.

Parents of `/scale` requests come from a real `ClusterCache` (filled by hand) through the app's
`CacheLookup`; the view `decide` answers on is that cache's. Every row compares the whole Verdict (allowed,
code, message, warnings, the reason the metrics count), the whole Demand (model, replicas from -> to, the
words the logs use, whether running replicas are placed afresh, the InferenceModel's admitted replicas)
or the whole ledger entry a fit commits.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from budget import decide_scale
from budget.objects import model_from_deployment, model_from_inferencemodel
from kubeview import ClusterCache
from webhook.admit import Classifier, Demand, decide, denial_message, overprovision_warning
from webhook.app import CacheLookup
from webhook.ledger import LedgerEntry
from webhook.review import AdmissionRequest, InvalidObject, MalformedReview, Verdict, allowed, denied

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_800_000_000.0
GROUP = "inference.eh-ops.io"
MODEL_LABEL = "inference.eh-ops.io/model"
MEMORY = "inference.eh-ops.io/memory"
UID = "705ab4f5-6393-11e8-b7cc-42010a800002"


# ----- objects -----
def im(name: str = "llama", memory: str = "16Gi", replicas: int = 0, *, peak: str | None = None,
       status: Any = None, **spec: Any) -> dict[str, Any]:
    """An InferenceModel; `peak` fills status.observedPeakMemory, `status` replaces the whole status."""
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/v1alpha1", "kind": "InferenceModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"memory": memory, "replicas": replicas, **spec},
    }
    if peak is not None:
        obj["status"] = {"observedPeakMemory": peak}
    if status is not None:
        obj["status"] = status
    return obj


def owner(**changes: Any) -> dict[str, Any]:
    """A controller owner reference to the InferenceModel `m`, as the controller writes it; `changes` alter it."""
    ref = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "InferenceModel", "name": "m", "uid": "7b2b20a4",
           "controller": True, "blockOwnerDeletion": True}
    ref.update(changes)
    return ref


def dep(name: str = "m", replicas: int | None = 4, *, model: str | None = "m", memory: str | None = "16Gi",
        refs: Any = None, selector: dict[str, str] | None = None) -> dict[str, Any]:
    """A Deployment; labelled with `model` (and its pod template's memory) unless model is None."""
    meta: dict[str, Any] = {"name": name, "namespace": "default", "labels": {"app": name}}
    if model is not None:
        meta["labels"][MODEL_LABEL] = model
    if refs is not None:
        meta["ownerReferences"] = refs
    template: dict[str, Any] = {"metadata": {"annotations": {} if memory is None else {MEMORY: memory}},
                                "spec": {"containers": [{"name": "engine", "image": "vllm"}]}}
    if selector is not None:
        template["spec"]["nodeSelector"] = selector
    spec: dict[str, Any] = {"template": template}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def scale(replicas: Any = None, *, spec: Any = "default") -> dict[str, Any]:
    """A Scale (autoscaling/v1) as the apiserver sends it; a CRD's /scale omits a zero replicas."""
    obj: dict[str, Any] = {"apiVersion": "autoscaling/v1", "kind": "Scale",
                           "metadata": {"name": "llama", "namespace": "default"}}
    if spec != "default":
        obj["spec"] = spec
    else:
        obj["spec"] = {} if replicas is None else {"replicas": replicas}
    return obj


def node(name: str = "gpu-1", capacity: str = "64Gi", **labels: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": labels,
                                         "annotations": {"inference.eh-ops.io/memory-capacity": capacity}}}


def pod(model: str, memory: str, index: int = 0, node_name: str = "gpu-1") -> dict[str, Any]:
    return {"kind": "Pod",
            "metadata": {"name": f"{model}-{index}", "namespace": "default", "uid": f"{model}-{index}",
                         "labels": {MODEL_LABEL: model}, "annotations": {MEMORY: memory}},
            "spec": {"nodeName": node_name}, "status": {"phase": "Running"}}


def cache_of(*objects: dict[str, Any]) -> ClusterCache:
    cache = ClusterCache(None)
    for obj in objects:
        cache.apply(obj["kind"], "ADDED", copy.deepcopy(obj))
    return cache


# ----- requests -----
RESOURCES = {
    "im": (GROUP, "inferencemodels", ""), "im-scale": (GROUP, "inferencemodels", "scale"),
    "dep": ("apps", "deployments", ""), "dep-scale": ("apps", "deployments", "scale"),
}


def request(what: str | tuple[str, str, str], obj: Any, old: Any = None, *, op: str = "UPDATE",
            name: str = "llama") -> AdmissionRequest:
    group, resource, sub = RESOURCES[what] if isinstance(what, str) else what
    kind = "Scale" if sub == "scale" else {"inferencemodels": "InferenceModel"}.get(resource, "Deployment")
    return AdmissionRequest(uid=UID, operation=op, group=group, resource=resource, sub_resource=sub, kind=kind,
                            namespace="default", name=name, obj=obj, old_obj=old, dry_run=False)


def classify(req: AdmissionRequest, *stored: dict[str, Any], ratio: float | None = None) -> Verdict | Demand:
    lookup = CacheLookup(cache_of(*stored))
    classifier = Classifier(lookup) if ratio is None else Classifier(lookup, warn_over_ratio=ratio)
    return classifier.classify(req)


def no_change(message: str, warnings: tuple[str, ...] = ()) -> Verdict:
    return allowed("no_change", message, warnings)


# ----- which requests are budgeted at all -----
@pytest.mark.parametrize(
    ("req", "verdict"),
    [
        pytest.param(request("im", im(), op="DELETE"), allowed("not_checked", "DELETE never needs memory"),
                     id="delete"),
        pytest.param(request("dep", dep(), op="CONNECT"), allowed("not_checked", "CONNECT never needs memory"),
                     id="connect"),
        pytest.param(request((GROUP, "inferencemodels", "status"), im(replicas=3)),
                     allowed("not_checked", "inferencemodels/status default/llama is not budgeted by this webhook"),
                     id="model-status"),
        pytest.param(request(("apps", "deployments", "status"), dep()),
                     allowed("not_checked", "deployments/status default/llama is not budgeted by this webhook"),
                     id="deployment-status"),
        pytest.param(request(("apps", "statefulsets", ""), dep(), op="CREATE"),
                     allowed("not_checked", "statefulsets default/llama is not budgeted by this webhook"),
                     id="statefulset"),
        pytest.param(request(("", "pods", ""), pod("llama", "16Gi"), op="CREATE"),
                     allowed("not_checked", "pods default/llama is not budgeted by this webhook"), id="pod"),
        pytest.param(request(("example.com", "inferencemodels", ""), im(replicas=3), op="CREATE"),
                     allowed("not_checked", "inferencemodels default/llama is not budgeted by this webhook"),
                     id="another-groups-inferencemodels"),
        pytest.param(request((GROUP, "deployments", ""), dep(), op="CREATE"),
                     allowed("not_checked", "deployments default/llama is not budgeted by this webhook"),
                     id="deployments-of-our-group"),
        pytest.param(request(("apps", "inferencemodels", ""), im(replicas=3), op="CREATE"),
                     allowed("not_checked", "inferencemodels default/llama is not budgeted by this webhook"),
                     id="inferencemodels-of-apps"),
        pytest.param(request(("", "deployments", "scale"), scale(5), scale(1)),
                     allowed("not_checked", "deployments/scale default/llama is not budgeted by this webhook"),
                     id="deployments-of-the-core-group"),
    ],
)
def test_requests_the_webhook_does_not_budget(req, verdict):
    assert classify(req, im(replicas=0), dep("llama")) == verdict


# ----- /scale of an InferenceModel -----
def im_scale_demand(frm: int, to: int, parent: dict[str, Any], warnings: tuple[str, ...] = ()) -> Demand:
    return Demand(model_from_inferencemodel(parent), frm, to,
                  f"scale inferencemodel default/llama from {frm} to {to}", warnings=warnings)


@pytest.mark.parametrize(
    ("new", "old", "answer"),
    [
        pytest.param(scale(1), scale(3), allowed("decrease", "scale inferencemodel default/llama from 3 to 1: "
                                                 "decreases are always allowed"), id="down"),
        pytest.param(scale(0), scale(2), allowed("decrease", "scale inferencemodel default/llama from 2 to 0: "
                                                 "decreases are always allowed"), id="to-zero"),
        pytest.param(scale(2), scale(2), no_change("scale inferencemodel default/llama from 2 to 2: no new replicas"),
                     id="same"),
        pytest.param(scale(None), scale(None), no_change("scale inferencemodel default/llama from 0 to 0: no new "
                                                         "replicas"), id="zero-omitted-both"),
        pytest.param(scale(None), None, no_change("scale inferencemodel default/llama from 0 to 0: no new replicas"),
                     id="zero-without-old-object"),
        pytest.param(scale(spec=None), scale(spec=None), no_change("scale inferencemodel default/llama from 0 to 0: "
                                                                   "no new replicas"), id="spec-null"),
        pytest.param(scale(spec={"replicas": None}), scale(spec={}),
                     no_change("scale inferencemodel default/llama from 0 to 0: no new replicas"), id="replicas-null"),
        pytest.param({"kind": "Scale"}, {"kind": "Scale"},
                     no_change("scale inferencemodel default/llama from 0 to 0: no new replicas"), id="no-spec"),
        pytest.param(scale(1), scale(None), im_scale_demand(0, 1, im()), id="up-from-omitted-zero"),
        pytest.param(scale(3), None, im_scale_demand(0, 3, im()), id="up-without-old-object"),
        pytest.param(scale(3), scale(spec={"replicas": None}), im_scale_demand(0, 3, im()), id="up-from-null"),
        pytest.param(scale(3), scale(2), im_scale_demand(2, 3, im()), id="up-by-one"),
    ],
)
def test_model_scale(new, old, answer):
    assert classify(request("im-scale", new, old), im()) == answer


def test_model_scale_warns_from_the_stored_models_status():
    parent = im(peak="10Gi", modelName="meta-llama/Llama-2-7b")
    assert classify(request("im-scale", scale(2), scale(1)), parent) == im_scale_demand(
        1, 2, parent, ("meta-llama/Llama-2-7b declares 16Gi but peaked at 10Gi (60% over); consider lowering "
                       "spec.memory",))


@pytest.mark.parametrize(
    ("stored", "answer"),
    [
        pytest.param((), denied(429, "unknown_model", "InferenceModel default/llama is not known to the budget "
                                "webhook yet; retry"), id="not-in-the-cache-yet"),
        pytest.param((im(name="other", replicas=0),), denied(
            429, "unknown_model", "InferenceModel default/llama is not known to the budget webhook yet; retry"),
            id="another-model-only"),
    ],
)
def test_model_scale_of_a_model_the_cache_has_not_seen_says_retry(stored, answer):
    assert classify(request("im-scale", scale(1), scale(0)), *stored) == answer


@pytest.mark.parametrize(
    ("new", "old", "message"),
    [
        pytest.param(scale("3"), scale(1), "object.spec.replicas must be a non-negative integer, got '3'", id="string"),
        pytest.param(scale(True), scale(1), "object.spec.replicas must be a non-negative integer, got True",
                     id="bool"),
        pytest.param(scale(1.0), scale(0), "object.spec.replicas must be a non-negative integer, got 1.0",
                     id="float"),
        pytest.param(scale(-1), scale(1), "object.spec.replicas must be a non-negative integer, got -1",
                     id="negative"),
        pytest.param(scale(spec=[1]), scale(1), "object.spec must be an object, got list", id="spec-a-list"),
        pytest.param(scale(spec="x"), scale(1), "object.spec must be an object, got str", id="spec-a-string"),
        pytest.param(scale(2), scale(-2), "oldObject.spec.replicas must be a non-negative integer, got -2",
                     id="old-negative"),
        pytest.param(scale(2), scale(False), "oldObject.spec.replicas must be a non-negative integer, got False",
                     id="old-bool"),
        pytest.param(scale(2), scale(spec=3), "oldObject.spec must be an object, got int", id="old-spec-an-int"),
    ],
)
@pytest.mark.parametrize("what", ["im-scale", "dep-scale"])
def test_a_bad_scale_is_refused_naming_the_field(what, new, old, message):
    with pytest.raises(InvalidObject) as caught:
        classify(request(what, new, old), im(), dep("llama", model="llama"))
    assert (caught.value.message, caught.value.code) == (message, 400)


def test_a_bad_stored_model_is_refused_naming_it():
    with pytest.raises(InvalidObject) as caught:
        classify(request("im-scale", scale(1), scale(0)), im(memory="lots"))
    assert caught.value.uid == UID
    assert caught.value.message.startswith("invalid InferenceModel: ")
    assert "spec.memory" in caught.value.message and "'lots'" in caught.value.message


@pytest.mark.parametrize("what", ["im", "im-scale", "dep", "dep-scale"])
def test_a_request_without_object_is_malformed(what):
    with pytest.raises(MalformedReview) as caught:
        classify(request(what, None, scale(1), op="CREATE"), im(), dep("llama"))
    resource = RESOURCES[what][1] + ("/scale" if what.endswith("scale") else "")
    assert (caught.value.message, caught.value.uid) == (
        f"request.object is required for CREATE of {resource} default/llama", UID)


# ----- an InferenceModel or a model Deployment created or updated -----
def im_demand(op: str, frm: int, model: dict[str, Any], *, grew: bool = False,
              warnings: tuple[str, ...] = ()) -> Demand:
    m = model_from_inferencemodel(model)
    return Demand(m, frm, m.replicas, f"{op} inferencemodel default/llama with {m.replicas} replica(s)",
                  replace_placements=grew, warnings=warnings)


def dep_demand(op: str, frm: int, obj: dict[str, Any], *, grew: bool = False, owned: int | None = None,
               warnings: tuple[str, ...] = ()) -> Demand:
    m = model_from_deployment(obj)
    assert m is not None
    return Demand(m, frm, m.replicas,
                  f"{op} deployment default/llama of model default/{m.name} with {m.replicas} replica(s)",
                  replace_placements=grew, owner_replicas=owned, warnings=warnings)


def workload(what: str, replicas: int, memory: str = "16Gi", pool: str | None = None) -> dict[str, Any]:
    """The object of an `im` or `dep` request: an InferenceModel, or a Deployment labelled as model `m`."""
    selector = None if pool is None else {"pool": pool}
    if what == "im":
        return im(memory=memory, replicas=replicas, **({} if selector is None else {"nodeSelector": selector}))
    return dep(replicas=replicas, memory=memory, selector=selector)


# Both kinds alike: (replicas, memory, pool) as updated and as stored -> a Demand counted from `frm` replicas
# (`grew`: every replica placed afresh), or an allowing verdict's reason and the end of its message.
CHANGES = [
    pytest.param("CREATE", (2,), None, ("demand", 0, False), id="create"),
    pytest.param("CREATE", (0,), None, ("no_change", "no new replicas"), id="create-zero"),
    pytest.param("CREATE", (2,), (2,), ("demand", 0, False), id="create-ignores-an-old-object"),
    pytest.param("UPDATE", (3,), (1,), ("demand", 1, False), id="update-up"),
    pytest.param("UPDATE", (3,), None, ("demand", 0, False), id="update-without-old-object"),
    pytest.param("UPDATE", (3,), (3, "lots"), ("demand", 0, False), id="unreadable-old-object-judged-from-zero"),
    pytest.param("UPDATE", (1,), (3,), ("decrease", "decreases are always allowed"), id="update-down"),
    pytest.param("UPDATE", (2,), (2,), ("no_change", "no new replicas"), id="update-same"),
    pytest.param("UPDATE", (2, "8Gi"), (2,), ("no_change", "no new replicas"), id="memory-down"),
    pytest.param("UPDATE", (0, "8Gi"), (2,), ("decrease", "decreases are always allowed"), id="memory-down-to-zero"),
    pytest.param("UPDATE", (2, "17Gi"), (2,), ("demand", 2, True), id="memory-up"),
    pytest.param("UPDATE", (1, "17Gi"), (3,), ("demand", 3, True), id="memory-up-while-scaling-down-places-afresh"),
    pytest.param("UPDATE", (0, "17Gi"), (2,), ("no_change", "no replicas to place"), id="memory-up-with-no-replicas"),
    pytest.param("UPDATE", (2, "16Gi", "b"), (2, "16Gi", "a"), ("demand", 2, True), id="other-pool"),
    pytest.param("UPDATE", (2, "16Gi", "a"), (2,), ("demand", 2, True), id="pool-chosen"),
    pytest.param("UPDATE", (2, "16Gi", "a"), (2, "16Gi", "a"), ("no_change", "no new replicas"), id="same-pool"),
]


@pytest.mark.parametrize(("op", "new", "old", "answer"), CHANGES)
@pytest.mark.parametrize("what", ["im", "dep"])
def test_an_object_created_or_updated(what, op, new, old, answer):
    obj = workload(what, *new)
    if answer[0] == "demand":
        expected: Verdict | Demand = (im_demand if what == "im" else dep_demand)(op.lower(), answer[1], obj,
                                                                               grew=answer[2])
    else:
        target = "inferencemodel default/llama" if what == "im" else "deployment default/llama of model default/m"
        expected = allowed(answer[0], f"{op.lower()} {target} with {new[0]} replica(s): {answer[1]}")
    stored = None if old is None else workload(what, *old)
    assert classify(request(what, obj, stored, op=op)) == expected


@pytest.mark.parametrize(
    ("new", "old", "answer"),
    [
        pytest.param(im(replicas=2, devices=2), im(replicas=2),
                     im_demand("update", 2, im(replicas=2, devices=2), grew=True), id="split-over-two-devices"),
        pytest.param(im(replicas=2, deviceSelector={"kind": "mig"}), im(replicas=2),
                     im_demand("update", 2, im(replicas=2, deviceSelector={"kind": "mig"}), grew=True),
                     id="device-selector"),
        pytest.param(im(replicas=2, devices=2, deviceSelector={"kind": "gpu"}),
                     im(replicas=2, devices=2, deviceSelector={"kind": "gpu"}),
                     no_change("update inferencemodel default/llama with 2 replica(s): no new replicas"),
                     id="same-devices"),
    ],
)
def test_a_model_moved_to_other_devices_is_placed_afresh(new, old, answer):
    assert classify(request("im", new, old)) == answer


@pytest.mark.parametrize(
    ("new", "old", "answer"),
    [
        pytest.param(im(replicas=2, peak="10Gi"), im(replicas=2),
                     no_change("update inferencemodel default/llama with 2 replica(s): no new replicas",
                               ("llama declares 16Gi but peaked at 10Gi (60% over); consider lowering spec.memory",)),
                     id="on-an-unchanged-model"),
        pytest.param(im("llama", "32Gi", 0, peak="10Gi"), im(replicas=2),
                     no_change("update inferencemodel default/llama with 0 replica(s): no replicas to place",
                               ("llama declares 32Gi but peaked at 10Gi (220% over); consider lowering spec.memory",)),
                     id="on-a-grown-model-with-no-replicas"),
        pytest.param(im(replicas=3, peak="10Gi"), im(replicas=2),
                     im_demand("update", 2, im(replicas=3), warnings=(
                         "llama declares 16Gi but peaked at 10Gi (60% over); consider lowering spec.memory",)),
                     id="on-a-scale-up"),
    ],
)
def test_model_object_warns_when_declared_far_above_the_peak(new, old, answer):
    assert classify(request("im", new, old)) == answer


@pytest.mark.parametrize(
    ("op", "new", "old", "answer"),
    [
        pytest.param("CREATE", dep(model=None), None,
                     allowed("not_a_model", "deployment default/llama has no model label"), id="unlabelled"),
        pytest.param("CREATE", dep(replicas=None), None, dep_demand("create", 0, dep(replicas=None)),
                     id="create-replicas-omitted-is-one"),
        pytest.param("UPDATE", dep(replicas=6), dep(replicas=3, model=None), dep_demand("update", 0, dep(replicas=6)),
                     id="label-added"),
        pytest.param("UPDATE", dep(replicas=6, memory="32Gi"), dep(replicas=6, model="other", memory="8Gi"),
                     dep_demand("update", 0, dep(replicas=6, memory="32Gi")), id="label-changed-counts-from-zero"),
    ],
)
def test_a_deployment_is_counted_by_its_model_label(op, new, old, answer):
    assert classify(request("dep", new, old, op=op)) == answer


@pytest.mark.parametrize(
    ("status", "warnings"),
    [
        pytest.param({"observedPeakMemory": "20Gi"},
                     ("m declares 40Gi but peaked at 20Gi (100% over); consider lowering spec.memory",), id="peak"),
        pytest.param({}, (), id="no-peak"),
        # The cache keeps an object it cannot translate; its status is still no reason to warn (or fail).
        pytest.param(["observedPeakMemory", "20Gi"], (), id="status-not-an-object"),
    ],
)
def test_a_deployment_warns_from_its_models_status(status, warnings):
    stored = im("m", "40Gi", status=status)
    answer = classify(request("dep", dep(replicas=4, memory="40Gi"), None, op="CREATE"), stored)
    assert answer == dep_demand("create", 0, dep(replicas=4, memory="40Gi"), warnings=warnings)


@pytest.mark.parametrize(
    ("what", "obj", "prefix", "fragment"),
    [
        pytest.param("im", im(memory="lots", replicas=1), "invalid InferenceModel: ", "spec.memory", id="model"),
        pytest.param("dep", dep(memory="a lot"), "invalid model Deployment: ", "inference.eh-ops.io/memory",
                     id="deployment"),
    ],
)
def test_a_bad_object_is_refused_naming_the_field(what, obj, prefix, fragment):
    with pytest.raises(InvalidObject) as caught:
        classify(request(what, obj, None, op="CREATE"))
    assert caught.value.uid == UID
    assert caught.value.message.startswith(prefix) and fragment in caught.value.message, caught.value.message


# Whether a Deployment's replicas were already admitted on its InferenceModel: the model's spec.replicas when
# the model's controller runs it (a controller owner reference, or spec.deploymentRef naming it), else None.
OWNERS = [
    pytest.param(None, (), None, id="no-model"),
    pytest.param([owner()], (im("m", replicas=2),), 2, id="controller-owner"),
    pytest.param([owner()], (im("m", replicas=0),), 0, id="controller-owner-of-zero"),
    pytest.param([owner()], (), None, id="owner-not-in-cache"),
    pytest.param([owner()], (im("other", replicas=2),), None, id="another-model-in-cache"),
    pytest.param([owner(controller=False)], (im("m", replicas=2),), None, id="not-the-controller"),
    pytest.param([owner(controller="true")], (im("m", replicas=2),), None, id="controller-a-string"),
    pytest.param([owner(controller=None)], (im("m", replicas=2),), None, id="controller-unset"),
    pytest.param([owner(kind="Deployment")], (im("m", replicas=2),), None, id="another-kind"),
    pytest.param([owner(apiVersion="example.com/v1")], (im("m", replicas=2),), None, id="another-group"),
    pytest.param([owner(apiVersion=GROUP)], (im("m", replicas=2),), None, id="group-without-version"),
    pytest.param([owner(apiVersion=f"{GROUP}.example.com/v1")], (im("m", replicas=2),), None,
                 id="group-that-only-starts-the-same"),
    pytest.param([owner(apiVersion=None)], (im("m", replicas=2),), None, id="no-api-version"),
    pytest.param([owner(name="other")], (im("m", replicas=2), im("other", replicas=2)), None,
                 id="owned-by-another-model"),
    pytest.param({"0": owner()}, (im("m", replicas=2),), None, id="references-not-a-list"),
    pytest.param(["x", owner()], (im("m", replicas=2),), 2, id="second-reference"),
    pytest.param([owner(kind="ReplicaSet", controller=False), owner()], (im("m", replicas=3),), 3,
                 id="after-another-owner"),
    pytest.param([owner()], (im("m", memory="lots", replicas=2),), None, id="model-unreadable"),
    pytest.param(None, (im("m", replicas=2, deploymentRef={"name": "llama"}),), 2, id="adopted-by-deployment-ref"),
    pytest.param(None, (im("m", replicas=2, deploymentRef={"name": "m"}),), None, id="deployment-ref-to-another"),
    pytest.param(None, (im("m", replicas=2, deploymentRef="llama"),), None, id="deployment-ref-a-string"),
    pytest.param(None, (im("m", replicas=2, deploymentRef={}),), None, id="deployment-ref-without-name"),
    pytest.param([owner(controller=False)], (im("m", replicas=2, deploymentRef={"name": "llama"}),), 2,
                 id="adopted-and-not-controlled"),
]


@pytest.mark.parametrize(("refs", "stored", "owned"), OWNERS)
def test_deployment_admitted_on_its_model(refs, stored, owned):
    new = dep("llama", replicas=4, refs=refs)
    assert classify(request("dep", new, None, op="CREATE"), *stored) == dep_demand("create", 0, new, owned=owned)


def test_a_model_whose_spec_is_not_an_object_admits_nothing():
    stored = im("m", replicas=2)
    stored["spec"] = ["memory", "16Gi"]
    new = dep("llama", replicas=4, refs=[owner()])
    assert classify(request("dep", new, None, op="CREATE"), stored) == dep_demand("create", 0, new)


# ----- /scale of a Deployment -----
@pytest.mark.parametrize(
    ("new", "old", "stored", "answer"),
    [
        pytest.param(scale(1), scale(3), (), allowed("decrease", "scale deployment default/llama from 3 to 1: "
                                                     "decreases are always allowed"), id="down"),
        pytest.param(scale(3), scale(3), (), no_change("scale deployment default/llama from 3 to 3: no new replicas"),
                     id="same"),
        pytest.param(scale(0), scale(None), (), no_change("scale deployment default/llama from 0 to 0: no new "
                                                          "replicas"), id="zero"),
        pytest.param(scale(5), scale(2), (),
                     allowed("not_a_model", "deployment default/llama is not a model workload"), id="not-in-cache"),
        pytest.param(scale(5), scale(2), (dep("llama", model=None),),
                     allowed("not_a_model", "deployment default/llama has no model label"), id="unlabelled"),
        pytest.param(scale(5), scale(2), (dep("llama", model=""),),
                     allowed("not_a_model", "deployment default/llama has no model label"), id="empty-label"),
        pytest.param(scale(5), scale(2), (dep("other"),),
                     allowed("not_a_model", "deployment default/llama is not a model workload"),
                     id="another-deployment"),
    ],
)
def test_deployment_scale_without_a_model(new, old, stored, answer):
    assert classify(request("dep-scale", new, old), *stored) == answer


@pytest.mark.parametrize(
    ("stored", "frm", "to", "owned", "warnings"),
    [
        pytest.param((), 2, 5, None, (), id="up"),
        pytest.param((), 0, 1, None, (), id="from-zero"),
        pytest.param((im("m", replicas=5),), 2, 5, None, (), id="model-not-owner"),
        pytest.param((im("m", replicas=5, peak="8Gi"),), 2, 5, None,
                     ("m declares 16Gi but peaked at 8Gi (100% over); consider lowering spec.memory",),
                     id="warns-from-the-models-status"),
        pytest.param((im("m", replicas=3, deploymentRef={"name": "llama"}),), 2, 5, 3, (), id="adopted"),
    ],
)
def test_deployment_scale_of_a_model(stored, frm, to, owned, warnings):
    parent = dep("llama", replicas=frm)
    answer = classify(request("dep-scale", scale(to), scale(frm)), parent, *stored)
    assert answer == Demand(model_from_deployment(parent), frm, to,
                            f"scale deployment default/llama from {frm} to {to} (model default/m)",
                            owner_replicas=owned, warnings=warnings)


def test_deployment_scale_of_an_owned_deployment_counts_the_models_replicas():
    parent = dep("llama", replicas=1, refs=[owner()])
    answer = classify(request("dep-scale", scale(2), scale(1)), parent, im("m", replicas=2))
    assert answer == Demand(model_from_deployment(parent), 1, 2, "scale deployment default/llama from 1 to 2 "
                            "(model default/m)", owner_replicas=2)


@pytest.mark.parametrize(
    ("parent", "prefix", "fragment"),
    [
        pytest.param(dep("llama", memory="a lot"), "invalid model Deployment: ", "'a lot'", id="bad-memory"),
        pytest.param(dep("llama", memory=None), "invalid model Deployment: ", "is required", id="no-memory"),
    ],
)
def test_deployment_scale_of_a_bad_parent_is_refused(parent, prefix, fragment):
    with pytest.raises(InvalidObject) as caught:
        classify(request("dep-scale", scale(5), scale(2)), parent)
    assert caught.value.uid == UID
    assert caught.value.message.startswith(prefix) and fragment in caught.value.message, caught.value.message


class _Lookup:
    """The parent as an apiserver read returns it (the cache would drop a Deployment it cannot read)."""

    def __init__(self, parent: dict[str, Any]) -> None:
        self.parent = parent

    def inference_model(self, namespace: str, name: str) -> None:
        return None

    def deployment(self, namespace: str, name: str) -> dict[str, Any]:
        return self.parent


def test_deployment_scale_of_a_parent_with_bad_labels_is_refused():
    parent = dep("llama")
    parent["metadata"]["labels"]["replicas"] = 3
    with pytest.raises(InvalidObject) as caught:
        Classifier(_Lookup(parent)).classify(request("dep-scale", scale(5), scale(2)))
    assert caught.value.uid == UID
    assert caught.value.message.startswith("invalid Deployment: ") and "metadata.labels" in caught.value.message


# ----- the over-provisioning warning -----
@pytest.mark.parametrize(
    ("name", "declared", "status", "ratio", "warning"),
    [
        pytest.param("llama", 40 * GI, {"observedPeakMemory": "20Gi"}, 0.2,
                     "llama declares 40Gi but peaked at 20Gi (100% over); consider lowering spec.memory", id="double"),
        pytest.param("llama", 12 * GI, {"observedPeakMemory": "10Gi"}, 0.2, None, id="exactly-20-percent-over"),
        pytest.param("llama", 12 * GI + 1, {"observedPeakMemory": "10Gi"}, 0.2,
                     "llama declares 12884901889 but peaked at 10Gi (20% over); consider lowering spec.memory",
                     id="a-byte-past-20-percent"),
        pytest.param("llama", 5 * GI, {"observedPeakMemory": "4Gi"}, 0.25, None, id="exactly-the-ratio"),
        pytest.param("llama", 5 * GI + 1, {"observedPeakMemory": "4Gi"}, 0.25,
                     "llama declares 5368709121 but peaked at 4Gi (25% over); consider lowering spec.memory",
                     id="a-byte-past-the-ratio"),
        pytest.param("llama", 5 * GI, {"observedPeakMemory": "3Gi"}, 0.2,
                     "llama declares 5Gi but peaked at 3Gi (67% over); consider lowering spec.memory",
                     id="rounded-up"),
        pytest.param("llama", 4 * GI, {"observedPeakMemory": "3Gi"}, 0.2,
                     "llama declares 4Gi but peaked at 3Gi (33% over); consider lowering spec.memory",
                     id="rounded-down"),
        pytest.param("llama", 81559 * 2**20, {"observedPeakMemory": "40000Mi"}, 0.2,
                     "llama declares 81559Mi but peaked at 40000Mi (104% over); consider lowering spec.memory",
                     id="gfd-size"),
        pytest.param("meta-llama/Meta-Llama-3.1-70B-Instruct-AWQ-INT4", 80 * GI, {"observedPeakMemory": "40Gi"}, 0.2,
                     "meta-llama/Meta-Llama-3.1-70B-Instruct-A declares 80Gi but peaked at 40Gi (100% over); "
                     "consider lowering spec.memory", id="long-name-cut-to-40"),
        pytest.param("llama", 4 * GI, {"observedPeakMemory": "1Gi"}, 3.0, None, id="large-ratio"),
        pytest.param("llama", 40 * GI, {"observedPeakMemory": "0"}, 0.2, None, id="zero-peak"),
        pytest.param("llama", 40 * GI, {"observedPeakMemory": "1"}, 0.2,
                     "llama declares 40Gi but peaked at 1 (4294967295900% over); consider lowering spec.memory",
                     id="one-byte-peak"),
        pytest.param("llama", 40 * GI, {"observedPeakMemory": ""}, 0.2, None, id="empty-peak"),
        pytest.param("llama", 40 * GI, {"observedPeakMemory": None}, 0.2, None, id="null-peak"),
        pytest.param("llama", 40 * GI, {"observedPeakMemory": "lots"}, 0.2, None, id="bad-peak"),
        pytest.param("llama", 40 * GI, {"lastRequestTime": "2026-01-15T10:30:00Z"}, 0.2, None, id="no-peak"),
        pytest.param("llama", 40 * GI, {}, 0.2, None, id="empty-status"),
        pytest.param("llama", 40 * GI, None, 0.2, None, id="no-status"),
        pytest.param("llama", 40 * GI, ["observedPeakMemory"], 0.2, None, id="status-not-an-object"),
    ],
)
def test_overprovision_warning(name, declared, status, ratio, warning):
    assert overprovision_warning(name, declared, status, ratio) == warning


@pytest.mark.parametrize(
    ("ratio", "warnings"),
    [
        pytest.param(None, ("llama declares 13Gi but peaked at 10Gi (30% over); consider lowering spec.memory",),
                     id="default-20-percent"),
        pytest.param(0.3, (), id="30-percent"),
        pytest.param(0.29, ("llama declares 13Gi but peaked at 10Gi (30% over); consider lowering spec.memory",),
                     id="29-percent"),
    ],
)
def test_the_classifier_warns_past_its_ratio(ratio, warnings):
    answer = classify(request("im", im("llama", "13Gi", 1, peak="10Gi"), im("llama", "13Gi", 1)), ratio=ratio)
    assert answer == no_change("update inferencemodel default/llama with 1 replica(s): no new replicas", warnings)


# ----- the decision on a view plus the ledger -----
def entry(model: str, replicas: int, memory: int = 16 * GI, *, expires_at: float = NOW + 30) -> LedgerEntry:
    return LedgerEntry(model=f"default/{model}", replicas=replicas, memory_bytes=memory, expires_at=expires_at,
                       admitted_at=NOW - 30)


def demand_for(obj: dict[str, Any], frm: int, to: int, *, grew: bool = False, owned: int | None = None,
               warnings: tuple[str, ...] = ()) -> Demand:
    model = model_from_inferencemodel(obj) if obj["kind"] == "InferenceModel" else model_from_deployment(obj)
    assert model is not None
    return Demand(model, frm, to, f"scale {model.key} from {frm} to {to}", replace_placements=grew,
                  owner_replicas=owned, warnings=warnings)


# One 64Gi node; `busy` (32Gi, 1 replica, idle 60 s of a 10m cooldown) runs there: 32Gi free.
def busy_cluster(*extra: dict[str, Any]) -> ClusterCache:
    busy = im("busy", "32Gi", 1, cooldownPeriod="10m", status={"lastRequestTime": "2027-01-15T07:59:00Z"})
    return cache_of(node(), busy, pod("busy", "32Gi"), *extra)


WARN = ("llama declares 16Gi but peaked at 8Gi (100% over); consider lowering spec.memory",)


def fits(new: int, memory: str = "16Gi", name: str = "llama", warnings: tuple[str, ...] = ()) -> Verdict:
    return allowed("fits", f"{name} fits: {new} new replica(s) of {memory} in the whole cluster", warnings)


@pytest.mark.parametrize(
    ("demand", "extra", "entries", "verdict", "committed"),
    [
        pytest.param(demand_for(im(), 0, 2), (), (), fits(2), 2, id="two-fit-in-32Gi"),
        pytest.param(demand_for(im(), 0, 2, warnings=WARN), (), (), fits(2, warnings=WARN), 2,
                     id="the-warning-rides-along"),
        pytest.param(demand_for(im(), 1, 2), (pod("llama", "16Gi"),), (), fits(1), 2,
                     id="one-running-one-new"),
        pytest.param(demand_for(im(), 0, 1), (pod("llama", "16Gi"),), (),
                     allowed("no_change", "llama: 1 replica(s) need no new memory"), None,
                     id="already-running-nothing-to-commit"),
        pytest.param(demand_for(im(), 0, 2), (), (entry("busy", 2, 32 * GI, expires_at=NOW - 1),), fits(2), 2,
                     id="an-expired-entry-holds-nothing"),
        pytest.param(demand_for(im(), 0, 1), (), (entry("other", 1, 16 * GI),), fits(1), 1,
                     id="admitted-16Gi-leave-room-for-one"),
        pytest.param(demand_for(im("llama", "33Gi"), 0, 1), (), (), denied(
            403, "insufficient_memory", "insufficient_memory: llama needs 33Gi in the whole cluster; 32Gi available; "
            "blocked by busy (32Gi, idle 60s); retry after 540s"), None, id="a-byte-over-is-denied"),
        pytest.param(demand_for(im(), 0, 2), (), (entry("other", 1, 16 * GI),), denied(
            403, "insufficient_memory", "insufficient_memory: llama needs 2 more replicas of 16Gi in the whole "
            "cluster; 16Gi available; blocked by busy (32Gi, idle 60s), other (16Gi, starting); it fits once busy is "
            "gone, in 540s; retry after 540s"), None, id="admitted-entry-counts"),
        pytest.param(demand_for(im("llama", "65Gi"), 0, 1, warnings=WARN), (), (), denied(
            403, "exceeds_node_capacity", "exceeds_node_capacity: llama needs 65Gi but the largest node in the whole "
            "cluster has 64Gi; it can never fit without a larger node", WARN), None, id="never-fits-no-retry-hint"),
    ],
)
def test_decide(demand, extra, entries, verdict, committed):
    outcome = decide(demand, busy_cluster(*extra).view(), entries, NOW)
    assert outcome.verdict == verdict
    if committed is None:
        assert outcome.commit is None
    else:
        assert outcome.commit == LedgerEntry(model="default/llama", replicas=committed,
                                             memory_bytes=demand.model.memory_bytes, expires_at=NOW + 60,
                                             admitted_at=NOW, node_selector={}, model_name="llama")
    assert outcome.decision is not None
    assert (outcome.decision.replicas_from, outcome.decision.replicas_to) == (demand.replicas_from,
                                                                              demand.replicas_to)


def test_a_fit_commits_the_whole_entry():
    model = im("llama", "20Gi", 0, modelName="meta-llama/Llama-2-7b", nodeSelector={"pool": "a"})
    cache = cache_of(node("gpu-1", "64Gi", pool="a"), node("gpu-2", "64Gi", pool="b"), model)
    outcome = decide(demand_for(model, 0, 3), cache.view(), (), NOW, deny_code=429, ttl_seconds=15.0)
    assert outcome.verdict == allowed("fits", "meta-llama/Llama-2-7b fits: 3 new replica(s) of 20Gi in pool pool=a")
    assert outcome.commit == LedgerEntry(model="default/llama", replicas=3, memory_bytes=20 * GI, expires_at=NOW + 15,
                                         admitted_at=NOW, node_selector={"pool": "a"},
                                         model_name="meta-llama/Llama-2-7b")


def test_the_deny_code_is_the_one_configured():
    outcome = decide(demand_for(im("llama", "33Gi"), 0, 1), busy_cluster().view(), (), NOW, deny_code=429)
    assert (outcome.verdict.allowed, outcome.verdict.code, outcome.verdict.status_reason) == (
        False, 429, "TooManyRequests")
    assert outcome.commit is None


@pytest.mark.parametrize(
    ("new_memory", "frm", "to", "verdict"),
    [
        # `busy` holds 32Gi of the 64Gi node; llama's running 16Gi replicas are placed afresh at the new size.
        pytest.param("32Gi", 1, 1, fits(1, "32Gi"), id="grown-replica-fits-in-its-own-room"),
        pytest.param("33Gi", 1, 1, denied(
            403, "insufficient_memory", "insufficient_memory: llama needs 33Gi in the whole cluster; 32Gi available; "
            "blocked by busy (32Gi, idle 60s); retry after 540s"), id="a-byte-past-its-own-room"),
        pytest.param("16Gi", 2, 2, fits(2), id="two-re-placed-on-a-full-node"),
        pytest.param("20Gi", 2, 1, fits(1, "20Gi"), id="grown-while-scaling-down"),
    ],
)
def test_a_grown_model_is_placed_afresh(new_memory, frm, to, verdict):
    running = [pod("llama", "16Gi", i) for i in range(frm)]
    view = busy_cluster(im("llama", "16Gi", frm), *running).view()
    demand = demand_for(im("llama", new_memory, to), frm, to, grew=True)
    outcome = decide(demand, view, (), NOW)
    assert outcome.verdict == verdict
    assert outcome.decision is not None and outcome.decision.replicas_from == 0
    if verdict.allowed:
        assert outcome.commit is not None and (outcome.commit.replicas, outcome.commit.memory_bytes) == (
            to, demand.model.memory_bytes)


@pytest.mark.parametrize(
    ("owned", "to", "entries", "verdict"),
    [
        pytest.param(4, 4, (), allowed("admitted_on_model", "scale default/m from 0 to 4: within the 4 replica(s) "
                                       "admitted on the InferenceModel", WARN), id="within-the-model-spec"),
        pytest.param(4, 3, (), allowed("admitted_on_model", "scale default/m from 0 to 3: within the 4 replica(s) "
                                       "admitted on the InferenceModel", WARN), id="below-the-model-spec"),
        pytest.param(0, 0, (), allowed("admitted_on_model", "scale default/m from 0 to 0: within the 0 replica(s) "
                                       "admitted on the InferenceModel", WARN), id="zero-of-zero"),
        pytest.param(2, 4, (entry("m", 4),), allowed(
            "admitted_on_model", "scale default/m from 0 to 4: within the 4 replica(s) admitted on the InferenceModel",
            WARN), id="admitted-in-the-ledger-before-the-spec-shows-it"),
        pytest.param(2, 3, (entry("m", 4), entry("m", 1)), allowed(
            "admitted_on_model", "scale default/m from 0 to 3: within the 4 replica(s) admitted on the InferenceModel",
            WARN), id="the-largest-entry"),
        pytest.param(2, 3, (), denied(
            403, "insufficient_memory", "insufficient_memory: m needs 3 more replicas of 16Gi in the whole cluster; "
            "32Gi available; blocked by busy (32Gi, idle 60s); retry after 540s", WARN), id="one-past-the-model"),
        pytest.param(2, 4, (entry("other", 4, 0),), denied(
            403, "insufficient_memory", "insufficient_memory: m needs 4 more replicas of 16Gi in the whole cluster; "
            "32Gi available; blocked by busy (32Gi, idle 60s); retry after 540s", WARN),
            id="another-models-entry-does-not-count"),
    ],
)
def test_a_deployment_its_model_admitted_passes_without_memory(owned, to, entries, verdict):
    demand = demand_for(dep("m", replicas=to), 0, to, owned=owned, warnings=WARN)
    outcome = decide(demand, busy_cluster().view(), entries, NOW)
    assert outcome.verdict == verdict
    assert outcome.commit is None
    assert (outcome.decision is None) is verdict.allowed


def test_without_an_owner_the_deployment_is_judged_on_memory():
    outcome = decide(demand_for(dep("m", replicas=2), 0, 2), busy_cluster().view(), (), NOW)
    assert outcome.verdict == fits(2, name="m")
    assert outcome.commit is not None and (outcome.commit.model, outcome.commit.replicas) == ("default/m", 2)


# ----- the deny text -----
def test_denial_message_is_the_decision_with_its_retry_hint():
    view = busy_cluster(im("llama", "33Gi")).view()
    waiting = decide_scale(view, "default/llama", 1, NOW)
    never = decide_scale(busy_cluster(im("llama", "65Gi")).view(), "default/llama", 1, NOW)
    assert (waiting.retry_after_seconds, never.retry_after_seconds) == (540, 0)
    assert denial_message(waiting) == ("insufficient_memory: llama needs 33Gi in the whole cluster; 32Gi available; "
                                       "blocked by busy (32Gi, idle 60s); retry after 540s")
    assert denial_message(never) == ("exceeds_node_capacity: llama needs 65Gi but the largest node in the whole "
                                     "cluster has 64Gi; it can never fit without a larger node")
