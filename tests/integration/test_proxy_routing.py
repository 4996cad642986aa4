"""Prefix-affinity routing through the real proxy: the official `openai` client, three real
`ibc mock-backend` replicas of one model (static backends), each with its simulated prefix cache.

What a user notices: prompts that share a prefix are answered by the replica that holds it (the
replica's own vllm:prefix_cache_hits says so), and a replica that is saturated does not hold up a
request just because it has the prefix.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from budget import ClusterView, Model, Node
from proxy.app import ProxyApp, create_app
from proxy.settings import ProxySettings
from proxy.static_scaler import StaticScaler
from serving.runner import serve_in_thread
from tests.integration.test_mock_backend import MockProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

GI = 2**30
KEY = "default/model-a"
SYSTEMS = [f"You are assistant number {i}. Answer briefly, cite sources, never guess. " * 4 for i in range(6)]


class Replicas:
    """Three mock replicas of model-a behind the proxy's app in a thread."""

    def __init__(self, *mock_flags: str, **settings: Any) -> None:
        self.cleanup = contextlib.ExitStack()  # each part is stopped even if a later one fails to start
        self.mocks = [MockProcess("model-a", *mock_flags) for _ in range(3)]
        for mock in self.mocks:
            self.cleanup.callback(mock.stop)
        view = ClusterView.build(
            nodes=[Node("node-1", {}, 128 * GI, "annotation")],
            models=[Model("default", "model-a", 8 * GI, "model-a", {}, 600.0, 3)],
            placements=[],
        )
        self.scaler = StaticScaler(view, {KEY: [m.url for m in self.mocks]})
        self.app = create_app(ProxySettings(expose_backend_header=True, **settings), self.scaler)
        self.proxy: ProxyApp = self.app.extensions["ibc_proxy"]
        self.cleanup.callback(self.proxy.upstream.close)
        self.server = serve_in_thread(self.app)
        self.cleanup.callback(self.server.stop)
        self.client = openai.OpenAI(base_url=f"{self.server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        self.cleanup.callback(self.client.close)

    def ask(self, system: str, question: str) -> str:
        """One chat completion; returns the replica (base URL) that answered it."""
        raw = self.client.chat.completions.with_raw_response.create(
            model="model-a",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
        )
        assert raw.parse().choices[0].message.content == "tok0 tok1 tok2 tok3"
        return raw.headers["x-ibc-backend"]

    def routes(self) -> dict[str, float]:
        """The proxy's own ibc_proxy_prefix_routes_total for model-a, by outcome."""
        text = httpx.get(f"{self.server.url}/metrics", timeout=5).text
        return {
            s.labels["outcome"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "ibc_proxy_prefix_routes_total" and s.labels["model"] == "model-a"
        }

    def hits(self) -> dict[str, tuple[float, float]]:
        """Per replica: (prefix-cache hit tokens, queried tokens), from its own /metrics."""
        out = {}
        for mock in self.mocks:
            text = httpx.get(f"{mock.url}/metrics", timeout=5).text
            samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            out[mock.url] = (samples["vllm:prefix_cache_hits_total"], samples["vllm:prefix_cache_queries_total"])
        return out

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup.close()


def test_same_prefix_goes_to_the_replica_that_holds_it() -> None:
    with Replicas() as stack:
        same_prefix_same_replica(stack)


def same_prefix_same_replica(stack: Replicas) -> None:
    homes: dict[int, set[str]] = {i: set() for i in range(len(SYSTEMS))}
    for round_ in range(4):
        for i, system in enumerate(SYSTEMS):
            homes[i].add(stack.ask(system, f"question {round_}"))
    assert all(len(h) == 1 for h in homes.values()), f"each prefix stays on one replica: {homes}"
    assert len(set().union(*homes.values())) >= 2, "different prefixes spread over the replicas"
    # Every prompt after a prefix's first finds its system prompt cached: 288 characters of it lead the
    # prompt, 4 full blocks of 64 = 64 simulated tokens, for 3 rounds x 6 prefixes.
    assert sum(hits for hits, _ in stack.hits().values()) == 3 * 6 * 64
    assert stack.routes() == {"new": 6, "affinity": 18}, "the proxy's metric says why each went where it did"


def test_least_outstanding_spreads_a_prefix_and_misses_the_caches() -> None:
    """The contrast the routing exists for: without it the same prefix is prefilled on every replica."""
    with Replicas(routing="least-outstanding") as stack:
        served = {stack.ask(SYSTEMS[0], f"question {i}") for i in range(6)}
        assert len(served) == 3
        assert all(queries > 0 for _, queries in stack.hits().values())


def test_a_saturated_replica_passes_its_prefix_to_another() -> None:
    with Replicas("--max-running", "1", "--latency", "1.0", prefix_max_in_flight=1) as stack:
        first: dict[str, str] = {}
        runner = threading.Thread(target=lambda: first.setdefault("backend", stack.ask(SYSTEMS[0], "slow one")))
        runner.start()
        wait_until(lambda: sum(stack.proxy.upstream.outstanding().values()) == 1, 10, "the first request in flight")
        second = stack.ask(SYSTEMS[0], "while the first runs")
        runner.join(15)
        assert first["backend"] != second, "the saturated replica's prefix went to another replica"
        assert stack.ask(SYSTEMS[0], "after both") == second, "the prefix now lives where it was served last"
        assert stack.routes() == {"new": 1, "yielded": 1, "affinity": 1}
