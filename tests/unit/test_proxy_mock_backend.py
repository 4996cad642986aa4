"""The mock backend's answers, without sockets: what the OpenAI client (and the proxy's tests) rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mockbackend.server import Generation, MockBackend, MockSettings, _Request
from serving.bind import parse_bind

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def post(backend: MockBackend, path: str, body: Any) -> tuple[Any, Any]:
    """The answer as a client sees it: `(status, body)`, or `("stream", plan)` for a streamed completion."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = backend.route(_Request("POST", path, True, raw))
    if answer[0] == "generate":
        work = answer[1]
        assert isinstance(work, Generation)
        return ("stream", work) if work.stream else (200, backend.completion(work))
    return answer


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


# ----- like vLLM: the simulated prefix cache, the scheduler, GET /metrics -----
A = "a" * 64  # one block each (serving.prompt.BLOCK_BYTES)
B = "b" * 64
C = "c" * 64


def completion_cost(backend: MockBackend, prompt: str) -> Generation:
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    answer = backend.route(_Request("POST", "/v1/completions", True, body))
    assert answer[0] == "generate"
    assert isinstance(answer[1], Generation)
    return answer[1]


@pytest.mark.parametrize(
    ("capacity", "earlier", "prompt", "uncached_blocks", "hit_tokens"),
    [
        pytest.param(64, [], A + B, 2, 0, id="first-sight-misses"),
        pytest.param(64, [A + B], A + B, 0, 32, id="same-prompt-hits-every-block"),
        pytest.param(64, [A + B + C], A + B + "tail", 1, 32, id="shared-leading-blocks-hit-the-tail-is-prefilled"),
        pytest.param(64, [A + B], B + A, 2, 0, id="same-blocks-other-order-miss"),
        pytest.param(64, [A + B], "x" + A + B, 3, 0, id="one-char-ahead-shifts-every-block"),
        pytest.param(64, [A + "short"], A + "other", 1, 16, id="partial-block-never-cached"),
        pytest.param(2, [A + B, C + C], A + B, 2, 0, id="lru-evicted-the-oldest"),
        pytest.param(2, [A, C, A], A, 0, 16, id="lru-a-hit-is-recent-again"),
        pytest.param(0, [A + B], A + B, 2, 0, id="cache-off"),
    ],
)
def test_prefix_cache(capacity: int, earlier: list[str], prompt: str, uncached_blocks: int, hit_tokens: int) -> None:
    backend = MockBackend(MockSettings(model="m", prefix_cache_blocks=capacity, prefill_block_seconds=0.5))
    for text in earlier:
        completion_cost(backend, text)
    hits_before = backend.prefix_hits_tokens
    work = completion_cost(backend, prompt)
    assert work.prefill_seconds == pytest.approx(0.5 * uncached_blocks)
    assert backend.prefix_hits_tokens - hits_before == hit_tokens


def test_chat_prefix_is_roles_and_text_in_order() -> None:
    backend = MockBackend(MockSettings(model="m", prefill_block_seconds=1.0))
    system = {"role": "system", "content": "You are a helpful assistant. " * 10}

    def chat(*messages: Any) -> Generation:
        body = json.dumps({"model": "m", "messages": list(messages)}).encode()
        answer = backend.route(_Request("POST", "/v1/chat/completions", True, body))
        assert isinstance(answer[1], Generation)
        return answer[1]

    first = chat(system, {"role": "user", "content": "question one"})
    second = chat(system, {"role": "user", "content": [{"type": "text", "text": "question two"}]})
    assert second.prefill_seconds < first.prefill_seconds, "the shared system prompt is cached"
    as_user = chat({"role": "user", "content": system["content"]}, {"role": "user", "content": "question one"})
    assert as_user.prefill_seconds == first.prefill_seconds, "the same text under another role is another prefix"


def scrape(backend: MockBackend) -> dict[str, tuple[str, dict[str, str], float]]:
    """The exposition as Prometheus' own parser reads it: family name -> (type, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = backend.route(_Request("GET", "/metrics", True, b""))
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        (sample,) = [s for s in family.samples if not s.name.endswith("_created")]
        out[family.name] = (family.type, sample.labels, sample.value)
    return out


def test_metrics_have_vllms_names_types_and_labels() -> None:
    backend = MockBackend(MockSettings(model='org/m "q"', kv_capacity_tokens=100))
    metrics = scrape(backend)
    assert metrics == {
        "vllm:num_requests_running": ("gauge", {"engine": "0", "model_name": 'org/m "q"'}, 0.0),
        "vllm:num_requests_waiting": ("gauge", {"engine": "0", "model_name": 'org/m "q"'}, 0.0),
        "vllm:kv_cache_usage_perc": ("gauge", {"engine": "0", "model_name": 'org/m "q"'}, 0.0),
        "vllm:prefix_cache_queries": ("counter", {"engine": "0", "model_name": 'org/m "q"'}, 0.0),
        "vllm:prefix_cache_hits": ("counter", {"engine": "0", "model_name": 'org/m "q"'}, 0.0),
    }


def test_hits_never_exceed_queries_with_multibyte_prompts() -> None:
    backend = MockBackend(MockSettings(model="m"))
    for _ in range(3):
        completion_cost(backend, "é" * 200)  # 400 bytes: 6 full blocks, 100 simulated tokens
    metrics = scrape(backend)
    assert metrics["vllm:prefix_cache_queries"][2] == 300
    assert metrics["vllm:prefix_cache_hits"][2] == 2 * 6 * 16


def test_metrics_count_prefix_queries_and_hits_in_tokens() -> None:
    backend = MockBackend(MockSettings(model="m"))
    completion_cost(backend, A + B + "1234")  # 132 characters: 33 tokens, nothing cached yet
    completion_cost(backend, A + B + "5678")  # the two full blocks hit: 32 tokens
    metrics = scrape(backend)
    assert metrics["vllm:prefix_cache_queries"][2] == 66
    assert metrics["vllm:prefix_cache_hits"][2] == 32


def test_scheduler_runs_max_running_and_queues_the_rest_in_order() -> None:
    import asyncio

    backend = MockBackend(MockSettings(model="m", max_running=2, kv_capacity_tokens=100))
    started: list[int] = []

    async def scenario() -> list[tuple[int, int, float]]:
        gates = [asyncio.Event() for _ in range(5)]

        async def generation(i: int) -> None:
            await backend.admit()
            backend.running_kv_tokens += 25
            started.append(i)
            try:
                await gates[i].wait()
            finally:
                backend.running_kv_tokens -= 25
                backend.release()

        async def settle() -> None:
            for _ in range(10):
                await asyncio.sleep(0)

        def state() -> tuple[int, int, float]:
            metrics = scrape(backend)
            return (
                int(metrics["vllm:num_requests_running"][2]),
                int(metrics["vllm:num_requests_waiting"][2]),
                metrics["vllm:kv_cache_usage_perc"][2],
            )

        tasks = [asyncio.create_task(generation(i)) for i in range(5)]
        await settle()
        seen = [state()]
        tasks[3].cancel()  # a client that gave up while waiting leaves the queue
        await settle()
        seen.append(state())
        for i in (1, 0, 2, 4):
            gates[i].set()
            await settle()
            seen.append(state())
        await asyncio.gather(*tasks, return_exceptions=True)
        return seen

    seen = asyncio.run(scenario())
    assert seen == [(2, 3, 0.5), (2, 2, 0.5), (2, 1, 0.5), (2, 0, 0.5), (1, 0, 0.25), (0, 0, 0.0)]
    assert started == [0, 1, 2, 4], "first come, first served; the cancelled one never ran"


def test_no_metrics_is_a_404_like_a_backend_without_prometheus() -> None:
    backend = MockBackend(MockSettings(model="m", serve_metrics=False))
    status, _ = backend.route(_Request("GET", "/metrics", True, b""))  # type: ignore[misc]
    assert status == 404
