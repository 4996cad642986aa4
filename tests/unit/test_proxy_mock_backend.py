"""The mock backend's answers, without sockets: what the OpenAI client (and the proxy's tests) rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mockbackend.server import MockBackend, MockSettings, _Request
from serving.bind import parse_bind

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def post(backend: MockBackend, path: str, body: Any) -> tuple[Any, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return backend.route(_Request("POST", path, True, raw))


@pytest.fixture
def backend() -> MockBackend:
    return MockBackend(MockSettings(model="m", tokens=4, embedding_dim=3))


def test_chat_completion_shape(backend: MockBackend) -> None:
    status, body = post(backend, "/v1/chat/completions", {"model": "m", "messages": []})
    out = json.loads(body)
    assert status == 200
    assert out["object"] == "chat.completion" and out["model"] == "m"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3"}
    assert out["usage"]["completion_tokens"] == 4
    _, again = post(backend, "/v1/chat/completions", {"model": "m", "messages": []})
    assert json.loads(again)["id"] != out["id"], "every answer has its own id"


def test_max_tokens_sets_the_length(backend: MockBackend) -> None:
    _, body = post(backend, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
    out = json.loads(body)
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "tok0 tok1"


def test_embeddings_are_deterministic_per_input(backend: MockBackend) -> None:
    _, body = post(backend, "/v1/embeddings", {"model": "m", "input": ["a", "b", "a"]})
    data = json.loads(body)["data"]
    assert [len(d["embedding"]) for d in data] == [3, 3, 3]
    assert data[0]["embedding"] == data[2]["embedding"] != data[1]["embedding"]
    assert all(-1 <= v <= 1 for d in data for v in d["embedding"])


def test_streaming_plan_has_one_event_per_token_then_done(backend: MockBackend) -> None:
    kind, plan = post(
        backend, "/v1/chat/completions", {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    )
    assert kind == "stream"
    events, final = backend.stream_events(plan)
    assert len(events) == 1 + 4  # the role, then one per token
    assert all(e.startswith(b"data: {") and e.endswith(b"\n\n") for e in events)
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "tok0 tok1 tok2 tok3"
    assert b'"usage":{"prompt_tokens":8,"completion_tokens":4' in final
    assert final.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        pytest.param("/v1/chat/completions", {"model": "other"}, 404, id="wrong-model"),
        pytest.param("/v1/chat/completions", b"{bad", 400, id="bad-json"),
        pytest.param("/v1/chat/completions", b"[]", 400, id="not-an-object"),
        pytest.param("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, 400, id="nested-too-deep"),
        pytest.param("/v1/nothing", {"model": "m"}, 404, id="unknown-endpoint"),
        pytest.param(
            "/v1/chat/completions",
            {"model": "m", "stream_options": 3, "stream": True},
            "stream",
            id="odd-stream-options-tolerated",
        ),
    ],
)
def test_bad_requests(backend: MockBackend, path: str, body: Any, status: Any) -> None:
    assert post(backend, path, body)[0] == status


def test_health_is_503_until_the_startup_delay_passed() -> None:
    clock = Clock()
    backend = MockBackend(MockSettings(model="m", startup_delay_seconds=2), clock=clock)
    health = _Request("GET", "/health", True, b"")
    assert backend.route(health) == (503, b'{"status":"starting"}')
    assert post(backend, "/v1/chat/completions", {"model": "m"})[0] == 503
    clock.now += 2
    assert backend.route(health) == (200, b'{"status":"ok"}')
    assert post(backend, "/v1/chat/completions", {"model": "m"})[0] == 200


def test_models_list(backend: MockBackend) -> None:
    status, body = backend.route(_Request("GET", "/v1/models", True, b""))
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == ["m"]


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        pytest.param("127.0.0.1:8001", ("127.0.0.1", 8001), id="ipv4"),
        pytest.param("[::1]:0", ("::1", 0), id="ipv6"),
        pytest.param(":9000", ("0.0.0.0", 9000), id="all-interfaces"),
    ],
)
def test_parse_bind(bind: str, expected: tuple[str, int]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["localhost", "h:port", "h:70000"])
def test_parse_bind_rejects(bind: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind(bind)
