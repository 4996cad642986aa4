"""The Kubernetes scaler without a cluster: cache events fed by hand, API calls to stand-ins.

What the proxy (and so a client) notices: which pods count as backends, that a scale-up is one PATCH of
`/scale` (or none when already asked for), that a webhook denial becomes the explained 429 with the
webhook's words (from the captured Python-client exception), and that activity writes are throttled.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from budget.objects import rfc3339
from kubeview import ApiError, ClusterCache
from proxy.kube_scaler import KubeScaler, denial_from, denied_decision
from proxy.scaler import ScaleDenied, ScalerUnavailable

pytestmark = pytest.mark.unit

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "captured" / "client-deny-python.txt"


def captured_denials() -> list[tuple[int, str]]:
    """(status, raw body) of each webhook denial the real apiserver returned to the Python client."""
    text = CAPTURED.read_text()
    statuses = [int(s) for s in re.findall(r"^e\.status = (\d+)$", text, re.M)]
    bodies = re.findall(r"^e\.body \(raw\) = (.*)$", text, re.M)
    assert len(statuses) == len(bodies) >= 2
    return list(zip(statuses, bodies, strict=True))


def node(name: str = "node-1", capacity: str = "128Gi") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "resourceVersion": "1",
            "annotations": {"inference.eh-ops.io/memory-capacity": capacity},
        }
    }


def inference_model(name: str, memory: str, replicas: int = 0, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "resourceVersion": "1"},
        "spec": {"modelName": name, "memory": memory, "replicas": replicas, "cooldownPeriod": "10m", **spec},
    }


def pod(name: str, model: str, ip: str = "10.1.0.5", ready: bool = True, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": name,
            "resourceVersion": "1",
            "labels": {"inference.eh-ops.io/model": model},
            "annotations": {"inference.eh-ops.io/memory": "80Gi"},
        },
        "spec": {"nodeName": "node-1", "containers": [{"name": "m", "ports": [{"containerPort": 9000}]}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            **status,
        },
    }


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def release_conn(self) -> None:
        pass


class _Resp:
    def __init__(self, body: dict[str, Any]) -> None:
        self.status, self.reason, self.response = 200, "OK", _Raw(json.dumps(body).encode())


class FakeCustomApi:
    """An ApiClient stand-in: records scale and status patches; raises `error` on a scale patch when set."""

    def param_serialize(self, method: str, path: str, body: Any = None, **_: Any) -> tuple[str, str, Any]:
        return method, path, body

    def call_api(self, method: str, path: str, body: Any, **_: Any) -> _Resp:
        _, _, group, version, _, namespace, plural, name, sub = path.split("/")
        patch = getattr(self, f"patch_namespaced_custom_object_{sub}")
        return _Resp(patch(group, version, namespace, plural, name, body))

    def __init__(self) -> None:
        self.scale_patches: list[tuple[str, str, dict[str, Any]]] = []
        self.status_patches: list[tuple[str, dict[str, Any]]] = []
        self.error: Exception | None = None
        self.status_error: Exception | None = None

    def patch_namespaced_custom_object_scale(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: dict[str, Any], **_: Any
    ) -> dict[str, Any]:
        assert (group, version, plural) == ("inference.eh-ops.io", "v1alpha1", "inferencemodels")
        if self.error is not None:
            raise self.error
        self.scale_patches.append((namespace, name, body))
        return {"spec": body["spec"]}

    def patch_namespaced_custom_object_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: dict[str, Any], **_: Any
    ) -> dict[str, Any]:
        if self.status_error is not None:
            raise self.status_error
        self.status_patches.append((f"{namespace}/{name}", body))
        return {}


@pytest.fixture
def cache() -> ClusterCache:
    c = ClusterCache(api=None)  # never started: events are applied by hand
    c.apply("Node", "ADDED", node())
    c.apply("InferenceModel", "ADDED", inference_model("model-a", "80Gi", 1, port=8001))
    c.apply("InferenceModel", "ADDED", inference_model("model-b", "60Gi", 0))
    c.apply("InferenceModel", "ADDED", inference_model("model-c", "40Gi", 0))
    c.apply("Pod", "ADDED", pod("model-a-0", "model-a"))
    return c


@pytest.fixture
def api() -> FakeCustomApi:
    return FakeCustomApi()


@pytest.fixture
def scaler(cache: ClusterCache, api: FakeCustomApi) -> KubeScaler:
    return KubeScaler(api, cache=cache, touch_interval_seconds=0.2)


def test_ready_pods_are_backends_at_the_model_port(scaler: KubeScaler, cache: ClusterCache) -> None:
    assert scaler.backends("ml/model-a") == ["http://10.1.0.5:8001"]
    cache.apply("Pod", "ADDED", pod("model-a-1", "model-a", ip="10.1.0.6"))
    assert scaler.backends("ml/model-a") == ["http://10.1.0.5:8001", "http://10.1.0.6:8001"]
    assert scaler.state("ml/model-a") == "ready"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"ready": False}, [], id="not-ready"),
        pytest.param({"ip": ""}, [], id="no-ip-yet"),
        pytest.param({"phase": "Pending"}, [], id="pending"),
        pytest.param({"ip": "fd00::5"}, ["http://[fd00::5]:8001"], id="ipv6"),
    ],
)
def test_only_running_ready_pods_with_an_ip_count(
    scaler: KubeScaler, cache: ClusterCache, change: dict[str, Any], expected: list[str]
) -> None:
    obj = pod("model-a-0", "model-a", ip=change.get("ip", "10.1.0.5"), ready=change.get("ready", True))
    if "phase" in change:
        obj["status"]["phase"] = change["phase"]
    obj["metadata"]["resourceVersion"] = "2"
    cache.apply("Pod", "MODIFIED", obj)
    assert scaler.backends("ml/model-a") == expected


def test_terminating_and_deleted_pods_stop_receiving_traffic(scaler: KubeScaler, cache: ClusterCache) -> None:
    obj = pod("model-a-0", "model-a")
    obj["metadata"].update(resourceVersion="2", deletionTimestamp="2026-01-01T00:00:00Z")
    cache.apply("Pod", "MODIFIED", obj)
    assert scaler.backends("ml/model-a") == []
    cache.apply("Pod", "DELETED", obj)
    assert scaler.backends("ml/model-a") == []
    assert scaler.state("ml/model-a") == "starting"  # desired 1, nothing ready


def test_backend_url_is_used_once_a_replica_is_ready(scaler: KubeScaler, cache: ClusterCache) -> None:
    im = inference_model("model-c", "40Gi", 1, backendUrl="http://vllm-c.ml.svc:8000/")
    im["metadata"]["resourceVersion"] = "2"
    cache.apply("InferenceModel", "MODIFIED", im)
    assert scaler.backends("ml/model-c") == []
    cache.apply("Pod", "ADDED", pod("model-c-0", "model-c", ip="10.1.0.9"))
    assert scaler.backends("ml/model-c") == ["http://vllm-c.ml.svc:8000"]


def test_pod_of_a_deployment_only_model_uses_its_container_port(api: FakeCustomApi) -> None:
    c = ClusterCache(api=None)
    c.apply("Pod", "ADDED", pod("solo-0", "solo", ip="10.2.0.1"))
    scaler = KubeScaler(api, cache=c)
    assert scaler.backends("ml/solo") == ["http://10.2.0.1:9000"]


def test_crashlooping_replica_shows_failed(scaler: KubeScaler, cache: ClusterCache) -> None:
    bad = pod(
        "model-c-0",
        "model-c",
        ready=False,
        containerStatuses=[{"name": "m", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
    )
    cache.apply("Pod", "ADDED", bad)
    assert scaler.state("ml/model-c") == "failed"
    assert scaler.state("ml/model-b") == "stopped"


def test_wait_backends_wakes_on_the_event(scaler: KubeScaler, cache: ClusterCache) -> None:
    threading.Timer(0.1, cache.apply, ("Pod", "ADDED", pod("model-c-0", "model-c", ip="10.1.0.7"))).start()
    started = time.monotonic()
    assert scaler.wait_backends("ml/model-c", 5) == ["http://10.1.0.7:8000"]
    assert time.monotonic() - started < 2
    assert scaler.wait_backends("ml/model-b", 0.05) == []


def test_scale_up_is_one_merge_patch_of_the_scale_subresource(scaler: KubeScaler, api: FakeCustomApi) -> None:
    scaler.scale_up("ml/model-c", 1)
    assert api.scale_patches == [("ml", "model-c", {"spec": {"replicas": 1}})]


def test_scale_up_already_asked_for_makes_no_call(scaler: KubeScaler, api: FakeCustomApi) -> None:
    scaler.scale_up("ml/model-a", 1)
    assert api.scale_patches == []


@pytest.mark.parametrize(("status", "raw"), captured_denials(), ids=lambda v: str(v)[:12])
def test_webhook_denial_becomes_scale_denied_with_the_webhooks_words(
    scaler: KubeScaler, api: FakeCustomApi, status: int, raw: str
) -> None:
    api.error = ApiException(status=status, reason="Forbidden")
    api.error.body = raw
    with pytest.raises(ScaleDenied) as caught:
        scaler.scale_up("ml/model-b", 1)
    decision = caught.value.decision
    assert not decision.allowed
    assert decision.reason == "insufficient_memory"
    assert decision.message == "test message"
    assert decision.model == "model-b"
    assert decision.memory_bytes == 60 * 2**30
    # Recomputed locally: model-a holds 80Gi of the 128Gi node.
    assert decision.available_bytes == 48 * 2**30
    assert [b.model for b in decision.blocking] == ["model-a"]
    assert decision.retry_after_seconds > 0


def test_a_busy_webhook_is_a_429_with_the_apiservers_retry_after(scaler: KubeScaler, api: FakeCustomApi) -> None:
    api.error = ApiException(status=429, reason="Too Many Requests")
    api.error.body = json.dumps({"kind": "Status", "code": 429, "message": (
        'admission webhook "inferencemodels.budget.inference.eh-ops.io" denied the request: admission is busy: '
        "this review waited 4.2s for the budget webhook (the API server waits 5s); retry")})
    api.error.headers = {"Retry-After": "1"}
    with pytest.raises(ScaleDenied) as caught:
        scaler.scale_up("ml/model-c", 1)
    decision = caught.value.decision
    assert not decision.allowed and decision.retry_after_seconds == 1
    assert decision.message.startswith("admission is busy")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(
            403,
            '{"kind":"Status","message":"inferencemodels.inference.eh-ops.io \\"m\\" is forbidden: '
            'User \\"x\\" cannot patch resource"}',
            id="rbac-forbidden",
        ),
        pytest.param(500, '{"message":"etcdserver: request timed out"}', id="server-error"),
        pytest.param(404, '{"message":"not found"}', id="gone"),
    ],
)
def test_other_api_errors_are_scaler_unavailable(
    scaler: KubeScaler, api: FakeCustomApi, status: int, body: str
) -> None:
    api.error = ApiException(status=status, reason="x")
    api.error.body = body
    with pytest.raises(ScalerUnavailable):
        scaler.scale_up("ml/model-c", 1)


def test_unreachable_apiserver_is_scaler_unavailable(scaler: KubeScaler, api: FakeCustomApi) -> None:
    api.error = ConnectionRefusedError("connection refused")
    with pytest.raises(ScalerUnavailable, match="connection refused"):
        scaler.scale_up("ml/model-c", 1)


@pytest.mark.parametrize(
    ("message", "reason", "text", "retry"),
    [
        pytest.param(
            "insufficient_memory: model-b needs 60Gi; retry after 480s",
            "insufficient_memory",
            "model-b needs 60Gi",
            480,
            id="webhook-format",
        ),
        pytest.param("no room", "insufficient_memory", "no room", 30, id="plain-text-keeps-local-reason"),
    ],
)
def test_denied_decision_parses_the_webhook_message(
    scaler: KubeScaler, message: str, reason: str, text: str, retry: int
) -> None:
    from budget import decide_scale

    local = decide_scale(scaler.view(), "ml/model-b", 1, time.time(), default_retry_after_seconds=30)
    local = local.__class__(**{**local.__dict__, "retry_after_seconds": 30})
    decision = denied_decision(local, message, 30)
    assert (decision.allowed, decision.reason, decision.message, decision.retry_after_seconds) == (
        False,
        reason,
        text,
        retry,
    )


def test_denial_parsing_ignores_non_webhook_bodies() -> None:
    exc = ApiError(403, "Forbidden", "not json at all")
    assert denial_from(exc) is None


def test_touch_writes_last_request_time_at_most_once_per_interval(scaler: KubeScaler, api: FakeCustomApi) -> None:
    now = time.time()
    for i in range(50):
        scaler.touch("ml/model-a", now + i * 0.001)
    assert scaler.flush() == 1
    assert api.status_patches == [("ml/model-a", {"status": {"lastRequestTime": rfc3339(now + 0.049)}})]
    scaler.touch("ml/model-a", now + 1)
    assert scaler.flush() == 0, "within the interval: no second write"
    time.sleep(0.25)
    assert scaler.flush() == 1
    assert scaler.flush() == 0, "nothing new since the last write"


def test_forced_flush_writes_activity_inside_the_interval(scaler: KubeScaler, api: FakeCustomApi) -> None:
    scaler.touch("ml/model-a", 1000.0)
    assert scaler.flush() == 1
    scaler.touch("ml/model-a", 1001.0)
    assert scaler.flush() == 0
    assert scaler.flush(force=True) == 1, "on shutdown the last request time is not lost"
    assert api.status_patches[-1] == ("ml/model-a", {"status": {"lastRequestTime": rfc3339(1001.0)}})


def test_touch_of_a_deleted_model_is_dropped(scaler: KubeScaler, api: FakeCustomApi) -> None:
    api.status_error = ApiException(status=404, reason="Not Found")
    scaler.touch("ml/model-b", time.time())
    assert scaler.flush() == 0
    api.status_error = None
    assert scaler.flush() == 0


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1767225600.9) == "2026-01-01T00:00:00Z"


def test_a_webhook_denial_carries_the_webhooks_available_figure_not_a_stale_local_one():
    """The proxy thought model-b fits (another admission was in flight); the body must not contradict the message."""
    from budget import Decision
    from proxy.kube_scaler import denied_decision

    local = Decision(True, "fits", "fits", "model-b", "default/model-b", 60 * 2**30, 0, 1, 128 * 2**30, "all")
    d = denied_decision(
        local, "insufficient_memory: model-b needs 60Gi in the whole cluster; 32Gi available", 30
    )
    assert (d.allowed, d.reason, d.available_bytes) == (False, "insufficient_memory", 32 * 2**30)


@pytest.mark.parametrize(
    ("spec", "status", "details"),
    [
        ({}, {}, {"minReplicas": 0, "maxReplicas": 1}),
        (
            {"minReplicas": 1, "maxReplicas": 3},
            {"replicasWanted": 3, "replicasAllowed": 2, "loadMessage": "chat wants 3, budget allows 2: side"},
            {
                "minReplicas": 1,
                "maxReplicas": 3,
                "replicasWanted": 3,
                "replicasAllowed": 2,
                "loadMessage": "chat wants 3, budget allows 2: side",
            },
        ),
    ],
    ids=["not-load-scaled", "refused-step-from-the-controllers-status"],
)
def test_v1_models_details_are_the_load_layers_fields(
    api: FakeCustomApi, spec: dict[str, Any], status: dict[str, Any], details: dict[str, Any]
) -> None:
    c = ClusterCache(api=None)
    c.apply("InferenceModel", "ADDED", {**inference_model("chat", "30Gi", 2, **spec), "status": status})
    scaler = KubeScaler(api, cache=c)
    assert scaler.details("ml/chat") == details
    assert scaler.details("ml/absent") == {}
