"""The proxy's request path without sockets: Flask's test client in front, httpx.MockTransport behind.

What a client of the proxy notices: the right status and error shape for bad input, the explained 429
with no scale-up call, requests held during a cold start and then served, the waiting-room bounds, and
upstream failures mapped to 502/504.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient

from budget import ClusterView, Decision, Model, Node, Placement, decide_scale
from proxy.app import ProxyApp, create_app
from proxy.coldstart import HELD_OVERHEAD_BYTES
from proxy.scaler import ScaleDenied, ScalerUnavailable
from proxy.settings import ProxySettings, digest_key
from proxy.static_scaler import StaticScaler
from tests.waiting import wait_until

pytestmark = pytest.mark.unit

GI = 2**30
BACKEND_A = "http://10.0.0.1:8000"
BACKEND_A2 = "http://10.0.0.2:8000"
BACKEND_C = "http://10.0.0.3:8000"


def seed_view(now: float | None = None) -> ClusterView:
    """The seed scenario: one 128Gi node; model-a (80Gi) runs idle for 120 s; model-b (60Gi) cannot fit."""
    now = time.time() if now is None else now
    return ClusterView.build(
        nodes=[Node("node-1", {"inference-pool": "gpu-nodes"}, 128 * GI, "annotation")],
        models=[
            Model("default", "model-a", 80 * GI, "model-a", {"inference-pool": "gpu-nodes"}, 600.0, 1, now - 120),
            Model("default", "model-b", 60 * GI, "model-b", {"inference-pool": "gpu-nodes"}, 600.0, 0),
            Model("default", "model-c", 40 * GI, "model-c", {"inference-pool": "gpu-nodes"}, 600.0, 0),
        ],
        placements=[
            Placement("default/model-a-0", "node-1", 80 * GI, "default/model-a", "uid-a", "Running", now - 120, True)
        ],
    )


class Backends:
    """A fake set of model servers behind httpx.MockTransport; records what reached them."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Callable[[httpx.Request], httpx.Response] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.handler is not None:
            return self.handler(request)
        body = json.loads(request.content)
        answer = {"object": "chat.completion", "model": body["model"], "served_by": str(request.url.netloc)}
        return httpx.Response(200, json=answer, headers={"Connection": "keep-alive", "X-Model-Server": "fake"})


def make_client(
    scaler: StaticScaler, backends: Backends | None = None, **settings: Any
) -> tuple[FlaskClient, ProxyApp, Backends]:
    backends = backends or Backends()
    defaults: dict[str, Any] = {"disconnect_check_seconds": 0.05, "progress_interval_seconds": 0.1}
    defaults.update(settings)
    app = create_app(ProxySettings(**defaults), scaler, transport=httpx.MockTransport(backends))
    return app.test_client(), app.extensions["ibc_proxy"], backends


@pytest.fixture
def scaler() -> StaticScaler:
    return StaticScaler(seed_view(), {"default/model-a": [BACKEND_A]})


def chat(model: Any = "model-a", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        pytest.param(b"{not json", 400, "invalid_json", None, id="malformed-json"),
        pytest.param(b"\xff\xfe", 400, "invalid_json", None, id="not-utf8"),
        pytest.param(b"[1, 2]", 400, "invalid_json", None, id="json-array"),
        pytest.param(b"", 400, "invalid_json", None, id="empty-body"),
        pytest.param(b"[" * 5000 + b"]" * 5000, 400, "invalid_json", None, id="nested-deeper-than-recursion-limit"),
        pytest.param(b'{"messages": []}', 400, "missing_model", "model", id="missing-model"),
        pytest.param(b'{"model": 7}', 400, "invalid_type", "model", id="model-not-string"),
        pytest.param(b'{"model": ""}', 400, "invalid_type", "model", id="model-empty"),
        pytest.param(b'{"model": "model-a", "stream": "yes"}', 400, "invalid_type", "stream", id="stream-not-bool"),
        pytest.param(b'{"model": "nope"}', 404, "model_not_found", "model", id="unknown-model"),
    ],
)
def test_bad_requests_get_openai_errors(
    scaler: StaticScaler, body: bytes, status: int, code: str, param: str | None
) -> None:
    client, _, backends = make_client(scaler)
    resp = client.post("/v1/chat/completions", data=body, content_type="application/json")
    assert resp.status_code == status
    error = resp.get_json()["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert backends.requests == []


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        pytest.param("GET", "/v1/chat/completions", 405, "method_not_allowed", id="get-on-post-route"),
        pytest.param("GET", "/nothing/here", 404, "not_found", id="unknown-path"),
        pytest.param("DELETE", "/v1/models", 405, "method_not_allowed", id="delete-models"),
    ],
)
def test_routing_errors_are_json(scaler: StaticScaler, method: str, path: str, status: int, code: str) -> None:
    client, _, _ = make_client(scaler)
    resp = client.open(path, method=method)
    assert resp.status_code == status
    assert resp.get_json()["error"]["code"] == code


def test_body_over_the_limit_is_413_before_any_backend(scaler: StaticScaler) -> None:
    client, _, backends = make_client(scaler, max_body_bytes=1024)
    resp = client.post("/v1/chat/completions", json=chat(padding="x" * 2000))
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "request_too_large"
    assert backends.requests == []
    small = client.post("/v1/chat/completions", json=chat())
    assert small.status_code == 200


@pytest.mark.parametrize(
    ("header", "forwarded"),
    [
        pytest.param("X-IBC-Max-Wait", False, id="max-wait"),
        pytest.param("x-ibc-max-wait", False, id="max-wait-lowercase"),
        pytest.param("X-Ibc-Some-Future-Option", False, id="any-x-ibc"),
        pytest.param("X-Ibcx", True, id="not-the-prefix"),
        pytest.param("X-Max-Wait", True, id="not-ours"),
    ],
)
def test_the_proxys_own_headers_stay_with_the_proxy(scaler: StaticScaler, header: str, forwarded: bool) -> None:
    client, _, backends = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat(), headers={header: "5", "X-Trace": "t-1"})
    assert resp.status_code == 200
    sent = backends.requests[0]
    assert (header.lower() in sent.headers) is forwarded
    assert sent.headers["x-trace"] == "t-1"


def test_forwards_to_the_ready_backend_with_path_query_and_filtered_headers(scaler: StaticScaler) -> None:
    client, _, backends = make_client(scaler)
    resp = client.post(
        "/v1/chat/completions?api-version=1",
        json=chat(),
        headers={"X-Trace": "t-1", "X-Hop": "h", "Connection": "keep-alive, X-Hop", "Proxy-Authorization": "Basic x"},
    )
    assert resp.status_code == 200
    assert resp.get_json()["model"] == "model-a"
    sent = backends.requests[0]
    assert str(sent.url) == f"{BACKEND_A}/v1/chat/completions?api-version=1"
    assert sent.headers["x-trace"] == "t-1"
    assert "x-hop" not in sent.headers, "headers named by Connection are hop-by-hop"
    assert "proxy-authorization" not in sent.headers
    assert sent.headers.get("connection") is None
    assert json.loads(sent.content) == chat()
    assert resp.headers["X-Model-Server"] == "fake"
    assert "keep-alive" not in resp.headers.get("Connection", "")
    assert scaler.touches["default/model-a"] == pytest.approx(time.time(), abs=5)


def test_any_v1_post_is_routed_by_the_body_model(scaler: StaticScaler) -> None:
    client, _, backends = make_client(scaler)
    resp = client.post("/v1/audio/speech", json={"model": "model-a", "input": "hello"})
    assert resp.status_code == 200
    assert backends.requests[0].url.path == "/v1/audio/speech"


def test_routes_by_model_name_key_and_object_name() -> None:
    view = ClusterView.build(
        nodes=[Node("n", {}, 100 * GI, "annotation")],
        models=[Model("team", "llama-obj", GI, "meta-llama/Llama-3-8B", replicas=1)],
    )
    scaler = StaticScaler(view, {"team/llama-obj": [BACKEND_A]})
    client, _, backends = make_client(scaler)
    for ref in ("meta-llama/Llama-3-8B", "team/llama-obj", "llama-obj"):
        assert client.post("/v1/completions", json={"model": ref, "prompt": "x"}).status_code == 200
    assert len(backends.requests) == 3


class TestApiKeys:
    @pytest.fixture
    def keyed(self, scaler: StaticScaler) -> tuple[FlaskClient, Backends]:
        client, _, backends = make_client(scaler, api_key_digests=frozenset({digest_key("sk-good")}))
        return client, backends

    @pytest.mark.parametrize(
        "header",
        [
            pytest.param(None, id="no-header"),
            pytest.param("Bearer sk-bad", id="wrong-key"),
            pytest.param("Basic sk-good", id="wrong-scheme"),
            pytest.param("Bearer", id="empty-token"),
        ],
    )
    def test_rejected_without_a_valid_key(self, keyed: tuple[FlaskClient, Backends], header: str | None) -> None:
        client, backends = keyed
        headers = {"Authorization": header} if header else {}
        for resp in (
            client.post("/v1/chat/completions", json=chat(), headers=headers),
            client.get("/v1/models", headers=headers),
        ):
            assert resp.status_code == 401
            assert resp.get_json()["error"]["code"] == "invalid_api_key"
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert backends.requests == []

    def test_accepted_and_the_key_is_not_forwarded(self, keyed: tuple[FlaskClient, Backends]) -> None:
        client, backends = keyed
        resp = client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-good"})
        assert resp.status_code == 200
        assert "authorization" not in backends.requests[0].headers

    def test_health_endpoints_need_no_key(self, keyed: tuple[FlaskClient, Backends]) -> None:
        client, _ = keyed
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_without_api_keys_the_client_authorization_reaches_the_backend(scaler: StaticScaler) -> None:
    client, _, backends = make_client(scaler)
    client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer backend-key"})
    assert backends.requests[0].headers["authorization"] == "Bearer backend-key"


def test_models_list_shows_every_model_with_its_state(scaler: StaticScaler) -> None:
    client, _, _ = make_client(scaler)
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    states = {m["id"]: (m["state"], m["memory"], m["object"]) for m in body["data"]}
    assert states == {
        "model-a": ("ready", "80Gi", "model"),
        "model-b": ("stopped", "60Gi", "model"),
        "model-c": ("stopped", "40Gi", "model"),
    }
    one = client.get("/v1/models/model-b")
    assert one.status_code == 200 and one.get_json()["state"] == "stopped"
    assert client.get("/v1/models/ghost").status_code == 404


def test_does_not_fit_is_429_at_once_with_the_budget_explanation_and_no_scale_call(scaler: StaticScaler) -> None:
    client, _, backends = make_client(scaler)
    started = time.perf_counter()
    resp = client.post("/v1/chat/completions", json=chat("model-b"))
    elapsed = time.perf_counter() - started
    assert resp.status_code == 429
    body = resp.get_json()
    assert body["error"]["code"] == "insufficient_memory"
    assert body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
    assert body["available"] == "48Gi"
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]
    assert "model-b needs 60Gi" in body["message"]
    # model-a's cooldown (600 s) ends 480 s from now: that is when retrying can help.
    assert resp.headers["Retry-After"] == str(body["retry_after_seconds"])
    assert 470 <= int(resp.headers["Retry-After"]) <= 480
    assert scaler.scale_calls == []
    assert backends.requests == []
    assert elapsed < 0.5


def test_cold_model_that_fits_is_scaled_once_held_and_served(scaler: StaticScaler) -> None:
    def start(key: str, replicas: int) -> None:
        threading.Timer(0.2, scaler.set_backends, (key, [BACKEND_C])).start()

    scaler._on_scale_up = start
    client, proxy, backends = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat("model-c"))
    assert resp.status_code == 200
    assert scaler.scale_calls == [("default/model-c", 1)]
    assert str(backends.requests[0].url).startswith(BACKEND_C)
    assert proxy.cold.waiting() == {}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'ibc_proxy_cold_start_seconds_count{model="model-c"} 1.0' in metrics
    assert 'ibc_proxy_requests_total{model="model-c",status="200"} 1.0' in metrics


def test_concurrent_cold_requests_share_one_scale_up_call(scaler: StaticScaler) -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow_scale(key: str, replicas: int) -> None:
        entered.set()
        release.wait(5)
        scaler.set_backends(key, [BACKEND_C])

    scaler._on_scale_up = slow_scale
    client, proxy, _ = make_client(scaler)
    statuses: list[int] = []

    def call() -> None:
        statuses.append(client.post("/v1/chat/completions", json=chat("model-c")).status_code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    assert entered.wait(5)
    # Every request is held while the one scale-up call is still in flight; only then may it finish.
    wait_until(lambda: proxy.cold.waiting().get("default/model-c") == 8, message="8 held requests")
    assert len(scaler.scale_calls) == 1
    release.set()
    for t in threads:
        t.join(10)
    assert statuses == [200] * 8
    assert len(scaler.scale_calls) == 1


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        pytest.param(ScalerUnavailable("apiserver down"), 503, "scaler_unavailable", id="scaler-unavailable"),
        pytest.param(RuntimeError("bug in a scaler"), 503, "scaler_unavailable", id="scaler-bug"),
    ],
)
def test_scale_up_failures_are_503(scaler: StaticScaler, error: Exception, status: int, code: str) -> None:
    def fail(key: str, replicas: int) -> None:
        raise error

    scaler._on_scale_up = fail
    client, proxy, _ = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat("model-c"))
    assert resp.status_code == status
    assert resp.get_json()["error"]["code"] == code
    assert proxy.cold.waiting() == {}


def test_a_scale_denied_by_the_scaler_is_the_same_429(scaler: StaticScaler) -> None:
    def deny(key: str, replicas: int) -> None:
        local = decide_scale(seed_view(), "default/model-c", 1, time.time())
        raise ScaleDenied(
            Decision(
                **{
                    **local.__dict__,
                    "allowed": False,
                    "reason": "insufficient_memory",
                    "message": "webhook says no",
                    "retry_after_seconds": 42,
                }
            )
        )

    scaler._on_scale_up = deny
    client, proxy, _ = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat("model-c"))
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "42"
    body = resp.get_json()
    assert body["error"]["code"] == "insufficient_memory" and body["message"] == "webhook says no"
    assert body["requested"]["model"] == "model-c"
    assert proxy.cold.waiting() == {}


def test_queue_full_is_503_and_the_waiting_request_is_still_served(scaler: StaticScaler) -> None:
    client, proxy, _ = make_client(scaler, queue_size=1)
    first: list[int] = []
    waiter = threading.Thread(
        target=lambda: first.append(client.post("/v1/chat/completions", json=chat("model-c")).status_code)
    )
    waiter.start()
    wait_until(lambda: proxy.cold.waiting().get("default/model-c") == 1, message="the first request held")
    resp = client.post("/v1/chat/completions", json=chat("model-c"))
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "queue_full"
    assert int(resp.headers["Retry-After"]) >= 1
    scaler.set_backends("default/model-c", [BACKEND_C])
    waiter.join(5)
    assert first == [200]


def test_total_held_limit_protects_threads_for_warm_models(scaler: StaticScaler) -> None:
    client, proxy, _ = make_client(scaler, max_held_requests=1)
    waiter = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=chat("model-c")))
    waiter.start()
    wait_until(proxy.cold.waiting, message="a held request")
    assert client.post("/v1/chat/completions", json=chat("model-c")).status_code == 503
    assert client.post("/v1/chat/completions", json=chat("model-a")).status_code == 200
    scaler.set_backends("default/model-c", [BACKEND_C])
    waiter.join(5)


@pytest.mark.parametrize(
    ("limit_bytes", "body_padding", "second"),
    [
        pytest.param(2 * HELD_OVERHEAD_BYTES + 1000, 0, 200, id="two-fit"),
        pytest.param(2 * HELD_OVERHEAD_BYTES, 1000, 503, id="bodies-count-too"),
        pytest.param(HELD_OVERHEAD_BYTES + 100, 0, 503, id="one-fits"),
    ],
)
def test_held_requests_are_bounded_by_memory(
    scaler: StaticScaler, limit_bytes: int, body_padding: int, second: int
) -> None:
    client, proxy, _ = make_client(scaler, max_held_bytes=limit_bytes)
    first: list[int] = []
    padded = chat("model-c", user="x" * body_padding)
    waiter = threading.Thread(target=lambda: first.append(client.post("/v1/chat/completions", json=padded).status_code))
    waiter.start()
    deadline = time.monotonic() + 5
    while not proxy.cold.waiting() and time.monotonic() < deadline:
        time.sleep(0.01)
    if second == 503:
        resp = client.post("/v1/chat/completions", json=padded)
        assert resp.status_code == 503
        assert "memory limit" in resp.get_json()["error"]["message"]
    else:
        other = threading.Thread(
            target=lambda: first.append(client.post("/v1/chat/completions", json=padded).status_code)
        )
        other.start()
        while proxy.cold.waiting().get("default/model-c") != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.cold.waiting() == {"default/model-c": 2}
    scaler.set_backends("default/model-c", [BACKEND_C])
    waiter.join(5)
    if second == 200:
        other.join(5)
    assert all(code == 200 for code in first)
    assert proxy.cold.waiting() == {}


@pytest.mark.parametrize(
    ("first_model", "then_model", "then_headers"),
    [
        pytest.param("model-b", "model-c", {}, id="in-line-then-cold-start"),
        pytest.param("model-c", "model-b", {"X-IBC-Max-Wait": "30"}, id="cold-start-then-in-line"),
        pytest.param("model-b", "model-b", {"X-IBC-Max-Wait": "30"}, id="in-line-twice"),
    ],
)
def test_a_request_waiting_in_line_counts_toward_the_held_memory_cap(
    scaler: StaticScaler, first_model: str, then_model: str, then_headers: dict[str, str]
) -> None:
    """One cap (`--max-held-mib`) for every held request: in line for memory, or waiting for a start."""
    client, proxy, _ = make_client(scaler, max_held_bytes=HELD_OVERHEAD_BYTES + 1000)
    first: list[int] = []
    # model-b does not fit: it waits in line (3 s, then the 429); model-c fits: it waits for its start.
    post = functools.partial(
        client.post, "/v1/chat/completions", json=chat(first_model), headers={"X-IBC-Max-Wait": "3"}
    )
    waiter = threading.Thread(target=lambda: first.append(post().status_code))
    waiter.start()
    deadline = time.monotonic() + 5
    while proxy.cold.held_bytes() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.cold.held_bytes() > HELD_OVERHEAD_BYTES
    resp = client.post("/v1/chat/completions", json=chat(then_model), headers=then_headers)
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "queue_full"
    assert "memory limit" in resp.get_json()["error"]["message"]
    scaler.set_backends("default/model-c", [BACKEND_C])
    waiter.join(10)
    assert first == [429 if first_model == "model-b" else 200]
    assert proxy.cold.held_bytes() == 0


@pytest.mark.parametrize(
    ("model", "stream", "headers"),
    [
        pytest.param("model-c", False, {}, id="held-for-a-start"),
        pytest.param("model-c", True, {}, id="held-for-a-start-streaming"),
        pytest.param("model-b", False, {"X-IBC-Max-Wait": "60"}, id="in-line"),
        pytest.param("model-b", True, {"X-IBC-Max-Wait": "60"}, id="in-line-streaming"),
    ],
)
def test_shutdown_answers_every_held_request(
    scaler: StaticScaler, model: str, stream: bool, headers: dict[str, str]
) -> None:
    """What SIGTERM does first (serving/stopping.py): every held request gets an explicit 503 at once."""
    client, proxy, _ = make_client(scaler, cold_start_timeout_seconds=60)
    answers: list[Any] = []
    post = functools.partial(client.post, "/v1/chat/completions", json=chat(model, stream=stream), headers=headers)
    waiter = threading.Thread(target=lambda: answers.append((r := post(), r.get_data(as_text=True))))
    waiter.start()
    deadline = time.monotonic() + 5
    while not (proxy.cold.waiting() or proxy.line.snapshot()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.cold.waiting() or proxy.line.snapshot()
    started = time.monotonic()
    proxy.shutdown()
    waiter.join(10)
    assert time.monotonic() - started < 2, "answered at once, not at the end of the wait"
    ((resp, text),) = answers
    if stream:
        assert resp.status_code == 200
        event = json.loads(text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
        assert event["error"]["code"] == "shutting_down" and event["error"]["retry_after_seconds"] == 1
    else:
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert resp.get_json()["error"]["code"] == "shutting_down"
    assert proxy.cold.waiting() == {} and proxy.line.snapshot() == {} and proxy.cold.held_bytes() == 0
    # Once closing, a request that would be held is answered the same way at once.
    again = client.post("/v1/chat/completions", json=chat("model-c"))
    assert again.status_code == 503 and again.get_json()["error"]["code"] == "shutting_down"


class FailingStart(StaticScaler):
    """A scaler whose replica dies while starting: wait_backends raises, as local mode's does."""

    def wait_backends(self, model_key: str, timeout_seconds: float) -> list[str]:
        raise ScalerUnavailable("model-c exited with code 3 while starting")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_a_start_that_fails_is_reported_at_once_to_every_waiter(stream: bool) -> None:
    scaler = FailingStart(seed_view(), {"default/model-a": [BACKEND_A]})
    client, proxy, _ = make_client(scaler, cold_start_timeout_seconds=60)
    started = time.monotonic()
    resp = client.post("/v1/chat/completions", json=chat("model-c", stream=stream))
    text = resp.get_data(as_text=True)
    assert time.monotonic() - started < 5, "not held until the cold-start timeout"
    if stream:
        assert resp.status_code == 200
        event = next(e for e in text.split("\n\n") if e.startswith("event: error"))
        error = json.loads(event.split("data: ", 1)[1])["error"]
    else:
        assert resp.status_code == 503
        error = json.loads(text)["error"]
    assert error["code"] == "scaler_unavailable"
    assert "exited with code 3" in error["message"]
    assert proxy.cold.waiting() == {}


def test_cold_start_timeout_is_504_and_frees_the_place(scaler: StaticScaler) -> None:
    client, proxy, _ = make_client(scaler, cold_start_timeout_seconds=0.3)
    started = time.monotonic()
    resp = client.post("/v1/chat/completions", json=chat("model-c"))
    assert resp.status_code == 504
    assert resp.get_json()["error"]["code"] == "cold_start_timeout"
    assert 0.25 <= time.monotonic() - started < 3
    assert proxy.cold.waiting() == {}
    assert 'reason="cold_start_timeout"' in client.get("/metrics").get_data(as_text=True)


def sse_backend(request: httpx.Request) -> httpx.Response:
    def chunks() -> Iterator[bytes]:
        for i in range(3):
            yield f'data: {{"choices":[{{"delta":{{"content":"t{i}"}}}}]}}\n\n'.encode()
        yield b"data: [DONE]\n\n"

    return httpx.Response(
        200, headers={"Content-Type": "text/event-stream"}, stream=httpx.ByteStream(b"".join(chunks()))
    )


def test_streaming_cold_start_sends_progress_comments_then_the_stream(scaler: StaticScaler) -> None:
    def start(key: str, replicas: int) -> None:
        threading.Timer(0.35, scaler.set_backends, (key, [BACKEND_C])).start()

    scaler._on_scale_up = start
    backends = Backends()
    backends.handler = sse_backend
    client, _, _ = make_client(scaler, backends)
    resp = client.post("/v1/chat/completions", json=chat("model-c", stream=True))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    text = resp.get_data(as_text=True)
    assert text.startswith(": waiting for model-c to start\n\n")
    assert ": waiting for model-c to start (0s)" in text
    assert text.index("data: {") > text.rindex(": waiting")
    assert text.endswith("data: [DONE]\n\n")
    assert backends.requests[0].headers["accept-encoding"] == "identity"


def test_streaming_cold_start_timeout_arrives_as_an_sse_error_event(scaler: StaticScaler) -> None:
    client, proxy, _ = make_client(scaler, cold_start_timeout_seconds=0.3)
    resp = client.post("/v1/chat/completions", json=chat("model-c", stream=True))
    assert resp.status_code == 200
    events = [e for e in resp.get_data(as_text=True).split("\n\n") if e.startswith("event: error")]
    assert len(events) == 1
    payload = json.loads(events[0].split("data: ", 1)[1])
    assert payload["error"]["code"] == "cold_start_timeout"
    assert proxy.cold.waiting() == {}


def test_streaming_request_that_does_not_fit_still_gets_a_real_429(scaler: StaticScaler) -> None:
    client, _, _ = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat("model-b", stream=True))
    assert resp.status_code == 429
    assert resp.get_json()["error"]["code"] == "insufficient_memory"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        pytest.param(httpx.ConnectError("refused"), 502, "upstream_unreachable", id="connect-refused"),
        pytest.param(httpx.ReadTimeout("slow"), 504, "upstream_timeout", id="read-timeout"),
        pytest.param(httpx.ConnectTimeout("slow"), 504, "upstream_timeout", id="connect-timeout"),
        pytest.param(httpx.RemoteProtocolError("garbage"), 502, "upstream_unreachable", id="protocol-error"),
    ],
)
def test_upstream_failures_map_to_502_and_504(scaler: StaticScaler, exc: Exception, status: int, code: str) -> None:
    backends = Backends()

    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    backends.handler = fail
    client, proxy, _ = make_client(scaler, backends)
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == status
    assert resp.get_json()["error"]["code"] == code
    assert proxy.upstream.outstanding() == {}


def test_a_replica_refusing_connections_is_skipped_for_another() -> None:
    scaler = StaticScaler(seed_view(), {"default/model-a": [BACKEND_A, BACKEND_A2]})
    backends = Backends()

    def one_down(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.1":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"host": request.url.host})

    backends.handler = one_down
    client, proxy, _ = make_client(scaler, backends)
    for _ in range(4):
        resp = client.post("/v1/chat/completions", json=chat())
        assert resp.status_code == 200 and resp.get_json() == {"host": "10.0.0.2"}
    assert proxy.upstream.outstanding() == {}


def test_a_backend_that_fails_after_receiving_the_request_is_not_retried() -> None:
    scaler = StaticScaler(seed_view(), {"default/model-a": [BACKEND_A, BACKEND_A2]})
    backends = Backends()

    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset mid-answer")

    backends.handler = broken
    client, _, _ = make_client(scaler, backends)
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 502
    assert len(backends.requests) == 1, "a request that may have run is never sent twice"


def test_upstream_error_statuses_pass_through_unchanged(scaler: StaticScaler) -> None:
    backends = Backends()
    backends.handler = lambda r: httpx.Response(400, json={"error": {"message": "max_tokens too large"}})
    client, _, _ = make_client(scaler, backends)
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 400
    assert resp.get_json() == {"error": {"message": "max_tokens too large"}}


def test_requests_spread_over_replicas_by_least_outstanding() -> None:
    view = seed_view()
    scaler = StaticScaler(view, {"default/model-a": [BACKEND_A, BACKEND_A2]})
    gate = threading.Event()
    backends = Backends()

    def slow(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.1":
            gate.wait(5)
        return httpx.Response(200, json={"host": request.url.host})

    backends.handler = slow
    client, proxy, _ = make_client(scaler, backends)
    blocked = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=chat()))
    # Hold one request on 10.0.0.1 (whichever backend the rotation starts with, retry until it is .1).
    blocked.start()

    def held_on_a() -> bool:
        nonlocal blocked
        if not blocked.is_alive():
            blocked = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=chat()))
            blocked.start()
        return proxy.upstream.outstanding().get(BACKEND_A) == 1

    wait_until(held_on_a, message="one request held on 10.0.0.1")
    hosts = [client.post("/v1/chat/completions", json=chat()).get_json()["host"] for _ in range(5)]
    assert hosts == ["10.0.0.2"] * 5
    gate.set()
    blocked.join(5)
    assert proxy.upstream.outstanding() == {}


def test_metrics_count_requests_and_rejections(scaler: StaticScaler) -> None:
    client, _, _ = make_client(scaler)
    client.post("/v1/chat/completions", json=chat())
    client.post("/v1/chat/completions", json=chat("model-b"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ibc_proxy_requests_total{model="model-a",status="200"} 1.0' in text
    assert 'ibc_proxy_requests_total{model="model-b",status="429"} 1.0' in text
    assert 'ibc_proxy_rejections_total{model="model-b",reason="insufficient_memory"} 1.0' in text
    assert 'ibc_proxy_upstream_latency_seconds_count{model="model-a"} 1.0' in text
    assert "ibc_proxy_queue_depth" in text


def test_not_ready_scaler_answers_503_until_synced(scaler: StaticScaler) -> None:
    synced = {"value": False}
    scaler.ready = lambda: synced["value"]  # type: ignore[attr-defined]
    client, _, _ = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "not_ready"
    assert client.get("/readyz").status_code == 503
    synced["value"] = True
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("sent", "served"),
    [
        pytest.param("model-a", "model-a", id="served-name-untouched"),
        pytest.param("default/model-a", "model-a", id="namespace-slash-name-rewritten"),
    ],
)
def test_the_backend_gets_its_served_name_whatever_the_client_routed_by(
    scaler: StaticScaler, sent: str, served: str
) -> None:
    client, _, backends = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat(sent, temperature=0.5))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    forwarded = json.loads(backends.requests[-1].content)
    assert forwarded == chat(served, temperature=0.5)  # only `model` changes


def test_one_access_log_line_per_request_with_the_refusals_reason(
    scaler: StaticScaler, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from ibc.logs import JsonFormatter

    client, _, _ = make_client(scaler)
    with caplog.at_level(logging.INFO, logger="ibc.access"):
        for call in (
            lambda: client.post("/v1/chat/completions", json=chat("default/model-a")),
            lambda: client.post("/v1/chat/completions", json=chat("model-b")),
            lambda: client.post("/v1/chat/completions", json=chat("nope")),
            lambda: client.get("/v1/models"),
        ):
            call().close()  # a server closes the response when it has sent it: the line is written then
    lines = [r for r in caplog.records if r.name == "ibc.access"]
    got = [(r.method, r.path, r.model, r.status, getattr(r, "reason", None)) for r in lines]  # type: ignore[attr-defined]
    assert got == [
        ("POST", "/v1/chat/completions", "model-a", 200, None),
        ("POST", "/v1/chat/completions", "model-b", 429, "insufficient_memory"),
        ("POST", "/v1/chat/completions", "nope", 404, "model_not_found"),
        ("GET", "/v1/models", "-", 200, None),
    ]
    assert all(r.duration_ms >= 0 for r in lines)  # type: ignore[attr-defined]
    assert lines[1].getMessage().startswith("POST /v1/chat/completions model=model-b status=429 duration_ms=")
    assert lines[1].getMessage().endswith(" reason=insufficient_memory")
    as_json = json.loads(JsonFormatter().format(lines[1]))
    assert {k: as_json[k] for k in ("method", "path", "model", "status", "reason")} == {
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "model-b",
        "status": 429,
        "reason": "insufficient_memory",
    }


def test_the_429_is_openais_envelope_with_the_numbers_inside_and_the_seed_fields_on_top(
    scaler: StaticScaler,
) -> None:
    client, _, _ = make_client(scaler)
    body = client.post("/v1/chat/completions", json=chat("model-b")).get_json()
    error = body["error"]
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "insufficient_memory", None)
    assert error["message"] == body["message"]
    for field in ("requested", "available", "blocking", "retry_after_seconds"):
        assert error[field] == body[field], field
    assert error["available"] == "48Gi" and error["blocking"][0]["model"] == "model-a"


def test_a_request_that_can_never_fit_gets_no_retry_after(scaler: StaticScaler) -> None:
    client, _, _ = make_client(scaler)
    resp = client.post("/v1/chat/completions", json=chat("model-b"))
    assert "Retry-After" in resp.headers
    view = seed_view()
    # Three replicas of 60Gi wanted (e.g. set by an operator) on one 128Gi node: never, whatever stops.
    big = Model("default", "huge", 60 * GI, "huge", {"inference-pool": "gpu-nodes"}, 600.0, 3)
    models = [*view.models.values(), big]
    scaler.set_view(ClusterView.build(nodes=view.nodes, models=models, placements=view.placements))
    resp = client.post("/v1/chat/completions", json=chat("huge"))
    assert resp.status_code == 429
    assert "Retry-After" not in resp.headers
    assert resp.headers["x-should-retry"] == "false"  # OpenAI's SDKs then raise at once instead of retrying
    error = resp.get_json()["error"]
    assert (error["code"], error["retry_after_seconds"]) == ("exceeds_pool_capacity", None)
    assert "it can never fit without more nodes" in error["message"]
