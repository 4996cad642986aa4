"""The proxy's cold path, answer by answer: what a client gets when its model has no ready backend.

Every case is one request through the real app (Flask's test client, httpx.MockTransport behind) to a
scaler that starts nothing by itself: `Scripted` answers each `wait_backends` from a script and lets its
wait pass on a fake clock, so a 10-minute cold-start timeout, progress every few seconds and "the same
second" are exact and take no time. Each case asserts the whole answer (status, headers, body) and what
an operator reads beside it (the request and rejection counters, `GET /status`'s last refusal, the log).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient

import proxy.app
from budget import ClusterView, Decision, Model, Node, Placement
from proxy.app import ProxyApp, create_app
from proxy.coldstart import HELD_OVERHEAD_BYTES
from proxy.scaler import ScaleDenied, ScalerUnavailable
from proxy.settings import ProxySettings
from proxy.static_scaler import StaticScaler

pytestmark = pytest.mark.unit

GI = 2**30
T0 = 1_800_000_000.0  # a whole second: "the same second" below is exact
BACKEND_A = "http://10.0.0.1:8000"
BACKEND_C = "http://10.0.0.3:8000"
POOL = {"inference-pool": "gpu-nodes"}
SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]


class Clock:
    """The proxy module's clock (wall, monotonic and perf counter move together); scalers advance it."""

    def __init__(self) -> None:
        self.now = T0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def world_view(*extra: Model, idle_a: float = 120.5, cooldown_a: float = 600.0) -> ClusterView:
    """One 128Gi node; model-a (80Gi, cooldown 600 s) runs idle; model-b (60Gi, starts in 12.2 s) cannot
    fit beside it; model-c (40Gi) can. `idle_a` = how long model-a has been idle at T0."""
    return ClusterView.build(
        nodes=[Node("node-1", POOL, 128 * GI, "annotation")],
        models=[
            Model("default", "model-a", 80 * GI, "model-a", POOL, cooldown_a, 1, T0 - idle_a),
            Model("default", "model-b", 60 * GI, "model-b", POOL, 600.0, 0, startup_seconds=12.2),
            Model("default", "model-c", 40 * GI, "model-c", POOL, 600.0, 0),
            *extra,
        ],
        placements=[
            Placement("default/model-a-0", "node-1", 80 * GI, "default/model-a", "uid-a", "Running", T0 - 3600, True)
        ],
    )


Step = list[str] | Exception | Callable[[], list[str]]


MAX_WAITS = 1000  # a wait loop that never ends fails here, not at the test's timeout


class Scripted(StaticScaler):
    """A StaticScaler whose `wait_backends` answers from `script` (one step per call: backends, an
    exception to raise, or a callable), else waits out its timeout on the clock and returns [].
    Every touch (the idle clock) is kept in `touched`, in order."""

    def __init__(self, view: ClusterView, clock: Clock, script: list[Step] | None = None) -> None:
        super().__init__(view, {"default/model-a": [BACKEND_A]})
        self.clock = clock
        self.script = list(script or [])
        self.waited: list[float] = []
        self.touched: list[tuple[str, float]] = []

    def touch(self, model_key: str, now: float) -> None:
        self.touched.append((model_key, now))
        super().touch(model_key, now)

    def wait_backends(self, model_key: str, timeout_seconds: float) -> list[str]:
        # A real scaler asked to wait 0 s returns at once: the caller would spin.
        assert timeout_seconds > 0, f"asked to wait {timeout_seconds} s"
        assert len(self.waited) < MAX_WAITS, "the wait never ends"
        self.waited.append(round(timeout_seconds, 6))
        step = self.script.pop(0) if self.script else []
        if isinstance(step, Exception):
            raise step
        if callable(step):
            return step()
        if step:
            self.set_backends(model_key, step)
            return list(step)
        self.clock.advance(timeout_seconds)
        return []


@dataclass
class World:
    clock: Clock
    scaler: Scripted
    client: FlaskClient
    proxy: ProxyApp
    sent: list[httpx.Request] = field(default_factory=list)

    def post(self, model: str, *, stream: bool = False, headers: dict[str, str] | None = None, **environ: Any) -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **({"stream": True} if stream else {})}
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {}, environ_overrides=environ)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.proxy.metrics.registry.get_sample_value(name, labels)

    def _by(self, name: str, model: str, label: str) -> dict[str, float]:
        samples = (s for family in self.proxy.metrics.registry.collect() for s in family.samples)
        return {s.labels[label]: s.value for s in samples if s.name == name and s.labels.get("model") == model}

    def requests_counted(self, model: str) -> dict[str, float]:
        """ibc_proxy_requests_total by status for one model (what a dashboard shows)."""
        return self._by("ibc_proxy_requests_total", model, "status")

    def rejections(self, model: str) -> dict[str, float]:
        """ibc_proxy_rejections_total by reason for one model."""
        return self._by("ibc_proxy_rejections_total", model, "reason")

    def in_flight(self) -> dict[str, float]:
        """ibc_proxy_backend_in_flight where not zero (what the load layer sums): {} once all is answered."""
        samples = (s for family in self.proxy.metrics.registry.collect() for s in family.samples)
        return {s.labels["backend"]: s.value for s in samples if s.name == "ibc_proxy_backend_in_flight" and s.value}

    def last_refusal(self, key: str) -> dict[str, Any] | None:
        doc = self.client.get("/status").get_json()
        (entry,) = [m for m in doc["models"] if m["key"] == key]
        refusal: dict[str, Any] | None = entry["last_refusal"]
        return refusal

    def nothing_held(self) -> bool:
        return self.proxy.cold.waiting() == {} and self.proxy.cold.held_bytes() == 0 and not self.proxy.line.snapshot()


def make_world(
    monkeypatch: pytest.MonkeyPatch,
    view: ClusterView | None = None,
    script: list[Step] | None = None,
    scaler_class: type[Scripted] = Scripted,
    backend: Callable[[httpx.Request], httpx.Response] | None = None,
    **settings: Any,
) -> World:
    clock = Clock()
    monkeypatch.setattr(proxy.app, "time", clock)
    scaler = scaler_class(view or world_view(), clock, script)
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if backend is not None:
            return backend(request)
        return httpx.Response(200, json={"served_by": request.url.host, "model": json.loads(request.content)["model"]})

    defaults: dict[str, Any] = {"disconnect_check_seconds": 0.5, "progress_interval_seconds": 5.0}
    defaults.update(settings)
    app = create_app(ProxySettings(**defaults), scaler, transport=httpx.MockTransport(handler))
    return World(clock, scaler, app.test_client(), app.extensions["ibc_proxy"], sent)


@contextlib.contextmanager
def hung_up() -> Iterator[dict[str, socket.socket]]:
    """The WSGI environ's server socket of a connection whose client hung up."""
    server, client = socket.socketpair()
    client.close()
    try:
        yield {"werkzeug.socket": server}
    finally:
        server.close()


def error(status: int, message: str, code: str, type_: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}


# ----- the answers of the cold path -----


def test_a_cold_model_that_fits_is_asked_for_once_waited_for_and_served(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, script=[[], [], [BACKEND_C]])
    resp = w.client.post("/v1/chat/completions?v=1", json={"model": "model-c"}, headers={"X-Trace": "t-1"})
    assert (resp.status_code, resp.get_json()) == (200, {"served_by": "10.0.0.3", "model": "model-c"})
    assert resp.headers["Content-Length"] == str(len(resp.get_data()))  # read whole, not relayed
    ((sent),) = w.sent
    assert (sent.method, str(sent.url), sent.headers["x-trace"]) == (
        "POST",
        f"{BACKEND_C}/v1/chat/completions?v=1",
        "t-1",
    )
    assert json.loads(sent.content) == {"model": "model-c"}
    assert w.scaler.scale_calls == [("default/model-c", 1)]
    assert w.scaler.waited == [0.5, 0.5, 0.5]  # polled every disconnect check until the backend came
    # The idle clock: the request's arrival, then busy again from when it was served (not when it came).
    assert w.scaler.touched == [("default/model-c", T0), ("default/model-c", T0 + 1.0)]
    assert w.requests_counted("model-c") == {"200": 1.0}
    assert w.metric("ibc_proxy_cold_start_seconds_count", model="model-c") == 1.0
    assert w.nothing_held()


def test_a_long_answer_after_a_cold_start_keeps_its_model_busy_until_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    clocks: list[Clock] = []

    def slow(request: httpx.Request) -> httpx.Response:
        clocks[0].advance(2.0)  # the model takes 2 s to answer
        return httpx.Response(200, json={"ok": True})

    w = make_world(monkeypatch, script=[[BACKEND_C]], backend=slow)
    clocks.append(w.clock)
    assert w.post("model-c").get_json() == {"ok": True}
    key = "default/model-c"
    assert w.scaler.touched == [(key, T0), (key, T0), (key, T0 + 2.0)]  # came; served from; answered at


def test_a_plain_cold_request_answered_as_a_stream_is_relayed(monkeypatch: pytest.MonkeyPatch) -> None:
    sse = b"data: [DONE]\n\n"
    backend = lambda r: httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=sse)  # noqa: E731
    w = make_world(monkeypatch, script=[[BACKEND_C]], backend=backend)
    resp = w.post("model-c")
    assert (resp.status_code, resp.get_data(), resp.headers.get("Content-Length")) == (200, sse, None)
    assert w.proxy.upstream.outstanding() == {}


def test_a_held_request_shows_in_the_models_queue_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    depth: list[float | None] = []
    w.scaler.script = [lambda: depth.append(w.metric("ibc_proxy_queue_depth", model="model-c")) or [BACKEND_C]]
    assert w.post("model-c").status_code == 200
    assert depth == [1.0]
    assert w.metric("ibc_proxy_queue_depth", model="model-c") == 0.0


def test_a_full_waiting_room_names_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, queue_size=1)
    with w.proxy.cold.enter("default/model-c", "model-c"):
        resp = w.post("model-c")
    message = "1 requests already wait for model-c to start (the limit per model); retry shortly"
    assert resp.get_json() == error(503, message, "queue_full", "service_unavailable")
    assert w.scaler.scale_calls == []


@pytest.mark.parametrize(
    ("replicas", "scaled"),
    [
        pytest.param(0, ("default/model-d", 1), id="stopped-asks-for-one"),
        pytest.param(2, ("default/model-d", 2), id="two-wanted-asks-for-two"),
    ],
)
def test_the_start_asked_for_is_the_models_replicas_and_at_least_one(
    monkeypatch: pytest.MonkeyPatch, replicas: int, scaled: tuple[str, int]
) -> None:
    d = Model("default", "model-d", 20 * GI, "model-d", POOL, 600.0, replicas)
    w = make_world(monkeypatch, world_view(d), script=[[BACKEND_C]])
    assert w.post("model-d").status_code == 200
    assert w.scaler.scale_calls == [scaled]


def test_replicas_that_do_not_fit_together_are_refused_for_the_number_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Model("default", "model-d", 20 * GI, "model-d", POOL, 600.0, 3)  # 3 x 20Gi = 60Gi > 48Gi free
    w = make_world(monkeypatch, world_view(d))
    resp = w.post("model-d")
    assert resp.status_code == 429
    assert resp.get_json()["requested"] == {"model": "model-d", "memory": "20Gi", "replicas": 3}
    assert w.scaler.scale_calls == []


def test_does_not_fit_is_the_explained_429_counted_and_shown_as_the_last_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = make_world(monkeypatch)
    resp = w.post("model-b")
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "480"  # model-a's cooldown ends in 479.5 s
    body = resp.get_json()
    assert body["error"]["code"] == "insufficient_memory"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["retry_after_seconds"] == 480
    assert w.scaler.scale_calls == [] and w.sent == []
    assert w.requests_counted("model-b") == {"429": 1.0}
    assert w.rejections("model-b") == {"insufficient_memory": 1.0}
    refusal = w.last_refusal("default/model-b")
    assert refusal is not None and (refusal["reason"], refusal["message"]) == ("insufficient_memory", body["message"])
    assert w.nothing_held()


class MakesRoom(Scripted):
    """A scaler that can stop idle models for a start (local mode): says so when asked."""

    room = False

    def __init__(self, view: ClusterView, clock: Clock, script: list[Step] | None = None) -> None:
        super().__init__(view, clock, script)
        self.asked: list[tuple[str, int]] = []

    def can_make_room(self, key: str, replicas: int) -> bool:
        self.asked.append((key, replicas))
        return self.room


class HasRoom(MakesRoom):
    room = True


@pytest.mark.parametrize(
    ("scaler_class", "status", "scaled", "asked"),
    [
        pytest.param(Scripted, 429, [], None, id="no-eviction-429"),
        pytest.param(MakesRoom, 429, [], [("default/model-e", 2)], id="cannot-make-room-429"),
        pytest.param(HasRoom, 200, [("default/model-e", 2)], [("default/model-e", 2)], id="makes-room-starts"),
    ],
)
def test_a_scaler_that_can_make_room_gets_the_start_the_budget_alone_refuses(
    monkeypatch: pytest.MonkeyPatch, scaler_class: type[Scripted], status: int, scaled: list[Any], asked: Any
) -> None:
    e = Model("default", "model-e", 30 * GI, "model-e", POOL, 600.0, 2)  # 60Gi: only if model-a goes
    w = make_world(monkeypatch, world_view(e), script=[[BACKEND_C]], scaler_class=scaler_class)
    resp = w.post("model-e")
    assert resp.status_code == status
    assert w.scaler.scale_calls == scaled
    assert getattr(w.scaler, "asked", None) == asked


def test_a_start_that_fits_never_asks_to_make_room(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, script=[[BACKEND_C]], scaler_class=MakesRoom)
    assert w.post("model-c").status_code == 200
    assert w.scaler.asked == []  # type: ignore[attr-defined]


SHUTTING_DOWN = "the proxy is shutting down; model-c was not started here: retry (another replica may serve it)"


def test_while_shutting_down_a_start_is_not_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    w.proxy.shutdown()
    resp = w.post("model-c")
    assert (resp.status_code, resp.headers["Retry-After"]) == (503, "1")
    assert resp.get_json() == error(503, SHUTTING_DOWN, "shutting_down", "service_unavailable")
    assert w.scaler.scale_calls == []
    assert w.rejections("model-c") == {"shutting_down": 1.0}
    assert w.requests_counted("model-c") == {"503": 1.0}


@pytest.mark.parametrize(
    ("settings", "message", "retry_after"),
    [
        pytest.param(
            {"max_held_bytes": 1000, "progress_interval_seconds": 0.2},
            "0 held requests already use 0 MiB (the memory limit of this worker is 0 MiB); retry shortly",
            "1",
            id="held-memory-retry-at-least-1s",
        ),
        pytest.param(
            {"max_held_bytes": HELD_OVERHEAD_BYTES + 10, "progress_interval_seconds": 0.2},
            "0 held requests already use 0 MiB (the memory limit of this worker is 0 MiB); retry shortly",
            "1",
            id="the-body-counts-toward-held-memory",
        ),
        pytest.param(
            {"max_held_bytes": 1000, "progress_interval_seconds": 7.9},
            "0 held requests already use 0 MiB (the memory limit of this worker is 0 MiB); retry shortly",
            "7",
            id="retry-after-the-progress-interval",
        ),
    ],
)
def test_a_full_waiting_room_is_503_queue_full_with_retry_after(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], message: str, retry_after: str
) -> None:
    w = make_world(monkeypatch, **settings)
    resp = w.post("model-c")
    assert (resp.status_code, resp.headers["Retry-After"]) == (503, retry_after)
    assert resp.get_json() == error(503, message, "queue_full", "service_unavailable")
    assert w.rejections("model-c") == {"queue_full": 1.0}
    assert w.requests_counted("model-c") == {"503": 1.0}
    assert w.scaler.scale_calls == []


def denied(message: str, retry: int) -> ScaleDenied:
    from budget import decide_scale

    base = decide_scale(world_view(), "default/model-c", 1, T0)
    return ScaleDenied(
        Decision(**{**base.__dict__, "allowed": False, "reason": "insufficient_memory", "message": message,
                    "retry_after_seconds": retry})
    )  # fmt: skip


@pytest.mark.parametrize(
    ("failure", "status", "headers", "body", "rejected", "log_line"),
    [
        pytest.param(
            denied("webhook says no", 42),
            429,
            {"Retry-After": "42"},
            {"code": "insufficient_memory", "message": "webhook says no", "retry_after_seconds": 42},
            "scale_denied",
            None,
            id="denied-by-the-webhook-429",
        ),
        pytest.param(
            ScalerUnavailable("apiserver down", retry_after_seconds=7),
            503,
            {"Retry-After": "7"},
            {
                "code": "scaler_unavailable",
                "message": "could not start model-c: apiserver down",
                "retry_after_seconds": 7,
                "type": "service_unavailable",
            },
            "scaler_unavailable",
            "scale-up of default/model-c failed: apiserver down",
            id="scaler-unavailable-its-retry",
        ),
        pytest.param(
            ScalerUnavailable("apiserver down"),
            503,
            {"Retry-After": "30"},
            {
                "code": "scaler_unavailable",
                "message": "could not start model-c: apiserver down",
                "retry_after_seconds": 30,
                "type": "service_unavailable",
            },
            "scaler_unavailable",
            "scale-up of default/model-c failed: apiserver down",
            id="scaler-unavailable-default-retry",
        ),
    ],
)
def test_a_start_refused_or_failed_by_the_scaler(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
    status: int,
    headers: dict[str, str],
    body: dict[str, Any],
    rejected: str,
    log_line: str | None,
) -> None:
    def fail(key: str, replicas: int) -> None:
        raise failure

    w = make_world(monkeypatch)
    w.scaler._on_scale_up = fail
    with caplog.at_level(logging.WARNING, logger="proxy.app"):
        resp = w.post("model-c")
    assert resp.status_code == status
    assert {k: resp.headers.get(k) for k in headers} == headers
    error_ = resp.get_json()["error"]
    assert {k: error_.get(k) for k in body} == body
    assert w.rejections("model-c") == {rejected: 1.0}
    assert w.requests_counted("model-c") == {str(status): 1.0}
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.app"] == ([log_line] if log_line else [])
    assert w.nothing_held()
    if status == 429:
        refusal = w.last_refusal("default/model-c")
        assert refusal is not None and refusal["message"] == "webhook says no"
    else:
        assert w.last_refusal("default/model-c") is None


def test_a_streaming_cold_request_gets_its_200_and_sse_headers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, script=[[BACKEND_C]])
    resp = w.post("model-c", stream=True)
    assert resp.status_code == 200
    assert [(k, v) for k, v in resp.headers if k in dict(SSE)] == SSE
    assert w.requests_counted("model-c") == {"200": 1.0}


@pytest.mark.parametrize(
    ("timeout", "message", "waits"),
    [
        pytest.param(2.0, "model-c did not become ready within 2s", [0.5] * 4, id="whole-seconds"),
        pytest.param(2.2, "model-c did not become ready within 2.2s", [0.5] * 4 + [0.2], id="fraction-last-wait-short"),
    ],
)
def test_a_start_longer_than_the_cold_start_timeout_is_504(
    monkeypatch: pytest.MonkeyPatch, timeout: float, message: str, waits: list[float]
) -> None:
    w = make_world(monkeypatch, cold_start_timeout_seconds=timeout)
    resp = w.post("model-c")
    assert resp.status_code == 504
    assert resp.get_json() == error(504, message, "cold_start_timeout", "timeout_error")
    assert w.clock.now == T0 + timeout  # waited exactly the timeout, in disconnect-check steps
    assert w.scaler.waited == waits
    assert w.rejections("model-c") == {"cold_start_timeout": 1.0}
    assert w.requests_counted("model-c") == {"504": 1.0}
    assert w.nothing_held()


def test_a_replica_that_dies_while_starting_is_503_at_once_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dead = ScalerUnavailable("model-c exited with code 3 while starting", retry_after_seconds=11)
    w = make_world(monkeypatch, script=[[], dead])
    with caplog.at_level(logging.WARNING, logger="proxy.app"):
        resp = w.post("model-c")
    assert (resp.status_code, resp.headers["Retry-After"]) == (503, "11")
    message = "could not start model-c: model-c exited with code 3 while starting"
    assert resp.get_json() == error(503, message, "scaler_unavailable", "service_unavailable", retry_after_seconds=11)
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.app"] == [
        "model-c failed to start: model-c exited with code 3 while starting"
    ]
    assert w.rejections("model-c") == {"scaler_unavailable": 1.0}
    assert w.requests_counted("model-c") == {"503": 1.0}
    assert w.nothing_held()


def test_shutting_down_while_waiting_for_a_start_is_503_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    w.scaler.script = [[], lambda: (w.proxy.shutdown(), [])[1]]
    resp = w.post("model-c")
    assert (resp.status_code, resp.headers["Retry-After"]) == (503, "1")
    assert resp.get_json() == error(503, SHUTTING_DOWN, "shutting_down", "service_unavailable")
    assert w.scaler.waited == [0.5, 0.5]
    assert w.nothing_held()


def test_a_start_failing_because_the_process_stops_is_the_shutdown_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    def stopping() -> list[str]:
        w.proxy.shutdown()
        raise ScalerUnavailable("model-c stopped with the proxy")

    w = make_world(monkeypatch)
    w.scaler.script = [stopping]
    resp = w.post("model-c")
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "shutting_down"


def test_a_client_gone_while_waiting_is_logged_499_and_its_place_freed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    w = make_world(monkeypatch)
    with caplog.at_level(logging.INFO, logger="proxy.app"), hung_up() as gone:
        resp = w.post("model-c", **gone)
    assert resp.status_code == 503
    assert resp.get_json() == error(503, "client closed the connection while waiting", "client_closed",
                                    "service_unavailable")  # fmt: skip
    assert w.scaler.waited == [0.5]  # asked once, then saw the client gone
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.app"] == [
        "client waiting for model-c went away after 0.5s"
    ]
    assert w.requests_counted("model-c") == {"499": 1.0}
    assert w.nothing_held()


class Vanishing(Scripted):
    """The model is deleted between routing and the decision: its second look at the view has no model-c."""

    def view(self) -> ClusterView:
        self.looks = getattr(self, "looks", 0) + 1
        if self.looks >= 2:
            view = super().view()
            return ClusterView.build(nodes=view.nodes, models=[m for m in view.models.values() if m.name != "model-c"],
                                     placements=view.placements)  # fmt: skip
        return super().view()


def test_a_model_deleted_while_routed_is_404_not_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, scaler_class=Vanishing)
    resp = w.post("model-c")
    assert resp.status_code == 404
    assert resp.get_json() == {
        "error": {"message": "The model `model-c` does not exist.", "type": "invalid_request_error",
                  "param": "model", "code": "model_not_found"}
    }  # fmt: skip
    assert w.scaler.scale_calls == []


# ----- one plan per second for a storm of refused retries -----


@pytest.mark.parametrize("default", [17, 30], ids=["configured-17s", "default-30s"])
def test_blocked_by_a_model_that_never_stops_retry_after_is_the_configured_default(
    monkeypatch: pytest.MonkeyPatch, default: int
) -> None:
    w = make_world(monkeypatch, world_view(cooldown_a=0), default_retry_after_seconds=default)
    resp = w.post("model-b")
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, str(default))
    assert "model-a never frees its memory on its own (no cooldown)" in resp.get_json()["message"]


def test_a_refusal_is_reused_within_its_second_and_planned_anew_after(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    retries = []
    for at in (0.0, 0.9, 1.0, 1.0):
        w.clock.now = T0 + at
        retries.append(w.post("model-b").headers["Retry-After"])
    # 479.5 s left at T0; at T0+0.9 a new plan would say 479 (ceil 478.6): the second's refusal says 480.
    assert retries == ["480", "480", "479", "479"]


def test_a_refusal_is_not_reused_once_the_view_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, script=[[BACKEND_C]])
    assert w.post("model-b").status_code == 429
    # In the same second, model-a is stopped (its replica gone): the new view has room for model-b.
    view = w.scaler.view()
    models = [replace(m, replicas=0) if m.name == "model-a" else m for m in view.models.values()]
    w.scaler._backends.pop("default/model-a")
    w.scaler.set_view(ClusterView.build(nodes=view.nodes, models=models, placements=[]))
    assert w.post("model-b").status_code == 200
    assert w.scaler.scale_calls == [("default/model-b", 1)]


def test_a_request_behind_a_stuck_scale_up_gives_up_at_the_cold_start_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale-up call hangs (an apiserver that does not answer): a request arriving meanwhile waits for
    it no longer than the cold-start timeout (real time here: 0.2 s), then gets a 503 saying so."""
    entered, release = threading.Event(), threading.Event()

    def stuck(key: str, replicas: int) -> None:
        entered.set()
        release.wait(5)

    w = make_world(monkeypatch, cold_start_timeout_seconds=0.2)
    w.scaler._on_scale_up = stuck
    first: list[int] = []
    leader = threading.Thread(target=lambda: first.append(w.post("model-c").status_code))
    leader.start()
    try:
        assert entered.wait(5)
        resp = w.post("model-c")
    finally:
        release.set()
        leader.join(5)
    message = "could not start model-c: the scale-up of default/model-c did not finish within 0s"
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "30"
    assert resp.get_json() == error(503, message, "scaler_unavailable", "service_unavailable", retry_after_seconds=30)
    assert first == [504]  # the leader's start then timed out too: nothing came up
    assert w.scaler.scale_calls == [("default/model-c", 1)]
