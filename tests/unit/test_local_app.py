"""The app `ibc local` serves: the proxy's routes with the local scaler, plus per-model memory (JSON, gauges)."""

import json

import pytest

from local.config import parse_config
from local.scaler import LocalScaler, create_local_app
from proxy.settings import ProxySettings, digest_key
from tests.unit.test_local_scaler import SEED, Clock, FakeRuntime

pytestmark = pytest.mark.unit

GI = 2**30
CHAT = {"model": "model-b", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def runtime():
    return FakeRuntime(Clock())


def _app(runtime, **settings):
    config = parse_config(SEED)
    scaler = LocalScaler(config, runtime=runtime, clock=runtime.clock, port_picker=lambda: 7000)
    app, scaler = create_local_app(config, ProxySettings(**settings), scaler=scaler)
    return app.test_client(), scaler


def test_the_proxy_answers_the_explained_429_from_the_local_budget(runtime):
    client, scaler = _app(runtime)
    scaler.scale_up("model-a", 1)
    runtime.ready(runtime.spawned[-1])
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 429
    body = response.get_json()
    assert body["error"]["code"] == "insufficient_memory" and body["available"] == "48Gi"
    assert body["blocking"][0]["model"] == "model-a"
    assert int(response.headers["Retry-After"]) > 0
    assert len(runtime.spawned) == 1  # denied before any process was started
    models = {m["id"]: m["state"] for m in client.get("/v1/models").get_json()["data"]}
    assert models == {"model-a": "ready", "model-b": "stopped", "model-c": "stopped"}


def test_model_metrics_route_and_gauges(runtime):
    client, scaler = _app(runtime)
    scaler.scale_up("model-a", 1)
    runtime.ready(runtime.spawned[-1])
    runtime.rss["model-a"] = 75 * GI
    scaler.sample_now()
    body = client.get("/models/model-a/metrics").get_json()
    assert (body["declaredMemory"], body["observedPeakMemory"], body["utilizationPercent"]) == ("80Gi", "75Gi", 93)
    missing = client.get("/models/model-z/metrics")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "model_not_found"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'inference_model_memory_declared_bytes{model="model-b",namespace="local"} 6.442450944e+10' in text
    assert 'inference_model_memory_utilization_ratio{model="model-a",namespace="local"} 0.9375' in text


def test_model_metrics_need_the_api_key_when_keys_are_set(runtime):
    client, _ = _app(runtime, api_key_digests=frozenset({digest_key("s3cret")}))
    assert client.get("/models/model-a/metrics").status_code == 401
    ok = client.get("/models/model-a/metrics", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and json.loads(ok.data)["model"] == "model-a"
