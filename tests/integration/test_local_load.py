"""`ibc local`'s load layer as a user sees it: replicas added under load, within the budget, and taken away.

A model with `max_replicas: 3` whose replica runs 2 requests at once (the mock backend answers after 1 s)
gets 14 clients at once: its queue saturates one replica, and `ibc local` adds processes until there are
3. The queue is seen two ways: the proxy's in-flight count beyond `load.concurrency: 2`, or, with no
concurrency given, the replica's own `vllm:num_requests_waiting` (the mock's `--max-running 2`). In a pool that fits
only 2 beside an idle model, it stays at 2 and `/v1/models` and `/metrics` say "wants 3, budget allows 2,
blocked by side (...)". When the clients stop it steps back down to `min_replicas`, or to 0 after the
cooldown. Declared memory is sampled from the live processes all along and never exceeds the node.
"""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration import test_local_mode
from tests.integration.test_local_mode import MESSAGES, _until

pytestmark = pytest.mark.integration

GI = 2**30
# The sampler of test_local_mode reads declared memory by model name; these are this file's models.
test_local_mode.MEMORY.update({"chat": 30 * GI, "side": 30 * GI})
local_factory = test_local_mode.local_factory
CLIENTS = 14  # with 2 running per replica: 7 each on 2 replicas, a queue of 5 (saturated) on both signals
LOAD_SECONDS = 60.0  # the most any test keeps its clients busy


PROXY_COUNT = ("{concurrency: 2, scale_up_stabilization: 0.5s, scale_down_stabilization: 1s}", "")
# No concurrency given: only the replica's own /metrics (vllm:num_requests_waiting) says it is saturated.
VLLM_METRICS = ("{scale_up_stabilization: 0.5s, scale_down_stabilization: 1s}", " --max-running 2")


def _config(node_gi, *, min_replicas=0, cooldown="60s", side=False, signals=PROXY_COUNT):
    text = (
        f"nodes:\n  - {{name: shadow, memory: {node_gi}Gi}}\nmodels:\n"
        f"  - name: chat\n    memory: 30Gi\n    cooldown: {cooldown}\n    stop_grace_period: 5s\n"
        f"    min_replicas: {min_replicas}\n    max_replicas: 3\n"
        f"    load: {signals[0]}\n"
        f"    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model chat --latency 1 --tokens 2{signals[1]}\n"
    )
    if side:
        text += (
            "  - name: side\n    memory: 30Gi\n    cooldown: 10m\n"
            "    command: ibc mock-backend --bind 127.0.0.1:{port} --model side\n"
        )
    return text


class Clients:
    """`CLIENTS` threads sending requests for `chat` one after another until stopped (bounded in time)."""

    def __init__(self, local):
        self.local = local
        self.stop = threading.Event()
        self.answered = 0
        self.errors: list[str] = []
        self._pool = ThreadPoolExecutor(CLIENTS)
        self._futures = [self._pool.submit(self._run) for _ in range(CLIENTS)]

    def _run(self):
        client = self.local.client()
        deadline = time.monotonic() + LOAD_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                client.chat.completions.create(model="chat", messages=MESSAGES)
                self.answered += 1
            except Exception as exc:  # every request must be answered: collected and asserted on
                self.errors.append(repr(exc))

    def finish(self):
        self.stop.set()
        for f in self._futures:
            f.result(timeout=LOAD_SECONDS + 30)
        self._pool.shutdown()


def _chat(local):
    body = httpx.get(f"{local.url}/v1/models", timeout=5).json()
    return next(m for m in body["data"] if m["id"] == "chat")


def _gauges(local):
    text = httpx.get(f"{local.url}/metrics", timeout=5).text
    pattern = r'^ibc_model_replicas_(wanted|allowed)\{model="chat",namespace="local"\} (\S+)$'
    return {kind: float(v) for kind, v in re.findall(pattern, text, re.M)}


@pytest.mark.parametrize("signals", [PROXY_COUNT, VLLM_METRICS], ids=["proxy-in-flight", "vllm-metrics"])
def test_load_adds_replicas_up_to_max_then_steps_back_down_and_idles_to_zero(local_factory, signals):
    local = local_factory(_config(128, cooldown="4s", signals=signals))
    clients = Clients(local)
    try:
        assert _until(lambda: len(local.backend_pids("chat")) == 3, timeout=40), local.log()
        assert _until(lambda: _chat(local).get("readyReplicas", 0) == 3 or len(local.backend_pids("chat")) == 3)
        assert _gauges(local) == {"wanted": 3.0, "allowed": 3.0}
    finally:
        clients.finish()
    assert clients.errors == []
    assert clients.answered > 0
    # No more load: one step at a time to one replica, then the cooldown takes the last one.
    assert _until(lambda: len(local.backend_pids("chat")) <= 2, timeout=30), local.log()
    assert _until(lambda: len(local.backend_pids("chat")) == 0, timeout=40), local.log()
    assert "stepping down for load" in local.log_path.read_text()
    assert local.max_declared <= 128 * GI
    assert local.max_declared == 90 * GI  # three replicas of 30Gi at the peak, seen from /proc


def test_a_pool_that_fits_two_stays_at_two_and_says_who_blocks(local_factory):
    local = local_factory(_config(100, side=True))
    local.client().chat.completions.create(model="side", messages=MESSAGES)  # side holds 30Gi, idle from now
    clients = Clients(local)
    try:
        assert _until(lambda: _chat(local).get("replicasWanted") == 3, timeout=40), local.log()
        chat = _chat(local)
        assert chat["replicasAllowed"] == 2
        assert re.match(r"chat wants 3, budget allows 2, blocked by side \(30Gi, idle \d+s\)$", chat["loadMessage"]), (
            chat
        )
        assert _gauges(local) == {"wanted": 3.0, "allowed": 2.0}
        assert len(local.backend_pids("chat")) == 2
    finally:
        clients.finish()
    assert clients.errors == []
    assert 0 < local.max_declared <= 100 * GI


def test_min_replicas_are_started_warm_and_kept_after_load(local_factory):
    local = local_factory(_config(128, min_replicas=1, cooldown="2s"))
    # Warm: started without a request.
    assert _until(lambda: len(local.backend_pids("chat")) == 1, timeout=20), local.log()
    clients = Clients(local)
    try:
        assert _until(lambda: len(local.backend_pids("chat")) >= 2, timeout=40), local.log()
    finally:
        clients.finish()
    assert clients.errors == []
    assert _until(lambda: len(local.backend_pids("chat")) == 1, timeout=40), local.log()
    # Past the 2 s cooldown it stays at min_replicas: exempt from idle scale-to-zero.
    settled = time.monotonic()
    assert _until(lambda: time.monotonic() - settled > 4, timeout=10, interval=0.2)
    assert len(local.backend_pids("chat")) == 1
    assert local.state("chat") == "ready"
