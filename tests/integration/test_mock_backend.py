"""`ibc mock-backend` as a real subprocess: health gating, keep-alive, SSE pacing, bad input.

The mock is the baseline of every proxy benchmark and the model server of the integration tests, so
what these check is what those rely on: it tells when it is ready, keeps connections open, and sends
each streamed token as its own network write at the configured pace.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.waiting import wait_until

pytestmark = pytest.mark.integration

_LISTENING = re.compile(r"listening on (http://\S+)")


class MockProcess:
    """A running `ibc mock-backend`; `url` is its base URL. Stopped by `stop()` (SIGTERM, then SIGKILL)."""

    def __init__(self, model: str, *flags: str) -> None:
        argv = [sys.executable, "-m", "ibc", "mock-backend", "--bind", "127.0.0.1:0", "--model", model, *flags]
        self.model = model
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            match = _LISTENING.search(line)
            if match:
                self.url = match.group(1)
                break
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mock backend did not start: {line!r}")
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def mock_factory() -> Iterator[Any]:
    started: list[MockProcess] = []

    def start(model: str, *flags: str) -> MockProcess:
        mock = MockProcess(model, *flags)
        started.append(mock)
        return mock

    yield start
    for mock in started:
        mock.stop()


def request(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_health_is_503_until_the_startup_delay_then_200(mock_factory: Any) -> None:
    mock = mock_factory("m", "--startup-delay", "0.8")
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=5)
    assert request(conn, "GET", "/health")[0] == 503
    assert request(conn, "POST", "/v1/chat/completions", {"model": "m"})[0] == 503
    wait_until(lambda: request(conn, "GET", "/health")[0] == 200, 5, "the end of the startup delay")
    assert request(conn, "GET", "/health") == (200, b'{"status":"ok"}')


def test_many_requests_on_one_keep_alive_connection(mock_factory: Any) -> None:
    mock = mock_factory("m")
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=5)
    for _ in range(50):
        status, body = request(conn, "POST", "/v1/chat/completions", {"model": "m", "messages": []})
        assert status == 200 and json.loads(body)["model"] == "m"
    assert conn.sock is not None, "the connection stayed open"


def test_streamed_tokens_arrive_one_by_one_at_the_token_delay(mock_factory: Any) -> None:
    mock = mock_factory("m", "--token-delay", "0.05", "--tokens", "6")
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=5)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({"model": "m", "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    arrivals = []
    events = []
    buffer = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        arrivals.append(time.monotonic())
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append(event)
    assert events[-1] == b"data: [DONE]"
    content = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == "tok0 tok1 tok2 tok3 tok4 tok5"
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) >= 7, "one network write per token"
    assert sorted(gaps)[len(gaps) // 2] >= 0.035


def test_bad_json_is_400_and_the_server_keeps_serving(mock_factory: Any) -> None:
    mock = mock_factory("m")
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=5)
    status, body = request(conn, "POST", "/v1/chat/completions", b"{nope")
    assert status == 400 and json.loads(body)["error"]["code"] == 400
    assert request(conn, "POST", "/v1/embeddings", {"model": "m", "input": "x"})[0] == 200


def test_garbage_request_line_closes_only_that_connection(mock_factory: Any) -> None:
    import socket

    mock = mock_factory("m")
    with socket.create_connection((mock.host, mock.port), timeout=5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=5)
    assert request(conn, "GET", "/v1/models")[0] == 200


def test_sigterm_exits_cleanly(mock_factory: Any) -> None:
    mock = mock_factory("m")
    assert mock.stop() == 0


def test_bad_flags_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ibc", "mock-backend", "--bind", "nowhere", "--model", "m"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def scrape(mock: MockProcess) -> dict[str, float]:
    """GET /metrics through Prometheus' own parser: sample name -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    finally:
        conn.close()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_max_running_queues_the_rest_and_metrics_say_so(mock_factory: Any) -> None:
    mock = mock_factory("m", "--max-running", "2", "--latency", "0.6", "--kv-capacity-tokens", "100")
    conns = [http.client.HTTPConnection(mock.host, mock.port, timeout=10) for _ in range(5)]
    body = json.dumps({"model": "m", "prompt": "x" * 160, "max_tokens": 10})  # 40 + 10 simulated tokens
    for conn in conns:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    busy = wait_until(
        lambda: (m := scrape(mock))["vllm:num_requests_waiting"] == 3 and m, 5, "2 running, 3 waiting"
    )
    assert busy["vllm:num_requests_running"] == 2
    assert busy["vllm:kv_cache_usage_perc"] == 1.0  # 2 x 50 tokens of a 100-token cache
    answers = [conn.getresponse() for conn in conns]
    assert [a.status for a in answers] == [200] * 5
    assert all(json.loads(a.read())["model"] == "m" for a in answers)
    idle = scrape(mock)
    assert (idle["vllm:num_requests_running"], idle["vllm:num_requests_waiting"]) == (0, 0)
    assert idle["vllm:kv_cache_usage_perc"] == 0


def test_a_client_that_leaves_the_queue_frees_its_place(mock_factory: Any) -> None:
    mock = mock_factory("m", "--max-running", "1", "--latency", "1.5")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    first = http.client.HTTPConnection(mock.host, mock.port, timeout=10)
    first.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    leaving = http.client.HTTPConnection(mock.host, mock.port, timeout=10)
    leaving.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    wait_until(lambda: scrape(mock)["vllm:num_requests_waiting"] == 1, 5, "the second request to wait")
    leaving.close()
    wait_until(lambda: scrape(mock)["vllm:num_requests_waiting"] == 0, 5, "the queue to forget the gone client")
    assert scrape(mock)["vllm:num_requests_running"] == 1
    assert first.getresponse().status == 200


def test_a_cached_prefix_answers_its_first_token_sooner(mock_factory: Any) -> None:
    mock = mock_factory("m", "--prefill-per-block", "0.1")
    conn = http.client.HTTPConnection(mock.host, mock.port, timeout=10)
    prompt = "The same long system prompt, block after block. " * 16  # 768 characters: 12 blocks of 64

    def first_token_seconds(text: str) -> float:
        started = time.monotonic()
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"model": "m", "prompt": text, "stream": True}),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read1(65536).startswith(b"data: ")
        elapsed = time.monotonic() - started
        resp.read()
        return elapsed

    cold = first_token_seconds(prompt)
    warm = first_token_seconds(prompt)
    assert cold >= 1.2, "12 uncached blocks x 0.1 s"
    assert warm < 0.6, "every block was cached"
    metrics = scrape(mock)
    assert metrics["vllm:prefix_cache_queries_total"] == 2 * 768 / 4
    assert metrics["vllm:prefix_cache_hits_total"] == 768 / 4
