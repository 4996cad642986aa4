"""`GET /status`, the page at `GET /`, and manual start/stop, on the app `ibc local` serves (fake processes)."""

import pytest

from proxy.settings import ProxySettings, digest_key
from tests.unit.test_local_app import CHAT, _app, runtime  # noqa: F401 (fixture)

pytestmark = pytest.mark.unit

KEY = {"Authorization": "Bearer s3cret"}


def _models(client, headers=None):
    return {m["name"]: m for m in client.get("/status", headers=headers).get_json()["models"]}


def test_a_429_becomes_the_models_last_refusal_with_the_same_numbers(runtime):  # noqa: F811 (fixture)
    client, scaler = _app(runtime)
    scaler.scale_up("model-a", 1)
    runtime.ready(runtime.spawned[-1])
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 429
    body = answer.get_json()
    doc = client.get("/status").get_json()
    refusal = {m["name"]: m for m in doc["models"]}["model-b"]["last_refusal"]
    for field in ("message", "requested", "available", "blocking", "retry_after_seconds"):
        assert refusal[field] == body[field], field
    assert doc["source"] == "ibc local"
    node = doc["nodes"][0]
    assert (node["name"], node["used"], node["free"]) == ("shadow", "80Gi", "48Gi")
    assert [(r["model"], r["memory"], r["ready"]) for r in node["replicas"]] == [("model-a", "80Gi", True)]
    models = _models(client)
    assert models["model-a"]["state"] == "ready" and models["model-a"]["queue_limit"] == ProxySettings().queue_size
    assert models["model-c"]["last_refusal"] is None


def test_manual_start_decides_like_a_request_and_stop_takes_the_cooldown_path(runtime):  # noqa: F811 (fixture)
    client, _ = _app(runtime)
    started = client.post("/models/model-a/start")
    assert started.status_code == 202 and started.get_json()["state"] == "starting"
    runtime.ready(runtime.spawned[-1])
    again = client.post("/models/model-a/start")
    assert again.status_code == 200 and len(runtime.spawned) == 1  # already running: nothing new

    refused = client.post("/models/model-b/start")
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "insufficient_memory"
    assert int(refused.headers["Retry-After"]) > 0
    assert _models(client)["model-b"]["last_refusal"]["message"] == refused.get_json()["message"]

    stopped = client.post("/models/model-a/stop")
    assert stopped.status_code == 202 and stopped.get_json() == {
        "model": "model-a",
        "key": "local/model-a",
        "state": "stopping",
        "stopping": 1,
    }
    assert runtime.stopped == runtime.spawned  # the runtime's stop, as the cooldown calls it
    runtime.exit(runtime.spawned[-1], 0)
    assert client.post("/models/model-a/stop").get_json()["stopping"] == 0
    assert client.post("/models/model-b/start").status_code == 202  # its memory is free now


# (id, method, path, status, error code)
BAD = [
    ("unknown-model-start", "post", "/models/model-z/start", 404, "model_not_found"),
    ("unknown-model-stop", "post", "/models/model-z/stop", 404, "model_not_found"),
    ("wait-not-a-number", "post", "/models/model-a/start?wait=soon", 400, "invalid_wait"),
    ("wait-negative", "post", "/models/model-a/start?wait=-1", 400, "invalid_wait"),
    ("wait-infinite", "post", "/models/model-a/start?wait=inf", 400, "invalid_wait"),
    ("get-on-start", "get", "/models/model-a/start", 405, "method_not_allowed"),
    ("post-on-status", "post", "/status", 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "status", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_control_requests_get_a_clear_4xx(runtime, method, path, status, code):  # noqa: F811 (fixture)
    client, _ = _app(runtime)
    answer = getattr(client, method)(path)
    assert answer.status_code == status and answer.get_json()["error"]["code"] == code
    assert runtime.spawned == []


@pytest.mark.parametrize("path", ["/status", "/models/model-a/start", "/models/model-a/stop"])
def test_status_and_control_need_the_api_key_like_v1(runtime, path):  # noqa: F811 (fixture)
    client, _ = _app(runtime, api_key_digests=frozenset({digest_key("s3cret")}))
    method = client.get if path == "/status" else client.post
    assert method(path).status_code == 401
    assert method(path, headers=KEY).status_code in (200, 202)


def test_the_page_is_self_contained_and_holds_no_data(runtime):  # noqa: F811 (fixture)
    client, scaler = _app(runtime, api_key_digests=frozenset({digest_key("s3cret")}))
    scaler.scale_up("model-a", 1)
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'fetch("status"' in html and "model-a" not in html  # the data comes from /status, behind the key
    for external in ("http://", "https://", "<link", "src="):  # nothing loaded from elsewhere
        assert external not in html, external


def test_the_kubernetes_proxy_serves_status_but_no_manual_control():
    """`ibc proxy` (any scaler without `stop_model`): /status and the page, but replicas change via the API."""
    from proxy.static_scaler import StaticScaler
    from tests.unit.test_proxy_app import make_client, seed_view

    client, _, _ = make_client(StaticScaler(seed_view(), {"default/model-a": ["http://10.0.0.1:8000"]}))
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429
    doc = client.get("/status").get_json()
    assert doc["source"] == "ibc proxy"
    models = {m["name"]: m for m in doc["models"]}
    assert models["model-b"]["last_refusal"]["available"] == refused.get_json()["available"] == "48Gi"
    assert models["model-a"]["state"] == "ready" and 120 <= models["model-a"]["idle_for_seconds"] < 180
    assert client.get("/").status_code == 200
    missing = client.post("/models/model-a/stop")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
