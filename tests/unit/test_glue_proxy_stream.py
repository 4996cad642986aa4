"""A streaming request held for a cold start: the 200 goes out at once, then progress comments, then the
model's stream, or one SSE `error` event saying why not. The whole text a client reads is asserted, on
the fake clock of test_glue_proxy_cold (no sleeps: each wait the scaler is asked for passes on it)."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.scaler import ScalerUnavailable
from tests.unit.test_glue_proxy_cold import BACKEND_C, T0, Clock, Scripted, Step, hung_up, make_world

KEY = "default/model-c"

pytestmark = pytest.mark.unit

TOKENS = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
START = ": waiting for model-c to start\n\n"


def sse_backend(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=TOKENS)


def event(status: int, message: str, code: str, type_: str, **extra: Any) -> str:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}
    return f"event: error\ndata: {json.dumps(body)}\n\n"


@pytest.mark.parametrize(
    ("progress", "script", "comments"),
    [
        pytest.param(1.0, [[BACKEND_C]], "", id="ready-at-the-first-look"),
        pytest.param(1.0, [[], [], [], [], [BACKEND_C]], ": waiting for model-c to start (1s)\n\n"
                     ": waiting for model-c to start (2s)\n\n", id="every-second-of-progress"),
        pytest.param(1.0, [[], [], [], [BACKEND_C]], ": waiting for model-c to start (1s)\n\n",
                     id="no-progress-between-two-seconds"),
        pytest.param(0.25, [[], [], [BACKEND_C]], ": waiting for model-c to start (0s)\n\n"
                     ": waiting for model-c to start (0s)\n\n", id="progress-faster-than-the-disconnect-check"),
    ],
)  # fmt: skip
def test_progress_comments_then_the_models_stream(
    monkeypatch: pytest.MonkeyPatch, progress: float, script: list[Step], comments: str
) -> None:
    w = make_world(monkeypatch, script=script, backend=sse_backend, progress_interval_seconds=progress)
    resp = w.post("model-c", stream=True, headers={"Accept-Encoding": "gzip", "X-Trace": "t-1"})
    assert resp.status_code == 200
    assert resp.get_data() == (START + comments).encode() + TOKENS
    assert w.metric("ibc_proxy_cold_start_seconds_count", model="model-c") == 1.0
    ((request),) = w.sent
    assert (request.method, str(request.url)) == ("POST", f"{BACKEND_C}/v1/chat/completions")
    assert (request.headers["accept-encoding"], request.headers["x-trace"]) == ("identity", "t-1")
    assert [k.lower() for k, _ in request.headers.multi_items()].count("accept-encoding") == 1
    assert json.loads(request.content)["model"] == "model-c"
    assert w.scaler.touches["default/model-c"] == w.clock.now
    assert w.proxy.upstream.outstanding() == {} and w.in_flight() == {}
    assert w.nothing_held()


def test_the_model_is_busy_from_the_start_of_its_stream_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle clock of a held stream: touched when the request came, when the backend started
    answering, and when the stream ended, so a long stream never has its model stopped under it."""
    clocks: list[Clock] = []

    class Slow(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            for i in range(3):
                clocks[0].advance(0.2)
                yield f"data: {i}\n\n".encode()
            clocks[0].advance(0.2)  # the backend takes a moment to end its stream

    def slow(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=Slow())

    w = make_world(monkeypatch, script=[[], [BACKEND_C]], backend=slow)
    clocks.append(w.clock)
    text = w.post("model-c", stream=True).get_data(as_text=True)
    assert text == START + "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    # Came at T0; its backend answered at 0.5 s; streaming: 0.5 s or more since the last touch at 1.1 s; ended 1.3 s.
    assert [(k, round(t - T0, 6)) for k, t in w.scaler.touched] == [(KEY, 0.0), (KEY, 0.5), (KEY, 1.1), (KEY, 1.3)]


def test_a_backend_that_compresses_anyway_is_decoded_for_the_held_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 200 went out without Content-Encoding, so the body must reach the client as plain text."""

    def gzipped(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(gzip.compress(TOKENS)))

    w = make_world(monkeypatch, script=[[BACKEND_C]], backend=gzipped)
    assert w.post("model-c", stream=True).get_data() == START.encode() + TOKENS


def test_the_disconnect_check_paces_the_waits_when_progress_is_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch, script=[[], [], [BACKEND_C]], backend=sse_backend, progress_interval_seconds=5.0)
    assert w.post("model-c", stream=True).get_data() == START.encode() + TOKENS
    assert w.scaler.waited == [0.5, 0.5, 0.5]


class Noting(Scripted):
    """Local mode's scaler says what it did for the start (e.g. which idle model it stopped)."""

    said: str | None = "stopped model-a (idle 12m) to make room"

    def note(self, key: str) -> str | None:
        return self.said if key == "default/model-c" else "wrong key"


class Silent(Noting):
    said = None


@pytest.mark.parametrize(
    ("scaler_class", "said"),
    [
        pytest.param(Scripted, "", id="no-note-method"),
        pytest.param(Silent, "", id="nothing-to-say"),
        pytest.param(Noting, ": stopped model-a (idle 12m) to make room\n\n", id="what-was-done"),
    ],
)
def test_what_the_scaler_did_for_the_start_is_told_to_the_held_stream(
    monkeypatch: pytest.MonkeyPatch, scaler_class: type[Scripted], said: str
) -> None:
    w = make_world(monkeypatch, script=[[BACKEND_C]], backend=sse_backend, scaler_class=scaler_class)
    assert w.post("model-c", stream=True).get_data() == (START + said).encode() + TOKENS


@pytest.mark.parametrize(
    ("script", "settings", "tail", "rejected", "log_line"),
    [
        pytest.param([], {"cold_start_timeout_seconds": 1.2},
                     ": waiting for model-c to start (1s)\n\n"
                     + event(504, "model-c did not become ready within 1.2s", "cold_start_timeout", "timeout_error"),
                     "cold_start_timeout", None, id="timeout"),
        pytest.param([[], ScalerUnavailable("model-c exited with code 3", retry_after_seconds=9)], {},
                     event(503, "could not start model-c: model-c exited with code 3", "scaler_unavailable",
                           "service_unavailable", retry_after_seconds=9),
                     "scaler_unavailable", "model-c failed to start: model-c exited with code 3", id="start-failed"),
        pytest.param([ScalerUnavailable("model-c exited with code 3")], {"default_retry_after_seconds": 17},
                     event(503, "could not start model-c: model-c exited with code 3", "scaler_unavailable",
                           "service_unavailable", retry_after_seconds=17),
                     "scaler_unavailable", "model-c failed to start: model-c exited with code 3",
                     id="start-failed-default-retry"),
    ],
)  # fmt: skip
def test_a_start_that_does_not_come_ends_the_stream_with_one_error_event(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    script: list[Step],
    settings: dict[str, Any],
    tail: str,
    rejected: str,
    log_line: str | None,
) -> None:
    w = make_world(monkeypatch, script=script, progress_interval_seconds=1.0, **settings)
    with caplog.at_level(logging.WARNING, logger="proxy.app"):
        resp = w.post("model-c", stream=True)
    assert resp.status_code == 200
    assert resp.get_data(as_text=True) == START + tail
    assert w.rejections("model-c") == {rejected: 1.0}
    assert w.requests_counted("model-c") == {"200": 1.0}
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.app"] == ([log_line] if log_line else [])
    assert w.sent == []
    assert w.in_flight() == {}
    assert w.nothing_held()


def test_shutting_down_ends_a_held_stream_with_the_shutdown_event(monkeypatch: pytest.MonkeyPatch) -> None:
    w = make_world(monkeypatch)
    w.scaler.script = [lambda: (w.proxy.shutdown(), [])[1]]
    text = w.post("model-c", stream=True).get_data(as_text=True)
    message = "the proxy is shutting down; model-c was not started here: retry (another replica may serve it)"
    assert text == START + event(503, message, "shutting_down", "service_unavailable", retry_after_seconds=1)
    assert w.rejections("model-c") == {"shutting_down": 1.0}
    assert w.in_flight() == {}
    assert w.nothing_held()


def test_a_streaming_client_gone_while_held_gets_nothing_more(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    w = make_world(monkeypatch)
    with caplog.at_level(logging.INFO, logger="proxy.app"), hung_up() as gone:
        text = w.post("model-c", stream=True, **gone).get_data(as_text=True)
    assert text == START
    assert [r.getMessage() for r in caplog.records if r.name == "proxy.app"] == [
        "client waiting for model-c went away after 0.5s"
    ]
    assert w.rejections("model-c") == {}
    assert w.sent == []
    assert w.in_flight() == {}
    assert w.nothing_held()


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


def bad_request(request: httpx.Request) -> httpx.Response:
    return httpx.Response(400, json={"error": {"message": "max_tokens too large"}})


class Breaks(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"h"}}]}\n\n'
        raise httpx.ReadError("connection reset")


def breaks(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=Breaks())


def error_breaks(request: httpx.Request) -> httpx.Response:
    return httpx.Response(500, headers={"Content-Type": "application/json"}, stream=Breaks())


@pytest.mark.parametrize(
    ("backend", "tail", "upstream_error"),
    [
        pytest.param(refused, event(502, "{url} unreachable: connection refused", "upstream_unreachable",
                                    "upstream_error"), "upstream_unreachable", id="backend-refuses"),
        pytest.param(bad_request, event(400, "model-c answered 400: max_tokens too large", "upstream_status",
                                        "invalid_request_error"), None, id="backend-answers-400"),
        pytest.param(breaks, 'data: {"choices":[{"delta":{"content":"h"}}]}\n\n'
                     + event(502, "the model backend broke the stream: connection reset", "upstream_stream_broken",
                             "upstream_error"), "stream_broken", id="stream-broken-midway"),
        pytest.param(error_breaks, event(502, "{url} broke the response: connection reset", "upstream_unreachable",
                                         "upstream_error"), None,
                     id="error-answer-broken-midway"),
    ],
)  # fmt: skip
def test_a_backend_failing_after_the_start_is_an_error_event(
    monkeypatch: pytest.MonkeyPatch, backend: Any, tail: str, upstream_error: str | None
) -> None:
    w = make_world(monkeypatch, script=[[BACKEND_C]], backend=backend)
    text = w.post("model-c", stream=True).get_data(as_text=True)
    assert text == START + tail.replace("{url}", BACKEND_C)
    errors = w.metric("ibc_proxy_upstream_errors_total", model="model-c", kind=upstream_error or "none")
    assert errors == (1.0 if upstream_error else None)
    assert w.proxy.upstream.outstanding() == {}
    assert w.nothing_held()
