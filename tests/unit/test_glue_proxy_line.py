"""A request that does not fit, from a client that asked to wait (`X-IBC-Max-Wait`, or the model's
max_wait): its place in its pool's line, its turn when room appears, the 429 when the wait runs out,
and what a streaming client reads meanwhile (its position and the budget's expected start).

The line's own waits are real but short: a wait meant to run out is a few hundredths of a second, a
turn comes at the first check (a broken turn fails after the 2 s asked for, not at the test's timeout);
the cold start after a turn runs on test_glue_proxy_cold's fake clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from budget import ClusterView, Model, decide_scale
from tests.unit.test_glue_proxy_cold import (
    BACKEND_C,
    GI,
    POOL,
    SHUTTING_DOWN,
    SSE,
    T0,
    Clock,
    Scripted,
    Step,
    World,
    error,
    hung_up,
    make_world,
    world_view,
)

pytestmark = pytest.mark.unit

MODEL_B_REFUSAL_RETRY = "480"
LINE = "inference-pool=gpu-nodes"  # the pool's line: model-b's node selector


class RoomLater(Scripted):
    """Local mode's scaler: cannot make room when the request arrives, can from its `room_from`-th ask on
    (an idle model's eviction became possible). Records every (key, replicas) asked."""

    room_from = 2

    def __init__(self, view: ClusterView, clock: Clock, script: list[Step] | None = None) -> None:
        super().__init__(view, clock, script)
        self.asked: list[tuple[str, int]] = []

    def can_make_room(self, key: str, replicas: int) -> bool:
        self.asked.append((key, replicas))
        return len(self.asked) >= self.room_from


class NeverRoom(RoomLater):
    room_from = 10**9


def line_world(monkeypatch: pytest.MonkeyPatch, scaler_class: type[Scripted] = RoomLater, **kw: Any) -> World:
    settings: dict[str, Any] = {"disconnect_check_seconds": 0.01}
    settings.update(kw)
    return make_world(monkeypatch, script=[[BACKEND_C]], scaler_class=scaler_class, **settings)


@pytest.mark.parametrize(
    ("max_wait", "header", "status", "asked"),
    [
        pytest.param(0.0, None, 429, 1, id="no-wait-asked-429-at-once"),
        pytest.param(0.0, "0", 429, 1, id="header-zero-429-at-once"),
        pytest.param(0.0, "2", 200, 3, id="header-waits-then-its-turn"),
        pytest.param(0.0, "0.5", 200, 3, id="half-a-second-waits-too"),
        pytest.param(2.0, None, 200, 3, id="models-max-wait-waits"),
        pytest.param(2.0, "0", 429, 1, id="header-zero-overrides-the-model"),
    ],
)
def test_a_client_that_asked_to_wait_gets_its_turn_when_room_appears(
    monkeypatch: pytest.MonkeyPatch, max_wait: float, header: str | None, status: int, asked: int
) -> None:
    b = Model("default", "model-b2", 60 * GI, "model-b2", POOL, 600.0, 0, max_wait_seconds=max_wait)
    w = line_world(monkeypatch)
    w.scaler.set_view(world_view(b))
    resp = w.post("model-b2", headers={} if header is None else {"X-IBC-Max-Wait": header})
    assert resp.status_code == status
    # Asked when refused, then (waiting) whether its turn has room, then again by the start itself.
    assert w.scaler.asked == [("default/model-b2", 1)] * asked  # type: ignore[attr-defined]
    assert w.scaler.scale_calls == ([("default/model-b2", 1)] if status == 200 else [])
    assert w.requests_counted("model-b2") == {str(status): 1.0}
    assert w.nothing_held()


def test_status_shows_who_waits_in_the_pools_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /status's `waiting` as the request is refused, waits for its turn, asks for the start, and
    waits for it (out of the line by then)."""
    w = line_world(monkeypatch)
    seen: list[Any] = []
    asked = w.scaler.can_make_room  # type: ignore[attr-defined]

    def looking(key: str, replicas: int) -> bool:
        seen.append(w.client.get("/status").get_json()["waiting"])
        return bool(asked(key, replicas))

    def started() -> list[str]:  # the start was asked for: its place is given up, the next may try
        seen.append(w.client.get("/status").get_json()["waiting"])
        return [BACKEND_C]

    w.scaler.can_make_room = looking  # type: ignore[attr-defined]
    w.scaler.script = [started]
    assert w.post("model-b", headers={"X-IBC-Max-Wait": "2"}).status_code == 200
    assert seen == [{}, {LINE: ["model-b"]}, {LINE: ["model-b"]}, {}]
    assert w.client.get("/status").get_json()["waiting"] == {}


def test_a_turn_asks_for_room_for_the_replicas_the_refusal_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    e = Model("default", "model-e", 30 * GI, "model-e", POOL, 600.0, 2)
    w = line_world(monkeypatch)
    w.scaler.set_view(world_view(e))
    assert w.post("model-e", headers={"X-IBC-Max-Wait": "2"}).status_code == 200
    assert w.scaler.asked == [("default/model-e", 2)] * 3  # type: ignore[attr-defined]
    assert w.scaler.scale_calls == [("default/model-e", 2)]


class StopsLater(Scripted):
    """model-a stops (its cooldown ended) after the request was refused: from the third look at the view
    on (routing, the refusal, then the line's first check) it holds no memory."""

    def view(self) -> ClusterView:
        self.looks = getattr(self, "looks", 0) + 1
        view = super().view()
        if self.looks < 3 or "default/model-a" not in view.models:
            return view
        self._backends.pop("default/model-a", None)
        rest = [m for m in view.models.values() if m.name != "model-a"]
        self.set_view(ClusterView.build(nodes=view.nodes, models=rest, placements=[]))
        return super().view()


def test_memory_freed_while_waiting_is_the_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """No eviction: the budget alone says it fits once model-a has stopped."""
    w = line_world(monkeypatch, scaler_class=StopsLater)
    resp = w.post("model-b", headers={"X-IBC-Max-Wait": "2"})
    assert resp.status_code == 200
    assert w.scaler.scale_calls == [("default/model-b", 1)]


def test_a_wait_that_runs_out_is_the_429_once_without_waiting_again(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, scaler_class=NeverRoom)
    resp = w.post("model-b", headers={"X-IBC-Max-Wait": "0.03"})
    assert (resp.status_code, resp.headers["Retry-After"]) == (429, MODEL_B_REFUSAL_RETRY)
    assert resp.get_json()["error"]["code"] == "insufficient_memory"
    assert w.requests_counted("model-b") == {"429": 1.0}
    assert w.rejections("model-b") == {"insufficient_memory": 1.0}
    assert w.nothing_held()


@pytest.mark.parametrize(
    "header",
    [pytest.param("soon", id="word"), pytest.param("-1", id="negative"), pytest.param("3601", id="over-an-hour")],
)
def test_a_bad_max_wait_header_is_400_naming_it(monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    w = line_world(monkeypatch)
    resp = w.post("model-b", headers={"X-IBC-Max-Wait": header})
    assert resp.status_code == 400
    message = f"X-IBC-Max-Wait must be a number of seconds from 0 to 3600, got {header!r}"
    assert resp.get_json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": "X-IBC-Max-Wait",
                  "code": "invalid_header"}
    }  # fmt: skip
    assert w.nothing_held()


def test_a_full_held_memory_cap_is_503_before_taking_a_place(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, max_held_bytes=1000, progress_interval_seconds=3.0)
    resp = w.post("model-b", headers={"X-IBC-Max-Wait": "2"})
    assert (resp.status_code, resp.headers["Retry-After"]) == (503, "3")
    message = "held requests already use 0 MiB (the memory limit of this worker is 0 MiB); retry shortly"
    assert resp.get_json() == error(503, message, "queue_full", "service_unavailable")
    assert w.rejections("model-b") == {"queue_full": 1.0}
    assert w.nothing_held()


def test_a_full_line_is_503_and_gives_the_held_bytes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, queue_size=1)
    ahead = w.proxy.line.join(LINE, "model-x", 0)
    try:
        resp = w.post("model-b", headers={"X-IBC-Max-Wait": "2"})
        assert w.proxy.cold.held_bytes() == 0
        assert w.proxy.line.snapshot() == {LINE: ["model-x"]}
    finally:
        ahead.release()
    assert resp.status_code == 503
    message = f"1 requests already wait for memory in pool {LINE} (the limit per pool); retry shortly"
    assert resp.get_json() == error(503, message, "queue_full", "service_unavailable")
    assert (w.rejections("model-b"), w.requests_counted("model-b")) == ({"queue_full": 1.0}, {"503": 1.0})


class ShutsDown(Scripted):
    """The process is told to stop while the request waits in line (asked for room on its turn check)."""

    proxy: Any = None

    def can_make_room(self, key: str, replicas: int) -> bool:
        if self.proxy is not None and self.proxy.line.snapshot():
            self.proxy.shutdown()
        return False


def test_shutting_down_answers_a_request_waiting_in_line(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, scaler_class=ShutsDown)
    w.scaler.proxy = w.proxy  # type: ignore[attr-defined]
    resp = w.post("model-b", headers={"X-IBC-Max-Wait": "2"})
    assert (resp.status_code, resp.headers["Retry-After"]) == (503, "1")
    assert resp.get_json() == error(503, SHUTTING_DOWN.replace("model-c", "model-b"), "shutting_down",
                                    "service_unavailable")  # fmt: skip
    assert w.rejections("model-b") == {"shutting_down": 1.0}
    assert w.nothing_held()


def test_shutting_down_ends_a_stream_waiting_in_line_with_its_event(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, scaler_class=ShutsDown)
    w.scaler.proxy = w.proxy  # type: ignore[attr-defined]
    resp = w.post("model-b", stream=True, headers={"X-IBC-Max-Wait": "2"})
    assert [(k, v) for k, v in resp.headers if k in dict(SSE)] == SSE
    message = SHUTTING_DOWN.replace("model-c", "model-b")
    body = {"message": message, "type": "service_unavailable", "param": None, "code": "shutting_down",
            "retry_after_seconds": 1}  # fmt: skip
    assert resp.get_data(as_text=True) == (
        ": waiting for memory for model-b: position 1 of 1; expected start in about 493s\n\n"
        f"event: error\ndata: {json.dumps({'error': body})}\n\n"
    )
    assert (w.requests_counted("model-b"), w.rejections("model-b")) == ({"200": 1.0}, {"shutting_down": 1.0})
    assert w.nothing_held()


def test_a_client_gone_from_the_line_is_logged_499(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, scaler_class=NeverRoom)
    with hung_up() as gone:
        resp = w.post("model-b", headers={"X-IBC-Max-Wait": "2"}, **gone)
    assert resp.status_code == 503
    assert resp.get_json() == error(503, "client closed the connection while waiting", "client_closed",
                                    "service_unavailable")  # fmt: skip
    assert w.requests_counted("model-b") == {"499": 1.0}
    assert w.nothing_held()


# ----- a streaming client in line: its position and the expected start -----


def comments(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.startswith(": waiting for memory")]


@pytest.mark.parametrize(
    ("view", "model", "expected"),
    [
        pytest.param(world_view(), "model-b", "; expected start in about 493s", id="cooldown-480s-plus-startup-13s"),
        pytest.param(world_view(idle_a=599.5), "model-b", "; expected start in about 14s", id="cooldown-ends-in-1s"),
        pytest.param(world_view(cooldown_a=0), "model-b", "", id="blocked-by-a-model-that-never-stops"),
        pytest.param(world_view(Model("default", "huge", 60 * GI, "huge", POOL, 600.0, 3)), "huge", "",
                     id="never-fits"),
    ],
)  # fmt: skip
def test_a_streaming_client_in_line_reads_its_position_and_expected_start(
    monkeypatch: pytest.MonkeyPatch, view: ClusterView, model: str, expected: str
) -> None:
    w = line_world(monkeypatch, scaler_class=NeverRoom)
    w.scaler.set_view(view)
    resp = w.post(model, stream=True, headers={"X-IBC-Max-Wait": "0.03"})
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert comments(text) == [f": waiting for memory for {model}: position 1 of 1{expected}"]
    refusal = decide_scale(view, f"default/{model}", max(1, view.models[f"default/{model}"].replicas), T0)
    body = {"message": refusal.message, "type": "rate_limit_error", "param": None, "code": refusal.reason}
    assert text.endswith(f"event: error\ndata: {json.dumps({'error': body})}\n\n")
    # One request, one status: the 200 its stream began with (the 429 is an event in it), and the refusal.
    assert (w.requests_counted(model), w.rejections(model)) == ({"200": 1.0}, {"insufficient_memory": 1.0})
    assert w.nothing_held()


def test_a_streaming_client_whose_turn_comes_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch)
    resp = w.post("model-b", stream=True, headers={"X-IBC-Max-Wait": "2"})
    assert resp.status_code == 200
    assert resp.get_data(as_text=True).endswith('{"served_by":"10.0.0.3","model":"model-b"}')
    assert (w.requests_counted("model-b"), w.rejections("model-b")) == ({"200": 1.0}, {})


def test_behind_another_in_line_the_estimate_is_a_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    w = line_world(monkeypatch, scaler_class=NeverRoom)
    ahead = w.proxy.line.join(LINE, "model-x", 5)
    try:
        text = w.post("model-b", stream=True, headers={"X-IBC-Max-Wait": "0.03"}).get_data(as_text=True)
    finally:
        ahead.release()
    assert comments(text) == [": waiting for memory for model-b: position 2 of 2; not before 493s"]


class FreesOnRefusal(Scripted):
    """Memory frees just after the refusal (model-a stopped): by the first estimate the start fits."""

    def can_make_room(self, key: str, replicas: int) -> bool:
        view = self.view()
        if "default/model-a" in view.models:
            self._backends.pop("default/model-a", None)
            rest = [m for m in view.models.values() if m.name != "model-a"]
            self.set_view(ClusterView.build(nodes=view.nodes, models=rest, placements=[]))
        return False


def test_a_start_that_fits_now_is_expected_in_the_models_startup_time(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, script=[[BACKEND_C]], scaler_class=FreesOnRefusal, disconnect_check_seconds=0.01,
                   backend=lambda r: __import__("httpx").Response(200, text="data: [DONE]\n\n"))  # fmt: skip
    text = w.post("model-b", stream=True, headers={"X-IBC-Max-Wait": "2"}).get_data(as_text=True)
    # Its turn: then the cold start's own stream (still a stream), then the model's answer.
    assert text == (
        ": waiting for memory for model-b: position 1 of 1; expected start in about 13s\n\n"
        ": waiting for model-b to start\n\n"
        "data: [DONE]\n\n"
    )
    assert w.scaler.scale_calls == [("default/model-b", 1)]
