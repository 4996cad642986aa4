"""The proxy as a client sees it: the official `openai` client against the proxy's app served on
127.0.0.1, in front of real `ibc mock-backend` processes, with an in-test scaler.

The scaler here is the StaticScaler (the Kubernetes one is tested in the cluster tier, the local one
in local mode's tests): its scale-up starts a real mock backend process whose /health turns 200 after
its startup delay, exactly the shape of a cold start.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from budget import ClusterView, Model, Node, Placement
from proxy.app import ProxyApp, create_app
from proxy.scaler import ScalerUnavailable
from proxy.settings import ProxySettings, digest_key
from proxy.static_scaler import StaticScaler
from serving.runner import serve_in_thread
from tests.integration.test_mock_backend import MockProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

GI = 2**30


def seed_view(now: float) -> ClusterView:
    """One 128Gi node; model-a (80Gi) runs and has been idle 120 s; model-b (60Gi) cannot fit beside it;
    model-c (40Gi) and model-d (8Gi) are at zero and fit."""
    return ClusterView.build(
        nodes=[Node("node-1", {"inference-pool": "gpu-nodes"}, 128 * GI, "annotation")],
        models=[
            Model("default", "model-a", 80 * GI, "model-a", {"inference-pool": "gpu-nodes"}, 600.0, 1, now - 120),
            Model("default", "model-b", 60 * GI, "model-b", {"inference-pool": "gpu-nodes"}, 600.0, 0),
            Model("default", "model-c", 40 * GI, "model-c", {"inference-pool": "gpu-nodes"}, 600.0, 0),
            Model("default", "model-d", 8 * GI, "model-d", {"inference-pool": "gpu-nodes"}, 600.0, 0),
        ],
        placements=[
            Placement("default/model-a-0", "node-1", 80 * GI, "default/model-a", "u", "Running", now - 120, True)
        ],
    )


class Stack:
    """mock backends + proxy app in a thread + a scaler whose scale-up starts a mock process."""

    def __init__(self, startup_delay: float = 0.5, token_delay: float = 0.0, **settings: Any) -> None:
        self.mocks: list[MockProcess] = []
        self.startup_delay = startup_delay
        self.token_delay = token_delay
        self.model_a = self._mock("model-a", "--token-delay", str(token_delay), "--tokens", "8")
        self.scaler = StaticScaler(
            seed_view(time.time()), {"default/model-a": [self.model_a.url]}, on_scale_up=self._scale_up
        )
        self.start_backends = True
        self.scale_error: Exception | None = None  # raised by the next scale-up (a model that cannot start)
        defaults: dict[str, Any] = {"disconnect_check_seconds": 0.1, "progress_interval_seconds": 0.5}
        defaults.update(settings)
        self.app = create_app(ProxySettings(**defaults), self.scaler)
        self.proxy: ProxyApp = self.app.extensions["ibc_proxy"]
        self.server = serve_in_thread(self.app)
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def _mock(self, model: str, *flags: str) -> MockProcess:
        mock = MockProcess(model, *flags)
        self.mocks.append(mock)
        return mock

    def _scale_up(self, key: str, replicas: int) -> None:
        if self.scale_error is not None:
            raise self.scale_error
        if not self.start_backends:
            return
        name = key.split("/", 1)[1]
        threading.Thread(target=self._start_backend, args=(key, name), daemon=True).start()

    def _start_backend(self, key: str, name: str) -> None:
        mock = self._mock(name, "--startup-delay", str(self.startup_delay), "--token-delay", str(self.token_delay))

        def healthy() -> bool:
            try:
                return httpx.get(f"{mock.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 30, f"{name} healthy", interval=0.05)
        self.scaler.set_backends(key, [mock.url])

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.proxy.upstream.close()
        for mock in self.mocks:
            mock.stop()


@pytest.fixture
def stack_factory() -> Iterator[Any]:
    stacks: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        stack = Stack(**kwargs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture
def stack(stack_factory: Any) -> Stack:
    return stack_factory()


def test_chat_completions_and_embeddings_through_the_proxy(stack: Stack) -> None:
    chat = stack.client.chat.completions.create(model="model-a", messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "model-a"
    assert chat.choices[0].message.content.startswith("tok0 tok1")
    completion = stack.client.completions.create(model="model-a", prompt="hello", max_tokens=3)
    assert completion.choices[0].text == "tok0 tok1 tok2"
    embeddings = stack.client.embeddings.create(model="model-a", input=["a", "b"])
    assert [len(e.embedding) for e in embeddings.data] == [8, 8]


def test_models_list_with_states(stack: Stack) -> None:
    models = {m.id: m for m in stack.client.models.list()}
    assert set(models) == {"model-a", "model-b", "model-c", "model-d"}
    assert models["model-a"].model_extra["state"] == "ready"
    assert models["model-b"].model_extra["state"] == "stopped"
    assert models["model-b"].model_extra["memory"] == "60Gi"


def test_unknown_model_is_a_404_not_found_error(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        stack.client.chat.completions.create(model="nope", messages=[])
    assert caught.value.body["code"] == "model_not_found"


def test_model_that_does_not_fit_gets_the_explained_429_at_once(stack: Stack) -> None:
    started = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as caught:
        stack.client.chat.completions.create(model="model-b", messages=[{"role": "user", "content": "hi"}])
    elapsed = time.perf_counter() - started
    response = caught.value.response
    assert response.status_code == 429
    body = response.json()
    assert body["error"]["code"] == "insufficient_memory"
    assert body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
    assert body["available"] == "48Gi"
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]
    assert "model-b needs 60Gi" in body["message"] and "blocked by model-a" in body["message"]
    assert 470 <= int(response.headers["retry-after"]) <= 480
    assert stack.scaler.scale_calls == []
    assert elapsed < 1.0


def gaps_of(stream: Any) -> tuple[list[float], float, str]:
    """Seconds between content chunks, time to the first one, and the text."""
    started = time.monotonic()
    arrivals, text = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text.append(chunk.choices[0].delta.content)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return gaps, arrivals[0] - started, "".join(text)


def test_streaming_chunks_arrive_as_the_backend_sends_them(stack_factory: Any) -> None:
    stack = stack_factory(token_delay=0.05)
    stream = stack.client.chat.completions.create(
        model="model-a", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=8
    )
    gaps, first, text = gaps_of(stream)
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    # A buffering proxy would deliver everything at the end: gaps near 0 and a first chunk after ~0.4 s.
    assert len(gaps) == 7
    assert 0.035 <= statistics.median(gaps) <= 0.12, gaps
    assert min(gaps) >= 0.02, gaps
    assert first < 0.2


def test_cold_model_is_started_held_and_served(stack: Stack) -> None:
    started = time.monotonic()
    chat = stack.client.chat.completions.create(model="model-c", messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "model-c"
    assert time.monotonic() - started >= stack.startup_delay
    assert stack.scaler.scale_calls == [("default/model-c", 1)]
    assert stack.proxy.cold.waiting() == {}


def test_streaming_cold_start_shows_progress_then_streams(stack_factory: Any) -> None:
    stack = stack_factory(startup_delay=1.2, token_delay=0.02)
    with httpx.stream(
        "POST",
        f"{stack.server.url}/v1/chat/completions",
        timeout=30,
        json={"model": "model-d", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_text()
        first = next(chunks)
        assert first.startswith(": waiting for model-d to start")
        rest = "".join(chunks)
    assert ": waiting for model-d to start (" in rest  # progress while it starts
    assert rest.rstrip().endswith("data: [DONE]")
    # The openai client ignores the comments and reads the stream as usual.
    stream = stack.client.chat.completions.create(model="model-d", messages=[], stream=True, max_tokens=3)
    assert gaps_of(stream)[2] == "tok0 tok1 tok2"


def test_fifty_concurrent_requests_during_a_cold_start_are_all_served(stack_factory: Any) -> None:
    stack = stack_factory(startup_delay=1.0)

    def ask(i: int) -> str:
        chat = stack.client.chat.completions.create(
            model="model-c", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=2
        )
        return chat.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert answers == ["tok0 tok1"] * 50
    assert stack.scaler.scale_calls == [("default/model-c", 1)]
    assert stack.proxy.cold.waiting() == {}
    metrics = httpx.get(f"{stack.server.url}/metrics").text
    assert 'ibc_proxy_requests_total{model="model-c",status="200"} 50.0' in metrics
    assert 'ibc_proxy_cold_start_seconds_count{model="model-c"} 1.0' in metrics


def test_queue_full_is_503_queue_full(stack_factory: Any) -> None:
    stack = stack_factory(queue_size=1)
    stack.start_backends = False
    held: list[int] = []
    holder = threading.Thread(
        target=lambda: held.append(
            httpx.post(f"{stack.server.url}/v1/chat/completions", json={"model": "model-c"}, timeout=30).status_code
        )
    )
    holder.start()
    assert wait_until(lambda: stack.proxy.cold.waiting().get("default/model-c") == 1)
    with pytest.raises(openai.InternalServerError) as caught:
        stack.client.chat.completions.create(model="model-c", messages=[])
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "queue_full"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # The request that holds the place is served once the model is up.
    stack.start_backends = True
    stack._scale_up("default/model-c", 1)
    holder.join(30)
    assert held == [200]


def test_cold_start_timeout_is_504(stack_factory: Any) -> None:
    stack = stack_factory(cold_start_timeout_seconds=0.6)
    stack.start_backends = False
    with pytest.raises(openai.InternalServerError) as caught:
        stack.client.chat.completions.create(model="model-c", messages=[])
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "cold_start_timeout"
    assert stack.proxy.cold.waiting() == {}


def test_streaming_cold_start_timeout_raises_in_the_openai_client(stack_factory: Any) -> None:
    stack = stack_factory(cold_start_timeout_seconds=0.6)
    stack.start_backends = False
    stream = stack.client.chat.completions.create(model="model-c", messages=[], stream=True)
    with pytest.raises(openai.APIError, match="did not become ready"):
        list(stream)


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_a_client_that_goes_away_releases_its_place(stack_factory: Any, streaming: bool) -> None:
    stack = stack_factory(queue_size=1)
    stack.start_backends = False
    body = {"model": "model-c", "messages": [], "stream": streaming}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the model is still starting
        with httpx.stream("POST", f"{stack.server.url}/v1/chat/completions", json=body, timeout=0.5) as resp:
            for _ in resp.iter_bytes():
                pass
    assert wait_until(lambda: stack.proxy.cold.waiting() == {}, timeout=5), stack.proxy.cold.waiting()
    # The place is free again: the next request is held (not refused) and served once the model is up.
    result: list[str] = []
    later = threading.Thread(
        target=lambda: result.append(
            stack.client.chat.completions.create(model="model-c", messages=[], max_tokens=1).model
        )
    )
    later.start()
    assert wait_until(lambda: stack.proxy.cold.waiting().get("default/model-c") == 1)
    stack.start_backends = True
    stack._scale_up("default/model-c", 1)
    later.join(30)
    assert result == ["model-c"]


def test_upstream_down_is_a_502_in_the_openai_shape(stack: Stack) -> None:
    stack.model_a.stop()
    with pytest.raises(openai.InternalServerError) as caught:
        stack.client.chat.completions.create(model="model-a", messages=[])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"


HI = [{"role": "user", "content": "hi"}]


def _never_fits(stack: Stack) -> None:
    view = stack.scaler.view()
    huge = Model("default", "huge", 60 * GI, "huge", {"inference-pool": "gpu-nodes"}, 600.0, 3)
    stack.scaler.set_view(
        ClusterView.build(nodes=view.nodes, models=[*view.models.values(), huge], placements=view.placements)
    )


def _cannot_start(stack: Stack) -> None:
    stack.scale_error = ScalerUnavailable("exited with code 1: CUDA out of memory", retry_after_seconds=7)


def _stream_error(stack: Stack) -> None:
    stack.scale_error = None
    stack.start_backends = False


# id: (settings, setup, call, exception, status, code, message fragment, retry-after header)
ERRORS = {
    "400-bad-stream-flag": ({}, None, lambda c: c.chat.completions.create(model="model-a", messages=HI,
                                                                            extra_body={"stream": "yes"}),
                           openai.BadRequestError, 400, "invalid_type", "`stream` must be true or false", None),
    "401-wrong-key": ({"api_key_digests": frozenset({digest_key("right")})}, None,
                      lambda c: c.chat.completions.create(model="model-a", messages=HI),
                      openai.AuthenticationError, 401, "invalid_api_key", "missing or invalid API key", None),
    "404-unknown-model": ({}, None, lambda c: c.chat.completions.create(model="nope", messages=HI),
                          openai.NotFoundError, 404, "model_not_found", "The model `nope` does not exist.", None),
    "413-body-too-large": ({"max_body_bytes": 2048}, None,
                           lambda c: c.chat.completions.create(model="model-a",
                                                               messages=[{"role": "user", "content": "x" * 5000}]),
                           openai.APIStatusError, 413, "request_too_large", "request body larger than 2048 bytes",
                           None),
    "429-does-not-fit-now": ({}, None, lambda c: c.chat.completions.create(model="model-b", messages=HI),
                             openai.RateLimitError, 429, "insufficient_memory",
                             "model-b needs 60Gi in pool inference-pool=gpu-nodes; 48Gi available; "
                             "blocked by model-a (80Gi, idle 120s)", "480"),
    "429-never-fits": ({}, _never_fits, lambda c: c.chat.completions.create(model="huge", messages=HI),
                       openai.RateLimitError, 429, "exceeds_pool_capacity", "it can never fit without more nodes",
                       None),
    "503-cannot-start": ({}, _cannot_start, lambda c: c.chat.completions.create(model="model-c", messages=HI),
                         openai.InternalServerError, 503, "scaler_unavailable",
                         "could not start model-c: exited with code 1: CUDA out of memory", "7"),
    "504-cold-start-timeout": ({"cold_start_timeout_seconds": 0.5}, _stream_error,
                               lambda c: c.chat.completions.create(model="model-c", messages=HI),
                               openai.InternalServerError, 504, "cold_start_timeout",
                               "model-c did not become ready within 0.5s", None),
    "sse-error-event": ({"cold_start_timeout_seconds": 0.5}, _stream_error,
                        lambda c: list(c.chat.completions.create(model="model-c", messages=HI, stream=True)),
                        openai.APIError, None, "cold_start_timeout", "model-c did not become ready within 0.5s",
                        None),
}


@pytest.mark.parametrize("case", list(ERRORS.values()), ids=list(ERRORS))
def test_every_error_reaches_the_openai_client_with_its_message_and_fields(stack_factory: Any, case: Any) -> None:
    settings, setup, call, exc_type, status, code, fragment, retry_after = case
    stack = stack_factory(**settings)
    if setup is not None:
        setup(stack)
    client = stack.client.with_options(api_key="wrong") if "api_key_digests" in settings else stack.client
    with pytest.raises(exc_type) as caught:
        call(client)
    exc = caught.value
    assert isinstance(exc.body, dict), exc.body
    assert exc.body["code"] == code
    assert fragment in exc.body["message"] and fragment in str(exc), str(exc)
    assert isinstance(exc.body["type"], str) and "param" in exc.body
    if status is not None:
        assert exc.status_code == status
        header = exc.response.headers.get("retry-after")
        if retry_after == "480":  # model-a's cooldown ends in 480 s, less the moments this test took
            assert 470 <= int(header) <= 480
        else:
            assert header == retry_after
    if code == "insufficient_memory":  # the numbers, where an SDK keeps them
        assert exc.body["available"] == "48Gi"
        assert exc.body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
        assert exc.body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]
        assert 470 <= exc.body["retry_after_seconds"] <= 480
    if code == "scaler_unavailable":
        assert exc.body["retry_after_seconds"] == 7


def test_a_request_that_can_never_fit_is_not_retried_by_the_default_client(stack: Stack) -> None:
    _never_fits(stack)
    client = openai.OpenAI(base_url=f"{stack.server.url}/v1", api_key="unused", timeout=30)  # 2 retries by default
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="huge", messages=HI)
    client.close()
    sent = stack.proxy.metrics.registry.get_sample_value("ibc_proxy_requests_total", {"model": "huge", "status": "429"})
    assert sent == 1  # x-should-retry: false, and no Retry-After: the SDK gives up at once
