"""The Kubernetes scaler making room, without a cluster: which PATCHes and Events it sends, and when not.

The cache is fed by hand; the API is a stand-in that answers the webhook's denial for the requested
model (the captured body of the real apiserver), and either accepts a victim's conditional `/scale` to 0
or answers 409 as the apiserver does when its resourceVersion changed. The end-to-end proof (real
webhook, controller, two proxies) is tests/cluster/test_room_e2e.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from budget.objects import rfc3339
from kubeview import ClusterCache
from proxy.kube_scaler import KubeScaler
from proxy.scaler import ScaleDenied
from tests.unit.test_proxy_kube_scaler import captured_denials, inference_model, node, pod

pytestmark = pytest.mark.unit

DENIAL_STATUS, DENIAL_BODY = captured_denials()[0]


class _Resp:
    def __init__(self, body: dict[str, Any]) -> None:
        self.status, self.reason, self.data = 200, "OK", json.dumps(body).encode()
        self.response = self

    def release_conn(self) -> None:
        pass


class RoomApi:
    """Scale PATCHes of `model-b` are denied (the webhook) until model-a is at 0 in `admit_after`; model-a's
    conditional PATCH answers `victim_status`; Events are recorded."""

    def __init__(self, victim_status: int = 200) -> None:
        self.victim_status = victim_status
        self.scale_patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.admit = False

    def param_serialize(self, method: str, path: str, body: Any = None, **_: Any) -> tuple[str, str, Any]:
        return method, path, body

    def call_api(self, method: str, path: str, body: Any, **_: Any) -> _Resp:
        if path.endswith("/events"):
            self.events.append(body)
            return _Resp(body)
        name = path.split("/")[-2]
        if name == "model-a":
            if self.victim_status == 409:
                error = ApiException(status=409, reason="Conflict")
                error.body = json.dumps({"kind": "Status", "message": "the object has been modified", "code": 409})
                raise error
            self.scale_patches.append((name, body))
            self.admit = True  # the victim's memory is the webhook's to give now
            return _Resp(body)
        if not self.admit:
            error = ApiException(status=DENIAL_STATUS, reason="Forbidden")
            error.body = DENIAL_BODY
            raise error
        self.scale_patches.append((name, body))
        return _Resp(body)


@dataclass(frozen=True)
class Case:
    policy: dict[str, Any]
    idle_seconds: float
    victim_status: int
    evicted: bool


CASES = {
    "idle-long-enough": Case({"eviction": {"idleAfter": "60s"}}, 90, 200, True),
    "idle-too-short": Case({"eviction": {"idleAfter": "60s"}}, 30, 200, False),
    "no-policy": Case({}, 3600, 200, False),
    "pinned": Case({"eviction": {"idleAfter": "60s"}, "pinned": True}, 3600, 200, False),
    "higher-priority": Case({"eviction": {"idleAfter": "60s"}, "priority": 5}, 3600, 200, False),
    "changed-since-the-plan": Case({"eviction": {"idleAfter": "60s"}}, 90, 409, False),
}


def _scaler(case: Case) -> tuple[KubeScaler, RoomApi]:
    now = time.time()
    cache = ClusterCache(api=None)
    cache.apply("Node", "ADDED", node())
    a = inference_model("model-a", "80Gi", 1, **case.policy)
    a["status"] = {"lastRequestTime": rfc3339(now - case.idle_seconds)}
    cache.apply("InferenceModel", "ADDED", a)
    cache.apply("InferenceModel", "ADDED", inference_model("model-b", "60Gi", 0))
    cache.apply("Pod", "ADDED", pod("model-a-0", "model-a"))
    api = RoomApi(case.victim_status)
    return KubeScaler(api, cache=cache, room_timeout_seconds=1.0), api


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_scale_up_evicts_by_policy_with_a_conditional_patch_and_an_event(case: Case) -> None:
    scaler, api = _scaler(case)
    assert scaler.can_make_room("ml/model-b", 1) is (case.evicted or case.victim_status == 409)
    if not case.evicted:
        with pytest.raises(ScaleDenied) as caught:
            scaler.scale_up("ml/model-b", 1)
        assert caught.value.decision.reason == "insufficient_memory"
        assert api.scale_patches == [] and api.events == []
        assert scaler.evictions.snapshot() == {} and scaler.note("ml/model-b") is None
        return
    scaler.scale_up("ml/model-b", 1)
    (victim, patch), (started, up) = api.scale_patches
    # The stop is conditional on what the plan saw; then the requested model, through the webhook.
    assert (victim, patch) == ("model-a", {"spec": {"replicas": 0}, "metadata": {"resourceVersion": "1"}})
    assert (started, up) == ("model-b", {"spec": {"replicas": 1}})
    (event,) = api.events
    assert event["regarding"]["name"] == "model-a" and event["regarding"]["kind"] == "InferenceModel"
    assert (event["reason"], event["type"]) == ("Evicted", "Normal")
    assert event["note"] == "stopped after 90s idle to make room for model-b"
    assert scaler.evictions.snapshot() == {("model-a", "model-b"): 1}
    assert scaler.note("ml/model-b") == "stopping model-a (80Gi, idle 90s) to make room for model-b"


def test_a_model_this_proxy_serves_is_never_evicted() -> None:
    scaler, api = _scaler(CASES["idle-long-enough"])
    (url,) = scaler.backends("ml/model-a")
    scaler.set_busy_source(lambda: ([url], []))  # a stream to model-a is in flight
    assert not scaler.can_make_room("ml/model-b", 1)
    with pytest.raises(ScaleDenied):
        scaler.scale_up("ml/model-b", 1)
    assert api.scale_patches == [] and api.events == []


def test_this_proxys_unwritten_requests_count_as_activity() -> None:
    scaler, _ = _scaler(CASES["idle-long-enough"])
    scaler.touch("ml/model-a", time.time() - 5)  # not written to status yet
    assert not scaler.can_make_room("ml/model-b", 1)
