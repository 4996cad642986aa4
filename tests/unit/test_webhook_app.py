"""The webhook's `/validate` fed the AdmissionReviews a real kube-apiserver sent (tests/fixtures/captured),
with the cluster view filled by hand through `ClusterCache.apply` (no cluster, no sockets).

What a user would notice: which scale-ups pass, the deny code and message kubectl prints, the uid
echoed so the apiserver accepts the answer, dry runs leaving no trace, decreases always passing,
warnings about oversized models, and a well-formed answer (never a 500) for anything malformed.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from budget import decide_scale
from kubeview import ClusterCache
from webhook import LocalLedger, WebhookSettings, create_app
from webhook.app import apiserver_timeout
from webhook.ledger import LedgerBusy, LedgerUnavailable

pytestmark = pytest.mark.unit

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "captured"
GI = 2**30
NOW = 1_800_000_000.0  # decisions are evaluated at this moment (the ledger's clock)
POOL = {"inference-pool": "gpu-nodes"}
MODEL = "inference.eh-ops.io/model"
MEMORY = "inference.eh-ops.io/memory"


def captured(name: str) -> dict[str, Any]:
    return json.loads((CAPTURED / name).read_text())


def stamp(seconds_ago: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(NOW - seconds_ago, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----- cluster objects -----
def node(name: str = "shadow", capacity: str = "128Gi") -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": dict(POOL),
                     "annotations": {"inference.eh-ops.io/memory-capacity": capacity}},
    }


def inference_model(name: str, memory: str, replicas: int = 0, *, selector: dict[str, str] | None = None,
                    idle_seconds: float | None = None, peak: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if idle_seconds is not None:
        status["lastRequestTime"] = stamp(idle_seconds)
    if peak is not None:
        status["observedPeakMemory"] = peak
    spec: dict[str, Any] = {"modelName": name, "memory": memory, "replicas": replicas, "cooldownPeriod": "10m"}
    if selector is not None:
        spec["nodeSelector"] = selector
    return {"kind": "InferenceModel", "apiVersion": "inference.eh-ops.io/v1alpha1",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec, "status": status}


def pod(model: str, memory: str, index: int = 0, node_name: str = "shadow") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": f"{model}-{index}", "namespace": "default", "uid": f"{model}-uid-{index}",
                     "labels": {MODEL: model}, "annotations": {MEMORY: memory}},
        "spec": {"nodeName": node_name},
        "status": {"phase": "Running", "startTime": stamp(3600)},
    }


def labelled(deployment: dict[str, Any], model: str, memory: str) -> dict[str, Any]:
    """A captured Deployment turned into a model workload: the label and the pod template's memory."""
    d = copy.deepcopy(deployment)
    d["metadata"].setdefault("labels", {})[MODEL] = model
    template = d["spec"].setdefault("template", {}).setdefault("metadata", {})
    template.setdefault("annotations", {})[MEMORY] = memory
    return d


def cluster(*objects: dict[str, Any]) -> ClusterCache:
    cache = ClusterCache(None)
    for obj in objects:
        cache.apply(obj["kind"], "ADDED", copy.deepcopy(obj))
    return cache


def roomy(*extra: dict[str, Any]) -> ClusterCache:
    """One 128Gi node; model-a (80Gi) runs, idle for 120 s: 48Gi free."""
    return cluster(
        node(),
        inference_model("model-a", "80Gi", 1, idle_seconds=120),
        pod("model-a", "80Gi"),
        inference_model("llama-2-7b", "16Gi", 0),
        *extra,
    )


def full(*extra: dict[str, Any]) -> ClusterCache:
    """model-a (80Gi, idle 120 s) and model-b (40Gi, idle 30 s) run: 8Gi free."""
    return roomy(inference_model("model-b", "40Gi", 1, idle_seconds=30), pod("model-b", "40Gi"), *extra)


class Harness:
    """An app over a cache, with its in-process ledger at a fixed clock."""

    def __init__(self, cache: ClusterCache, **settings: Any) -> None:
        settings.setdefault("require_synced", False)
        self.cache = cache
        self.ledger = LocalLedger(clock=lambda: NOW)
        self.app = create_app(WebhookSettings(**settings), cache, self.ledger)
        self.client = self.app.test_client()

    def review(self, body: Any) -> dict[str, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = self.client.post("/validate", data=data, content_type="application/json")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        answer = resp.get_json()
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        return answer["response"]

    def ledger_replicas(self) -> dict[str, int]:
        return {e.model: e.replicas for e in self.ledger.entries()}


# ----- request builders from the captured reviews -----
def im_scale(to: int | None = 1, frm: int | None = None, name: str = "llama-2-7b") -> dict[str, Any]:
    review = captured("admission-update-inferencemodel-scale.json")
    req = review["request"]
    req["name"] = req["object"]["metadata"]["name"] = req["oldObject"]["metadata"]["name"] = name
    req["object"]["spec"] = {} if to is None else {"replicas": to}
    if frm is not None:
        req["oldObject"]["spec"] = {"replicas": frm}
    return review


def im_create(memory: str | None = None, replicas: int | None = None, **spec: Any) -> dict[str, Any]:
    review = captured("admission-create-inferencemodel.json")
    obj = review["request"]["object"]
    if memory is not None:
        obj["spec"]["memory"] = memory
    if replicas is not None:
        obj["spec"]["replicas"] = replicas
    obj["spec"].update(spec)
    return review


def im_update(old_memory: str, new_memory: str, replicas: int, peak: str | None = None) -> dict[str, Any]:
    review = im_create(new_memory, replicas)
    req = review["request"]
    req["operation"] = "UPDATE"
    req["oldObject"] = copy.deepcopy(req["object"])
    req["oldObject"]["spec"]["memory"] = old_memory
    if peak is not None:
        req["object"]["status"] = {"observedPeakMemory": peak}
    return review


def deployment_scale(to: int = 5) -> dict[str, Any]:
    review = captured("admission-update-deployment-scale.json")  # gpu-demo 2 -> 5
    review["request"]["object"]["spec"]["replicas"] = to
    return review


def gpu_demo(memory: str, replicas: int = 2) -> dict[str, Any]:
    """The captured gpu-demo Deployment (the parent of the captured scale) as a model workload."""
    old = captured("admission-update-deployment.json")["request"]["oldObject"]
    d = labelled(old, "gpu-demo", memory)
    d["spec"]["replicas"] = replicas
    return d


def deployment_update(memory: str | None) -> dict[str, Any]:
    review = captured("admission-update-deployment.json")  # gpu-demo 3 -> 6
    if memory is not None:
        req = review["request"]
        req["object"] = labelled(req["object"], "gpu-demo", memory)
        req["oldObject"] = labelled(req["oldObject"], "gpu-demo", memory)
    return review


def deployment_create(memory: str | None, owner: str | None = None) -> dict[str, Any]:
    review = captured("admission-create-deployment.json")  # gpu-wh-1 with 4 replicas
    if memory is not None:
        obj = labelled(review["request"]["object"], "gpu-wh-1", memory)
        if owner:
            obj["metadata"]["ownerReferences"] = [{
                "apiVersion": "inference.eh-ops.io/v1alpha1", "kind": "InferenceModel", "name": owner,
                "uid": "7b2b20a4", "controller": True, "blockOwnerDeletion": True,
            }]
        review["request"]["object"] = obj
    return review


def adopting_model(name: str, replicas: int) -> dict[str, Any]:
    """An InferenceModel whose controller adopts an existing Deployment of the same name."""
    model = inference_model(name, "16Gi", replicas)
    model["spec"]["deploymentRef"] = {"name": name}
    return model


def dry(review: dict[str, Any]) -> dict[str, Any]:
    review["request"]["dryRun"] = True
    return review


# ----- the decisions, request by request -----
CASES = [
    # id, review, cache, allowed, code, message fragments, ledger after
    ("im-scale-fits", im_scale(1), roomy, True, None, [], {"default/llama-2-7b": 1}),
    ("im-scale-does-not-fit", im_scale(1), full, False, 403,
     ["insufficient_memory: llama-2-7b needs 16Gi in the whole cluster; 8Gi available",
      "blocked by model-a (80Gi, idle 120s), model-b (40Gi, idle 30s)", "retry after 480s"], {}),
    ("im-scale-three-replicas-fit", im_scale(3), roomy, True, None, [], {"default/llama-2-7b": 3}),
    ("im-scale-four-replicas-does-not-fit", im_scale(4), roomy, False, 403,
     ["llama-2-7b needs 4 more replicas of 16Gi", "48Gi available", "model-a (80Gi, idle 120s)"], {}),
    ("im-create-zero-replicas-passes-when-full", im_create(), full, True, None, [], {}),
    ("im-create-fits", im_create("40Gi", 1), roomy, True, None, [], {"default/llama-2-7b": 1}),
    ("im-create-does-not-fit", im_create("60Gi", 1), roomy, False, 403,
     ["llama-2-7b needs 60Gi in the whole cluster; 48Gi available; blocked by model-a (80Gi, idle 120s)"],
     {}),
    ("im-create-larger-than-any-node", im_create("200Gi", 1), roomy, False, 403,
     ["exceeds_node_capacity", "largest node in the whole cluster has 128Gi"], {}),
    ("deployment-scale-unlabelled-parent", deployment_scale(5),
     lambda: full(captured("admission-update-deployment.json")["request"]["oldObject"]), True, None, [], {}),
    ("deployment-scale-unknown-parent", deployment_scale(5), full, True, None, [], {}),
    ("deployment-scale-model-fits", deployment_scale(5), lambda: roomy(gpu_demo("8Gi")), True, None, [],
     {"default/gpu-demo": 5}),
    ("deployment-scale-model-does-not-fit", deployment_scale(5), lambda: roomy(gpu_demo("16Gi")), False, 403,
     ["insufficient_memory: gpu-demo needs 5 more replicas of 16Gi", "48Gi available"], {}),
    ("deployment-update-unlabelled", deployment_update(None), full, True, None, [], {}),
    ("deployment-update-model-fits", deployment_update("8Gi"), roomy, True, None, [], {"default/gpu-demo": 6}),
    ("deployment-update-model-does-not-fit", deployment_update("16Gi"), roomy, False, 403,
     ["gpu-demo needs 6 more replicas of 16Gi"], {}),
    ("deployment-create-unlabelled", deployment_create(None), full, True, None, [], {}),
    ("deployment-create-model-does-not-fit", deployment_create("16Gi"), roomy, False, 403,
     ["gpu-wh-1 needs 4 more replicas of 16Gi in the whole cluster; 48Gi available"], {}),
    ("deployment-create-owned-within-model-spec", deployment_create("16Gi", owner="gpu-wh-1"),
     lambda: full(inference_model("gpu-wh-1", "16Gi", 4)), True, None, [], {}),
    ("deployment-create-owned-beyond-model-spec", deployment_create("16Gi", owner="gpu-wh-1"),
     lambda: full(inference_model("gpu-wh-1", "16Gi", 2)), False, 403, ["gpu-wh-1 needs 4 more replicas"], {}),
    ("deployment-create-adopted-by-deployment-ref", deployment_create("16Gi"),
     lambda: full(adopting_model("gpu-wh-1", 4)), True, None, [], {}),
    ("deployment-status-not-checked", captured("admission-update-deployment-status.json"), full, True, None, [],
     {}),
    ("im-status-not-checked", captured("admission-update-inferencemodel-status.json"), full, True, None, [], {}),
]


@pytest.mark.parametrize(
    ("review", "make_cache", "allowed", "code", "fragments", "ledger"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_captured_review_decision(review, make_cache, allowed, code, fragments, ledger):
    h = Harness(make_cache())
    response = h.review(copy.deepcopy(review))
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is allowed, response
    if allowed:
        assert "status" not in response
    else:
        assert response["status"]["code"] == code
        assert response["status"]["reason"] == "Forbidden"
        for fragment in fragments:
            assert fragment in response["status"]["message"]
    assert h.ledger_replicas() == ledger


@pytest.mark.parametrize("name", sorted(p.name for p in CAPTURED.glob("admission-*.json")))
def test_every_captured_review_gets_a_v1_answer_with_its_uid(name):
    review = captured(name)
    response = Harness(full()).review(review)
    assert response["uid"] == review["request"]["uid"]
    assert isinstance(response["allowed"], bool)


def test_deny_message_is_the_proxy_explanation():
    """The webhook's message carries the same Decision message the proxy's 429 body has."""
    cache = full()
    response = Harness(cache).review(im_scale(1))
    decision = decide_scale(cache.view(), "default/llama-2-7b", 1, NOW)
    assert not decision.allowed
    assert response["status"]["message"].startswith(f"insufficient_memory: {decision.message}")


def test_deny_code_429_is_too_many_requests():
    response = Harness(full(), deny_code=429).review(im_scale(1))
    assert response["status"]["code"] == 429
    assert response["status"]["reason"] == "TooManyRequests"


@pytest.mark.parametrize(
    ("review", "make_cache"),
    [
        pytest.param(im_scale(1), roomy, id="im-scale"),
        pytest.param(im_create("40Gi", 1), roomy, id="im-create"),
        pytest.param(deployment_scale(5), lambda: roomy(gpu_demo("8Gi")), id="deployment-scale"),
    ],
)
def test_dry_run_answers_but_reserves_nothing(review, make_cache):
    h = Harness(make_cache())
    response = h.review(dry(copy.deepcopy(review)))
    assert response["allowed"] is True
    assert h.ledger_replicas() == {}
    # The same request for real reserves, so the dry run's "no trace" is not an accident of the setup.
    assert h.review(copy.deepcopy(review))["allowed"] is True
    assert h.ledger_replicas() != {}


def test_dry_run_deny_still_explains():
    response = Harness(full()).review(dry(im_scale(1)))
    assert response["allowed"] is False
    assert "insufficient_memory" in response["status"]["message"]


@pytest.mark.parametrize(
    ("review", "make_cache"),
    [
        pytest.param(im_scale(0, frm=3), full, id="im-scale-to-zero"),
        pytest.param(im_scale(None, frm=1), full, id="im-scale-to-zero-replicas-omitted"),
        pytest.param(im_scale(1, frm=2), full, id="im-scale-down"),
        pytest.param(deployment_scale(1), lambda: full(gpu_demo("16Gi")), id="deployment-scale-down"),
        pytest.param(im_update("16Gi", "8Gi", 1), full, id="im-memory-decrease"),
    ],
)
def test_decreases_always_pass_even_when_full(review, make_cache):
    h = Harness(make_cache())
    response = h.review(review)
    assert response["allowed"] is True
    assert h.ledger_replicas() == {}


def test_scale_from_omitted_zero_reads_replicas_as_zero():
    """The captured CRD scale has oldObject.spec == {}: 0 -> 1 is a scale-up that must be checked."""
    review = im_scale(1)
    assert review["request"]["oldObject"]["spec"] == {}
    assert Harness(full()).review(review)["allowed"] is False


def test_two_scale_ups_that_fit_alone_do_not_both_pass():
    """The ledger counts the first admission before any watch event shows it."""
    h = Harness(roomy(inference_model("c1", "30Gi"), inference_model("c2", "30Gi")))
    first = h.review(im_scale(1, name="c1"))
    second = h.review(im_scale(1, name="c2"))
    assert first["allowed"] is True
    assert second["allowed"] is False
    assert "c2 needs 30Gi" in second["status"]["message"]
    assert "18Gi available" in second["status"]["message"]
    assert h.ledger_replicas() == {"default/c1": 1}


def test_concurrent_scale_ups_in_one_process_never_overcommit():
    """20 threads scale 20 models (16Gi each) at once into 48Gi: exactly three pass."""
    models = [inference_model(f"m{i}", "16Gi") for i in range(20)]
    h = Harness(roomy(*models))
    results: list[bool] = []
    barrier = threading.Barrier(20)

    def scale(i: int) -> None:
        client = h.app.test_client()
        barrier.wait()
        resp = client.post("/validate", data=json.dumps(im_scale(1, name=f"m{i}")), content_type="application/json")
        results.append(resp.get_json()["response"]["allowed"])

    threads = [threading.Thread(target=scale, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(True) == 3
    assert sum(h.ledger_replicas().values()) == 3


def test_memory_growth_is_checked_with_replicas_unchanged():
    placed = pod("llama-2-7b", "16Gi")
    # 32Gi free beside the running 16Gi replica; re-placed at the new size it may use all 48Gi.
    fits = Harness(roomy(placed)).review(im_update("16Gi", "40Gi", 1))
    too_big = Harness(roomy(placed)).review(im_update("16Gi", "50Gi", 1))
    assert fits["allowed"] is True
    assert too_big["allowed"] is False
    assert "llama-2-7b needs 50Gi" in too_big["status"]["message"]


def _tensor_parallel_update(**new_spec: Any) -> dict[str, Any]:
    """llama-2-7b, 60Gi over 2 devices with 1 replica, updated to `new_spec` (replicas unchanged)."""
    review = im_update("60Gi", "60Gi", 1)
    req = review["request"]
    req["oldObject"]["spec"]["devices"] = 2
    req["object"]["spec"].update({"devices": 2, **new_spec})
    return review


@pytest.mark.parametrize(
    ("new_spec", "allowed", "fragment"),
    [
        pytest.param({}, True, "", id="unchanged"),
        pytest.param({"devices": 1}, False, "the largest device in the whole cluster has 40Gi", id="onto-one-gpu"),
        pytest.param({"deviceSelector": {"kind": "mig"}}, False, "matches deviceSelector", id="onto-mig-slices"),
        pytest.param({"devices": 2, "memory": "64Gi"}, True, "", id="still-fits-2-x-32Gi"),
    ],
)
def test_a_change_of_devices_re_places_the_running_replicas(new_spec, allowed, fragment):
    gpu = {"kind": "Node", "metadata": {"name": "gpu", "annotations": {"inference.eh-ops.io/devices": "2x40Gi"}}}
    running = pod("llama-2-7b", "60Gi", node_name="gpu")
    running["metadata"]["annotations"]["inference.eh-ops.io/devices"] = "0,1"
    model = inference_model("llama-2-7b", "60Gi", 1)
    model["spec"]["devices"] = 2
    response = Harness(cluster(gpu, model, running)).review(_tensor_parallel_update(**new_spec))
    assert response["allowed"] is allowed, response
    if fragment:
        assert fragment in (response.get("status") or {}).get("message", ""), response


@pytest.mark.parametrize(
    ("declared", "peak", "warned"),
    [
        pytest.param("80Gi", "40Gi", True, id="double-the-peak"),
        pytest.param("40Gi", "32Gi", True, id="25-percent-over"),
        pytest.param("38Gi", "32Gi", False, id="under-20-percent"),
        pytest.param("40Gi", None, False, id="no-observation"),
        pytest.param("40Gi", "garbage", False, id="bad-status-is-ignored"),
    ],
)
def test_warning_when_declared_memory_is_far_above_observed_peak(declared, peak, warned):
    response = Harness(cluster(node())).review(im_update("16Gi", declared, 1, peak=peak))
    assert response["allowed"] is True
    warnings = response.get("warnings", [])
    assert bool(warnings) is warned
    for w in warnings:
        assert len(w) < 120
        assert f"declares {declared}" in w and f"peaked at {peak}" in w


def test_warning_rides_along_with_a_denial():
    review = im_update("16Gi", "100Gi", 1, peak="20Gi")
    response = Harness(roomy()).review(review)
    assert response["allowed"] is False
    assert response["warnings"] == ["llama-2-7b declares 100Gi but peaked at 20Gi (400% over); consider lowering "
                                    "spec.memory"]


def test_scale_warns_from_the_cached_model_status():
    cache = roomy(inference_model("big", "40Gi", 0, peak="10Gi"))
    response = Harness(cache).review(im_scale(1, name="big"))
    assert response["allowed"] is True
    assert response["warnings"][0].startswith("big declares 40Gi but peaked at 10Gi")


# ----- malformed input: a well-formed answer, never a 500 -----
def _review_with(**changes: Any) -> dict[str, Any]:
    review = im_scale(1)
    for path, value in changes.items():
        target = review
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return review


_DELETE = object()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b"{not json", "body is not JSON", id="bad-json"),
        pytest.param(b"", "body is not JSON", id="empty"),
        pytest.param(b"[1, 2]", "must be a JSON object", id="json-list"),
        pytest.param({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "without request",
                     id="missing-request"),
        pytest.param({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": "x"},
                     "request must be an object", id="request-not-object"),
        pytest.param(_review_with(request__uid=_DELETE), "request.uid is required", id="missing-uid"),
        pytest.param(_review_with(request__uid=42), "request.uid must be a string", id="uid-not-string"),
        pytest.param(_review_with(request__uid=""), "request.uid is empty", id="empty-uid"),
    ],
)
def test_unanswerable_body_gets_http_400_json(body, fragment):
    h = Harness(roomy())
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = h.client.post("/validate", data=data, content_type="application/json")
    assert resp.status_code == 400
    assert fragment in resp.get_json()["error"]


@pytest.mark.parametrize(
    ("review", "fragment"),
    [
        pytest.param(_review_with(apiVersion="admission.k8s.io/v1beta1"), "expected apiVersion admission.k8s.io/v1",
                     id="v1beta1"),
        pytest.param(_review_with(request__operation=5), "request.operation must be a string", id="operation-type"),
        pytest.param(_review_with(request__operation="PATCH"), "request.operation 'PATCH' is not one of",
                     id="operation-value"),
        pytest.param(_review_with(request__resource="inferencemodels"), "request.resource must be an object",
                     id="resource-type"),
        pytest.param(_review_with(request__kind=_DELETE), "request.kind is required", id="missing-kind"),
        pytest.param(_review_with(request__object=[1]), "request.object must be an object", id="object-type"),
        pytest.param(_review_with(request__dryRun="yes"), "request.dryRun must be a boolean", id="dryrun-type"),
        pytest.param(_review_with(request__object=None), "request.object is required", id="scale-without-object"),
        pytest.param(_review_with(request__object__spec={"replicas": "three"}),
                     "object.spec.replicas must be a non-negative integer, got 'three'", id="scale-replicas-type"),
        pytest.param(_review_with(request__object__spec={"replicas": -1}),
                     "object.spec.replicas must be a non-negative integer, got -1", id="scale-replicas-negative"),
        pytest.param(_review_with(request__object__spec=[]), "object.spec must be an object", id="scale-spec-type"),
        pytest.param(im_create("lots", 1), "spec.memory", id="bad-memory-quantity"),
        pytest.param(im_create(None, "1"), "spec.replicas must be a non-negative integer",
                     id="model-replicas-type"),
        pytest.param(im_create(None, 1, cooldownPeriod="soon"), "spec.cooldownPeriod", id="bad-cooldown"),
        pytest.param(im_create(None, 1, minReplicas=3, maxReplicas=2),
                     "spec.minReplicas (3) must not exceed spec.maxReplicas (2)", id="min-over-max"),
        pytest.param(im_create(None, 1, load={"concurrency": 0}), "spec.load.concurrency must be a positive integer",
                     id="load-concurrency-zero"),
        pytest.param(deployment_create("a lot"), "inference.eh-ops.io/memory", id="bad-deployment-memory"),
        # 80m is a valid Kubernetes quantity (0.08 bytes) that used to be budgeted as 1 byte
        pytest.param(deployment_create("80m"), "'80m' is not a memory quantity in whole bytes",
                     id="milli-deployment-memory"),
        pytest.param(im_create(" 8Gi ", 1), "remove the spaces", id="memory-with-spaces"),
        pytest.param(im_create(None, 1, devices=0), "spec.devices must be an integer >= 1, got 0", id="zero-devices"),
        pytest.param(im_create(None, 1, devices="2"), "spec.devices must be an integer >= 1, got '2'",
                     id="devices-string"),
        pytest.param(im_create(None, 1, devices=True), "spec.devices must be an integer >= 1, got True",
                     id="devices-bool"),
        pytest.param(im_create(None, 1, deviceSelector={"nvidia.com/gpu.product": "A100"}),
                     "spec.deviceSelector: unknown key 'nvidia.com/gpu.product' (use kind, product, profile)",
                     id="device-selector-label-key"),
        pytest.param(im_create(None, 1, deviceSelector={"kind": "tpu"}),
                     "spec.deviceSelector.kind must be one of gpu, mig, unified, got 'tpu'", id="device-kind"),
        pytest.param(im_create(None, 1, deviceSelector={"profile": 1}), "spec.deviceSelector must map strings",
                     id="device-selector-value-type"),
        pytest.param(im_create(None, 1, deviceSelector="1g.10gb"), "spec.deviceSelector must be an object",
                     id="device-selector-not-a-map"),
    ],
)
def test_malformed_review_with_uid_is_denied_with_400(review, fragment):
    response = Harness(roomy()).review(review)
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["reason"] == "BadRequest"
    assert fragment in response["status"]["message"]


def test_model_deployment_without_memory_annotation_is_invalid():
    review = deployment_create(None)
    obj = review["request"]["object"]
    obj["metadata"]["labels"][MODEL] = "gpu-wh-1"
    response = Harness(roomy()).review(review)
    assert response["status"]["code"] == 400
    assert "inference.eh-ops.io/memory" in response["status"]["message"]


def test_oversized_body_is_refused_with_413():
    h = Harness(roomy(), max_request_bytes=1000)
    resp = h.client.post("/validate", data=json.dumps(captured("admission-update-deployment.json")),
                         content_type="application/json")
    assert resp.status_code == 413
    assert "limit of 1000 bytes" in resp.get_json()["error"] or "limit is 1000 bytes" in resp.get_json()["error"]


def test_wrong_method_and_path_get_json_errors():
    h = Harness(roomy())
    assert h.client.get("/validate").status_code == 405
    assert h.client.get("/validate").get_json()["code"] == 405
    assert h.client.post("/nope").status_code == 404


# ----- availability: sync, busy ledger, probes, metrics -----
def test_unsynced_cache_denies_scale_ups_with_retry_but_passes_decreases():
    h = Harness(roomy(), require_synced=True)
    up = h.review(im_scale(1))
    down = h.review(im_scale(0, frm=2))
    assert up["allowed"] is False
    assert up["status"]["code"] == 429
    assert "not synced" in up["status"]["message"] and "retry" in up["status"]["message"]
    assert down["allowed"] is True
    assert h.client.get("/readyz").status_code == 503


@pytest.mark.parametrize(
    ("harness", "fragment"),
    [
        pytest.param(lambda: Harness(roomy(), require_synced=True), "has not synced its cluster view yet",
                     id="cache-not-synced"),
        # A model created a moment ago that this worker's cache has not seen yet (a race of a fresh
        # object and its first scale-up, common under load): kubectl and client-go retry on Retry-After.
        pytest.param(lambda: Harness(cluster(node())), "InferenceModel default/llama-2-7b is not known to the "
                     "budget webhook yet", id="model-not-cached-yet"),
    ],
)
def test_every_answer_that_says_retry_gives_retry_after(harness, fragment):
    up = harness().review(im_scale(1))
    assert (up["allowed"], up["status"]["code"]) == (False, 429)
    assert fragment in up["status"]["message"] and up["status"]["message"].endswith("; retry")
    assert up["status"]["details"] == {"retryAfterSeconds": 1}, "the apiserver turns this into Retry-After"


class _FailingLedger:
    mode = "test"

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def transact(self, decide, *, dry_run, reflected):
        raise self.exc

    def entries(self):
        return ()


@pytest.mark.parametrize(
    ("exc", "code", "fragment"),
    [
        pytest.param(LedgerBusy("lost", attempts=8), 429, "admission is busy", id="busy"),
        pytest.param(LedgerUnavailable("reading ConfigMap ibc-system/ibc-admission-ledger: 403 forbidden"), 503,
                     "cannot reach its admission ledger: reading ConfigMap", id="unavailable"),
    ],
)
def test_ledger_trouble_denies_never_allows(exc, code, fragment):
    app = create_app(WebhookSettings(require_synced=False), roomy(), _FailingLedger(exc))
    resp = app.test_client().post("/validate", data=json.dumps(im_scale(1)), content_type="application/json")
    assert resp.status_code == 200
    response = resp.get_json()["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == code
    assert fragment in response["status"]["message"]
    assert "retry" in response["status"]["message"] or code == 503


def test_probes_and_metrics():
    h = Harness(full())
    assert h.client.get("/livez").status_code == 200
    ready = h.client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["ledger"] == "in-process"
    h.review(im_scale(1))
    h.review(im_scale(0, frm=1))
    text = h.client.get("/metrics").get_data(as_text=True)
    assert 'ibc_webhook_reviews_total{reason="insufficient_memory",resource="inferencemodels/scale",' \
           'result="denied"} 1.0' in text
    assert 'ibc_webhook_reviews_total{reason="decrease",resource="inferencemodels/scale",result="allowed"} 1.0' in text
    assert "ibc_webhook_review_duration_seconds_bucket" in text


def test_debug_ledger_lists_reservations():
    h = Harness(roomy())
    h.review(im_scale(2))
    body = h.client.get("/debug/ledger").get_json()
    assert body["mode"] == "in-process"
    assert [(e["model"], e["replicas"], e["memoryBytes"]) for e in body["entries"]] == [
        ("default/llama-2-7b", 2, 16 * GI)
    ]


def test_a_scale_down_frees_admitted_memory_before_the_ledger_entry_expires():
    """model-c admitted for 4 replicas, seen at 4, then scaled to 0: model-b's second replica now fits.

    Without this, the entry (replicas = max(spec, ledger)) would hold 64Gi until its TTL and the webhook
    would refuse what the proxy, looking at the same cluster, admits.
    """
    cache = ClusterCache(None)  # type: ignore[arg-type]
    for obj in (node(), inference_model("model-b", "60Gi", 1), pod("model-b", "60Gi"),
                inference_model("model-c", "16Gi", 0)):
        cache.apply(obj["kind"], "ADDED", obj)
    h = Harness(cache)
    h.app.extensions["ibc_webhook"].clock = lambda: NOW + 1
    assert h.review(im_scale(4, 0, name="model-c"))["allowed"] is True
    assert h.ledger_replicas() == {"default/model-c": 4}
    before = h.review(im_scale(2, 1, name="model-b"))
    assert before["allowed"] is False, "model-c's 4 admitted replicas still hold 64Gi"
    cache.apply("InferenceModel", "MODIFIED", inference_model("model-c", "16Gi", 4))
    cache.apply("InferenceModel", "MODIFIED", inference_model("model-c", "16Gi", 0))
    after = h.review(im_scale(2, 1, name="model-b"))
    assert after["allowed"] is True, after.get("status")


def test_deeply_nested_json_is_a_400_not_a_500():
    h = Harness(ClusterCache(None))  # type: ignore[arg-type]
    resp = h.client.post("/validate", data=b"[" * 5000 + b"]" * 5000, content_type="application/json")
    assert resp.status_code == 400
    assert "nested too deeply" in resp.get_data(as_text=True)


# ----- answering within the apiserver's deadline -----
def _post(h: Harness, review: dict[str, Any], *, timeout: str | None = "5s", queued: float = 0.0) -> dict[str, Any]:
    url = "/validate" + (f"?timeout={timeout}" if timeout else "")
    resp = h.client.post(url, data=json.dumps(review), content_type="application/json",
                         environ_base={"ibc.queued_seconds": queued})
    assert resp.status_code == 200
    return resp.get_json()["response"]


def test_a_review_that_queued_past_its_deadline_is_told_to_retry_at_once():
    h = Harness(roomy())
    review = im_scale(1)
    started = time.perf_counter()
    response = _post(h, review, timeout="5s", queued=4.2)  # 5 s - 1 s margin: no time left to decide
    assert time.perf_counter() - started < 0.5
    assert response["uid"] == review["request"]["uid"] and response["allowed"] is False
    assert response["status"]["code"] == 429 and response["status"]["reason"] == "TooManyRequests"
    assert response["status"]["details"] == {"retryAfterSeconds": 1}, "the apiserver turns this into Retry-After"
    assert "admission is busy: this review waited 4.2s" in response["status"]["message"]
    assert "retry" in response["status"]["message"]
    assert h.ledger_replicas() == {}, "nothing was admitted"
    metrics = h.client.get("/metrics").get_data(as_text=True)
    assert 'ibc_webhook_reviews_total{reason="busy",resource="inferencemodels/scale",result="denied"} 1.0' in metrics
    assert "ibc_webhook_queue_seconds_count 1.0" in metrics


@pytest.mark.parametrize(
    ("timeout", "queued", "allowed"),
    [
        pytest.param("5s", 0.0, True, id="fresh"),
        pytest.param("5s", 3.5, True, id="queued-but-in-time"),
        pytest.param("10s", 8.5, True, id="longer-timeout"),
        pytest.param(None, 8.5, True, id="no-timeout-means-10s"),
        pytest.param("5s", 4.0, False, id="at-the-margin"),
        pytest.param("2s", 1.5, False, id="short-timeout"),
    ],
)
def test_the_deadline_is_the_apiservers_timeout_minus_the_queueing_and_a_margin(timeout, queued, allowed):
    response = _post(Harness(roomy()), im_scale(1), timeout=timeout, queued=queued)
    assert response["allowed"] is allowed, response


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("5s", 5.0, id="seconds"),
        pytest.param("30s", 30.0, id="max"),
        pytest.param("1m0s", 10.0, id="beyond-the-api-maximum"),
        pytest.param("soon", 10.0, id="garbage"),
        pytest.param("", 10.0, id="empty"),
        pytest.param(None, 10.0, id="absent"),
    ],
)
def test_apiserver_timeout(value, seconds):
    assert apiserver_timeout(value, 10.0) == seconds


def test_busy_and_unavailable_ledgers_ask_the_client_to_retry_after_a_second():
    for exc in (LedgerBusy("lost", attempts=8), LedgerUnavailable("down")):
        app = create_app(WebhookSettings(require_synced=False), roomy(), _FailingLedger(exc))
        resp = app.test_client().post("/validate", data=json.dumps(im_scale(1)), content_type="application/json")
        status = resp.get_json()["response"]["status"]
        assert status["details"] == {"retryAfterSeconds": 1}, status
