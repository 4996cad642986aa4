"""One reconcile against a fake API server: what gets written, and that nothing is written twice."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from budget.objects import rfc3339
from controller.events import EventRecorder
from controller.queue import WorkQueue
from controller.reconciler import Reconciler
from controller.settings import ReconcileSettings
from kubeview import ClusterCache
from kubeview.api import ApiError as KubeError

pytestmark = pytest.mark.unit

NOW = 1_768_473_000.0
NS = "ml"
MODEL_PATH = "/apis/inference.eh-ops.io/v1alpha1/namespaces/ml/inferencemodels/model-a"
DEP_PATH = "/apis/apps/v1/namespaces/ml/deployments/model-a"
SVC_PATH = "/api/v1/namespaces/ml/services/model-a"


class FakeApi:
    """Just enough of the API server: objects by path, resourceVersions, generations, webhooks."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        self.rv = itertools.count(100)
        self.deny_deployment_writes = ""
        self.fail_deployment_writes: KubeError | None = None
        self.deleted_model = False
        self.deny_scale = ""

    def _bump(self, obj: dict[str, Any], spec_changed: bool) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self.rv))
        if spec_changed:
            meta["generation"] = int(meta.get("generation") or 0) + 1
        return copy.deepcopy(obj)

    def get(self, path: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(path))

    def apply(self, path: str, config: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("apply", path))
        if self.deny_deployment_writes and "/deployments/" in path:
            raise KubeError(
                403,
                "Forbidden",
                f'admission webhook "inference-budget.eh-ops.io" denied the request: {self.deny_deployment_writes}',
            )
        if self.fail_deployment_writes and "/deployments/" in path:
            raise self.fail_deployment_writes
        live = self.objects.get(path) or {}
        merged = _merge(copy.deepcopy(live), copy.deepcopy(config))
        self.objects[path] = merged
        return self._bump(merged, merged.get("spec") != live.get("spec"))

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("patch", path))
        if "/events/" in path:
            return patch  # an Event's series update
        if path.endswith("/scale"):
            if self.deny_scale:
                raise KubeError(
                    403,
                    "Forbidden",
                    f'admission webhook "inference-budget.eh-ops.io" denied the request: {self.deny_scale}',
                )
            obj = self.objects[path[: -len("/scale")]]
            want_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if want_rv and want_rv != obj["metadata"]["resourceVersion"]:
                raise KubeError(409, "Conflict", "the object has been modified")
            obj["spec"]["replicas"] = patch["spec"]["replicas"]
            return self._bump(obj, True)
        if self.deleted_model:
            raise KubeError(404, "NotFound", 'inferencemodels.inference.eh-ops.io "model-a" not found')
        if path.endswith("/status"):
            obj = self.objects[path[: -len("/status")]]
            obj["status"] = _merge(obj.get("status") or {}, copy.deepcopy(patch["status"]))
            return self._bump(obj, False)
        raise AssertionError(path)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("create", path))
        return body

    def delete(self, path: str) -> None:
        self.writes.append(("delete", path))
        self.objects.pop(path, None)

    def non_event_writes(self) -> list[tuple[str, str]]:
        return [w for w in self.writes if "/events" not in w[1]]

    def events(self) -> list[tuple[str, str]]:
        return [w for w in self.writes if "/events" in w[1]]


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) as the API server applies it: null deletes a field."""
    for k, v in patch.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _merge(base[k], v)
        else:
            base[k] = v
    return base


class Recorder(EventRecorder):
    def __init__(self, api: FakeApi) -> None:
        super().__init__(api, "test", clock=lambda: NOW)  # type: ignore[arg-type]
        self.seen: list[tuple[str, str, str]] = []

    def emit(self, regarding: Any, event_type: Any, reason: str, action: str, note: str) -> bool:
        self.seen.append((event_type, reason, note))
        return super().emit(regarding, event_type, reason, action, note)


class World:
    def __init__(self, **settings: Any) -> None:
        self.api = FakeApi()
        self.cache = ClusterCache(None, kinds=("InferenceModel", "Deployment", "Pod"))  # type: ignore[arg-type]
        self.queue = WorkQueue(clock=lambda: self.now)
        self.now = NOW
        self.recorder = Recorder(self.api)
        self.settings = ReconcileSettings(**settings)
        self.reconciler = self.new_reconciler()

    def new_reconciler(self) -> Reconciler:
        return Reconciler(
            self.api,  # type: ignore[arg-type]
            self.cache,
            self.recorder,
            self.queue,
            self.settings,
            clock=lambda: self.now,
        )

    def add_model(self, **spec: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "memory": "80Gi",
            "cooldownPeriod": "10m",
            "template": {"spec": {"containers": [{"name": "server", "image": "vllm"}]}},
        }
        base.update(spec)
        obj = {
            "apiVersion": "inference.eh-ops.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": "model-a", "namespace": NS, "uid": "uid-a", "generation": 1, "resourceVersion": "1"},
            "spec": {k: v for k, v in base.items() if v is not None},
        }
        self.api.objects[MODEL_PATH] = copy.deepcopy(obj)
        self.cache.apply("InferenceModel", "ADDED", obj)
        return obj

    def model(self) -> dict[str, Any]:
        return self.cache.get("InferenceModel", NS, "model-a")  # type: ignore[return-value]

    def status(self) -> dict[str, Any]:
        return self.model().get("status") or {}

    def condition(self, kind: str) -> dict[str, Any]:
        return next(c for c in self.status()["conditions"] if c["type"] == kind)

    def deployment_becomes_ready(self, replicas: int = 1, started: float = NOW) -> None:
        dep = copy.deepcopy(self.api.objects[DEP_PATH])
        dep["status"] = {"replicas": replicas, "readyReplicas": replicas}
        self.api.objects[DEP_PATH] = dep
        self.cache.apply("Deployment", "MODIFIED", {**dep, "metadata": {**dep["metadata"], "resourceVersion": "9999"}})
        for i in range(replicas):
            self.cache.apply("Pod", "ADDED", running_pod(f"model-a-{i}", started))

    def reconcile(self) -> None:
        self.reconciler.reconcile(f"{NS}/model-a")


def running_pod(name: str, started: float) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "labels": {"inference.eh-ops.io/model": "model-a"},
            "annotations": {"inference.eh-ops.io/memory": "80Gi"},
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Running",
            "startTime": rfc3339(started),
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def test_new_model_gets_deployment_service_status_and_a_scale_up_event() -> None:
    w = World(scheduler_name="budget-sched")
    w.add_model()
    w.reconcile()
    assert [p for _, p in w.api.non_event_writes()] == [DEP_PATH, SVC_PATH, MODEL_PATH + "/status"]
    dep = w.api.objects[DEP_PATH]
    assert dep["spec"]["template"]["spec"]["schedulerName"] == "budget-sched"
    assert w.status()["ready"] is False
    assert w.condition("Reconciled")["reason"] == "DeploymentApplied"
    assert ("Normal", "ScaledUp", "Deployment model-a: 0 -> 1 replicas") in w.recorder.seen


def test_converged_model_and_restarted_controller_write_nothing() -> None:
    w = World()
    w.add_model()
    w.reconcile()
    w.deployment_becomes_ready()
    w.reconcile()
    assert w.status()["ready"] is True and w.status()["readyReplicas"] == 1
    assert w.condition("Ready")["reason"] == "Available"
    writes = len(w.api.writes)
    w.reconcile()
    w.reconciler = w.new_reconciler()  # a restarted controller: no memory of what it applied
    w.now += 30
    w.reconcile()
    # the Service is re-checked once after a restart (a GET); nothing is written
    assert w.api.writes[writes:] == []


def test_bad_template_gets_a_condition_and_an_event_and_no_deployment() -> None:
    w = World()
    w.add_model(template={"spec": {"containers": []}})
    w.reconcile()  # must not raise
    assert DEP_PATH not in w.api.objects
    reconciled = w.condition("Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "InvalidTemplate")
    assert "spec.template.spec.containers must list at least one container" in reconciled["message"]
    assert w.condition("Ready")["reason"] == "InvalidTemplate"
    assert ("Warning", "InvalidTemplate", reconciled["message"]) in w.recorder.seen
    events = len(w.api.events())
    w.reconcile()  # a resync finds the same problem: no new Event, no status write
    assert len(w.api.events()) == events
    assert w.api.non_event_writes() == [("patch", MODEL_PATH + "/status")]


def test_idle_model_scales_to_zero_through_the_scale_subresource_with_a_precondition() -> None:
    w = World()
    w.add_model(cooldownPeriod="3s")
    w.reconcile()
    w.deployment_becomes_ready(started=NOW)
    w.now = NOW + 1
    w.reconcile()
    assert w.queue.due_in("ml/model-a") == pytest.approx(2.05)  # wakes exactly at the cooldown's end
    w.now = NOW + 3.1
    w.api.objects[MODEL_PATH]["metadata"]["resourceVersion"] = w.model()["metadata"]["resourceVersion"]
    w.reconcile()
    assert ("patch", MODEL_PATH + "/scale") in w.api.writes
    assert w.api.objects[MODEL_PATH]["spec"]["replicas"] == 0
    assert any(r == "IdleScaleDown" and "cooldownPeriod 3s" in n for _, r, n in w.recorder.seen)


def test_scale_to_zero_loses_to_a_concurrent_request() -> None:
    w = World()
    w.add_model(cooldownPeriod="3s", status=None)
    w.reconcile()
    w.deployment_becomes_ready(started=NOW)
    w.now = NOW + 10
    w.api.objects[MODEL_PATH]["metadata"]["resourceVersion"] = "proxy-touched-it"
    w.reconcile()
    assert w.api.objects[MODEL_PATH]["spec"].get("replicas", 1) == 1
    assert w.queue.due_in("ml/model-a") is not None  # looks again with the fresh object


def test_someone_elses_deployment_is_not_taken_over() -> None:
    w = World()
    w.add_model()
    foreign = {"metadata": {"name": "model-a", "namespace": NS, "resourceVersion": "5"}, "spec": {"replicas": 4}}
    w.api.objects[DEP_PATH] = copy.deepcopy(foreign)
    w.cache.apply("Deployment", "ADDED", foreign)
    w.reconcile()
    assert ("apply", DEP_PATH) not in w.api.writes
    assert w.condition("Reconciled")["reason"] == "DeploymentConflict"
    assert "spec.deploymentRef" in w.condition("Reconciled")["message"]


def test_pending_pod_reason_reaches_condition_and_event() -> None:
    w = World()
    w.add_model()
    w.reconcile()
    message = "0/2 nodes are available: 2 insufficient inference memory budget."
    w.cache.apply(
        "Pod",
        "ADDED",
        {
            "metadata": {"name": "model-a-x", "namespace": NS, "labels": {"inference.eh-ops.io/model": "model-a"}},
            "spec": {},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
                ],
            },
        },
    )
    w.reconcile()
    scheduled = w.condition("Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    assert scheduled["message"] == f"pod model-a-x: {message}"
    assert ("Warning", "PodUnschedulable", f"Unschedulable: {message}") in w.recorder.seen


def test_webhook_denial_of_a_deployment_write_is_reported() -> None:
    w = World()
    w.add_model()
    w.api.deny_deployment_writes = "model-a needs 80Gi in the whole cluster; 48Gi available"
    w.reconcile()
    reconciled = w.condition("Reconciled")
    assert reconciled["reason"] == "ScaleDenied"
    assert "48Gi available" in reconciled["message"]
    assert any(r == "ScaleDenied" for _, r, _ in w.recorder.seen)
    assert w.queue.due_in("ml/model-a") is not None  # retried with backoff


def test_external_model_has_no_deployment_and_is_ready() -> None:
    w = World()
    w.add_model(template=None, backendUrl="http://vllm.ml:8000")
    w.reconcile()
    assert w.api.non_event_writes() == [("patch", MODEL_PATH + "/status")]
    assert w.status()["ready"] is True
    assert w.condition("Ready")["reason"] == "External"


def test_removing_the_template_deletes_the_owned_deployment() -> None:
    w = World()
    w.add_model()
    w.reconcile()
    w.cache.apply("Deployment", "ADDED", copy.deepcopy(w.api.objects[DEP_PATH]))
    model = copy.deepcopy(w.model())
    del model["spec"]["template"]
    model["spec"]["backendUrl"] = "http://elsewhere:8000"
    model["metadata"]["resourceVersion"] = "5000"
    w.cache.apply("InferenceModel", "MODIFIED", model)
    w.reconcile()
    assert ("delete", DEP_PATH) in w.api.writes


def test_observed_peak_reaches_status_and_spec_memory_is_untouched() -> None:
    w = World()
    w.add_model()
    w.reconcile()
    w.reconciler.observations.record("ml/model-a", 75 * 2**30, NOW)
    w.reconcile()
    status = w.status()
    assert status["declaredMemory"] == "80Gi"
    assert status["observedPeakMemory"] == "75Gi"
    assert status["utilizationPercent"] == 93
    assert status["recommendation"] == "Consider reducing memory to 78Gi for better packing"
    assert status["lastObservation"] == "2026-01-15T10:30:00Z"
    assert w.api.objects[MODEL_PATH]["spec"]["memory"] == "80Gi"
    records = {m.name: m for m in w.reconciler.memory_records()}
    assert records["model-a"].observed_peak_bytes == 75 * 2**30
    assert records["model-a"].recommended_bytes == 78 * 2**30


@pytest.mark.parametrize(
    ("error", "reason", "raises"),
    [
        pytest.param(
            KubeError(422, "Invalid", 'Deployment.apps "model-a" is invalid: spec.template.spec.containers[0].name'),
            "InvalidTemplate",
            False,
            id="422-invalid",
        ),
        pytest.param(
            KubeError(
                500,
                "InternalError",
                "failed to convert new object (ml/model-a; apps/v1, Kind=Deployment) to proper version: unable to "
                "convert unstructured object to apps/v1, Kind=Deployment: quantities must match the regular expression",
            ),
            "InvalidTemplate",
            False,
            id="500-does-not-decode",
        ),
        pytest.param(KubeError(503, "ServiceUnavailable", "etcd leader changed"), None, True, id="503-transient"),
        pytest.param(KubeError(0, "Unreachable", "connection refused"), None, True, id="unreachable"),
    ],
)
def test_api_refusals_are_conditions_and_outages_are_retried(
    error: KubeError, reason: str | None, raises: bool
) -> None:
    w = World()
    w.add_model()
    w.api.fail_deployment_writes = error
    if raises:
        with pytest.raises(KubeError):
            w.reconcile()
        assert "conditions" not in w.status()
    else:
        w.reconcile()
        assert w.condition("Reconciled")["reason"] == reason
        assert error.message in w.condition("Reconciled")["message"]


def test_a_model_deleted_mid_reconcile_is_not_an_error() -> None:
    w = World()
    w.add_model()
    w.api.deleted_model = True
    w.reconcile()  # the status write answers 404: nothing to retry


def test_min_replicas_are_reached_one_step_at_a_time_through_the_scale_subresource() -> None:
    w = World()
    w.add_model(replicas=0, minReplicas=2, maxReplicas=3)
    for _ in range(3):
        w.reconcile()
        w.cache.apply("InferenceModel", "MODIFIED", copy.deepcopy(w.api.objects[MODEL_PATH]))
    assert w.api.objects[MODEL_PATH]["spec"]["replicas"] == 2
    assert [n for _, r, n in w.recorder.seen if r == "WarmScaleUp"] == [
        "minReplicas 2: replicas 0 -> 1",
        "minReplicas 2: replicas 1 -> 2",
    ]
    assert [w for w in w.api.non_event_writes() if w[1].endswith("/scale")] == [("patch", MODEL_PATH + "/scale")] * 2


DENIAL = "model-a needs 80Gi in the whole cluster; 48Gi available; blocked by model-b (50Gi, idle 40s)"


def test_a_warm_step_the_webhook_refuses_is_one_event_with_its_reason_and_is_asked_again() -> None:
    w = World()
    w.api.deny_scale = DENIAL
    w.add_model(replicas=1, minReplicas=2, maxReplicas=2)
    w.reconcile()
    w.now += 10
    w.reconcile()
    blocked = [(t, n) for t, r, n in w.recorder.seen if r == "WarmScaleBlocked"]
    assert blocked == [("Warning", f"model-a wants 2, budget allows 1: {DENIAL}")]  # once, not per retry
    assert w.api.objects[MODEL_PATH]["spec"]["replicas"] == 1
    assert [x for x in w.api.writes if x[1].endswith("/scale")] == [("patch", MODEL_PATH + "/scale")] * 2


def test_a_warm_model_at_its_minimum_is_left_alone() -> None:
    w = World()
    w.add_model(replicas=2, minReplicas=2, maxReplicas=2, cooldownPeriod="1s")
    w.reconcile()
    w.deployment_becomes_ready(replicas=2, started=NOW - 1000)
    w.now += 3600
    w.reconcile()
    assert ("patch", MODEL_PATH + "/scale") not in w.api.writes  # neither warmed nor idled to zero
