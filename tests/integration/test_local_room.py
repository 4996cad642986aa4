"""`ibc local` making room: idle models evicted by policy for another model's request, seen by a user.

The seed scenario (one 128Gi node; model-a 80Gi, model-b 60Gi) with model-a's `evict_idle_after` short
enough for a test: once model-a has been idle that long a request for model-b stops it and is served
(no 429), before that the 429 is as today; a pinned model is never stopped; two concurrent requests for
different models that both need model-a's room evict it once and never hold more declared memory than
the node has (sampled from the live processes).
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.integration import test_local_mode
from tests.integration.test_local_mode import MESSAGES, _until

pytestmark = pytest.mark.integration

GI = 2**30
CAPACITY = 128 * GI
local_factory = test_local_mode.local_factory  # the same `ibc local` subprocess fixture, with its sampler
IDLE_AFTER = 1.5  # seconds; the seed's 60s, shortened


def _model(name, memory, extra="", args=""):
    return (
        f"  - name: {name}\n    memory: {memory}\n    cooldown: 10m\n    stop_grace_period: 5s\n{extra}"
        f"    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model {name} --startup-delay 0.3{args}\n"
    )


def _config(a_extra=f"    evict_idle_after: {IDLE_AFTER}s\n", with_d=False, a_args=""):
    return (
        "nodes:\n  - {name: shadow, memory: 128Gi}\nmodels:\n"
        + _model("model-a", "80Gi", a_extra, a_args)
        + _model("model-b", "60Gi")
        + (_model("model-d", "60Gi") if with_d else "")
    )


def _evictions(local):
    """(evicted model, for model) -> count, from /metrics (the exposition sorts labels: for_model first)."""
    text = httpx.get(f"{local.url}/metrics", timeout=5).text
    pattern = r'^ibc_evictions_total\{for_model="([^"]+)",model="([^"]+)"\} (\S+)$'
    return {(model, for_model): float(v) for for_model, model, v in re.findall(pattern, text, re.M)}


def _serve_a_then_idle(local, idle_seconds):
    """Serve model-a once and return when it has been idle `idle_seconds` (the condition the policy reads)."""
    local.client().chat.completions.create(model="model-a", messages=MESSAGES)
    answered = time.monotonic()
    assert _until(lambda: time.monotonic() - answered >= idle_seconds, timeout=idle_seconds + 5, interval=0.05)


def test_model_a_idle_long_enough_is_stopped_for_model_b(local_factory):
    local = local_factory(_config())
    client = local.client()
    client.chat.completions.create(model="model-a", messages=MESSAGES)
    (a_pid,) = local.backend_pids("model-a")

    # Not idle long enough: the 429 as today, naming model-a, and model-a keeps running.
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="model-b", messages=MESSAGES)
    assert info.value.response.json()["blocking"][0]["model"] == "model-a"
    assert local.state("model-a") == "ready" and local.backend_pids("model-a") == [a_pid]

    answered = time.monotonic()
    assert _until(lambda: time.monotonic() - answered >= IDLE_AFTER + 0.2, timeout=10, interval=0.05)
    body = {"model": "model-b", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{local.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = list(response.iter_lines())
    comments = [e for e in events if e.startswith(":")]
    assert any(re.match(r": stopping model-a \(80Gi, idle \d+s\) to make room for model-b$", c) for c in comments), (
        events
    )
    data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert data and data[0]["model"] == "model-b"
    assert local.state("model-a") == "stopped" and local.state("model-b") == "ready"
    assert local.backend_pids("model-a") == []
    assert _evictions(local) == {("model-a", "model-b"): 1.0}
    assert "stopping model-a (80Gi, idle" in local.log()
    assert local.max_declared <= CAPACITY


def test_model_a_served_again_after_eviction_is_a_cold_start_not_an_error(local_factory):
    local = local_factory(_config())
    _serve_a_then_idle(local, IDLE_AFTER + 0.2)
    client = local.client()
    assert client.chat.completions.create(model="model-b", messages=MESSAGES).model == "model-b"
    # model-b has no evict_idle_after: a request for model-a now gets the 429 naming model-b.
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="model-a", messages=MESSAGES)
    assert info.value.response.json()["blocking"][0]["model"] == "model-b"


def test_a_pinned_model_is_never_stopped(local_factory):
    local = local_factory(_config(a_extra=f"    evict_idle_after: {IDLE_AFTER}s\n    pinned: true\n"))
    _serve_a_then_idle(local, IDLE_AFTER + 0.5)
    (a_pid,) = local.backend_pids("model-a")
    with pytest.raises(openai.RateLimitError) as info:
        local.client().chat.completions.create(model="model-b", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "insufficient_memory"
    assert local.state("model-a") == "ready" and local.backend_pids("model-a") == [a_pid]
    assert _evictions(local) == {}


def test_a_higher_priority_model_is_never_stopped_for_a_lower_one(local_factory):
    local = local_factory(_config(a_extra=f"    evict_idle_after: {IDLE_AFTER}s\n    priority: 1\n"))
    _serve_a_then_idle(local, IDLE_AFTER + 0.5)
    with pytest.raises(openai.RateLimitError):
        local.client().chat.completions.create(model="model-b", messages=MESSAGES)
    assert local.state("model-a") == "ready"


def test_a_model_serving_a_request_is_never_stopped(local_factory):
    local = local_factory(_config(a_args=" --latency 4"))  # every answer of model-a takes 4 s
    client = local.client()
    client.chat.completions.create(model="model-a", messages=MESSAGES)
    with ThreadPoolExecutor(1) as pool:
        began = time.monotonic()
        slow = pool.submit(client.chat.completions.create, model="model-a", messages=MESSAGES)
        # By the idle clock model-a is evictable now (no request began for IDLE_AFTER), but one is in flight.
        assert _until(lambda: time.monotonic() - began >= IDLE_AFTER + 0.5, timeout=10, interval=0.05)
        assert not slow.done()
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="model-b", messages=MESSAGES)
        assert slow.result(timeout=30).model == "model-a"  # answered, not cut off
    assert _evictions(local) == {}


def test_two_requests_needing_the_same_victim_evict_it_once_and_never_overcommit(local_factory):
    local = local_factory(_config(with_d=True))
    _serve_a_then_idle(local, IDLE_AFTER + 0.2)
    client = local.client()
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda m: client.chat.completions.create(model=m, messages=MESSAGES).model, ["model-b", "model-d"])
        )
    assert answers == ["model-b", "model-d"]  # both served: 60Gi + 60Gi fit once model-a is gone
    assert sum(_evictions(local).values()) == 1.0
    assert local.log().count("stopping model-a (80Gi, idle") == 1
    assert local.max_declared <= CAPACITY and local.declared_samples > 10
    assert local.stop() == 0
