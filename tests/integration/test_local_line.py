"""`ibc local` holding requests that ask to wait for memory (`X-IBC-Max-Wait`), seen by a user.

The seed scenario (128Gi; model-a 80Gi holding the node, model-b 60Gi) without eviction: clients that
ask to wait are held in the pool's line with their position, served in order once model-a's cooldown
ends; a client whose wait runs out gets the 429 as today; a client that leaves gives its place up.
"""

import json
import re
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.integration import test_local_mode
from tests.integration.test_local_mode import MESSAGES, _until

pytestmark = pytest.mark.integration

local_factory = test_local_mode.local_factory  # the same `ibc local` subprocess fixture, with its sampler
GI = 2**30


def _config(cooldown_a):
    def model(name, memory, cooldown):
        return (
            f"  - name: {name}\n    memory: {memory}\n    cooldown: {cooldown}\n    stop_grace_period: 5s\n"
            f"    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model {name} --startup-delay 0.3\n"
        )

    return (
        "nodes:\n  - {name: shadow, memory: 128Gi}\nmodels:\n"
        + model("model-a", "80Gi", cooldown_a)
        + model("model-b", "60Gi", "10m")
    )


class StreamingClient:
    """A streaming chat request on a raw socket in a thread, keeping every line as it arrives; `leave()`
    hangs up the way a client process that gives up does (the socket closes under the read)."""

    def __init__(self, url, max_wait, model="model-b"):
        self.lines: list[str] = []
        self.status = None
        self.done = threading.Event()
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": model, "messages": MESSAGES, "stream": True}).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-IBC-Max-Wait: {max_wait}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self._sock = socket.create_connection((host, int(port)), timeout=60)
        self._sock.sendall(request)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        buffer = b""
        try:
            while chunk := self._sock.recv(65536):
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    text = line.decode(errors="replace").rstrip("\r")
                    if self.status is None and text.startswith("HTTP/1.1 "):
                        self.status = int(text.split()[1])
                    self.lines.append(text)
        except OSError:
            pass  # left, or the server went away at the end of a test
        finally:
            self.done.set()

    def leave(self):
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        assert self.done.wait(10)

    def positions(self):
        return [(int(a), int(b)) for a, b in re.findall(r"position (\d+) of (\d+)", "\n".join(self.lines))]

    def served(self):
        data = [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]
        return bool(data) and data[0]["model"] == "model-b"


def test_three_waiting_clients_are_served_in_order_when_the_cooldown_ends(local_factory):
    local = local_factory(_config(cooldown_a="10s"))
    local.client().chat.completions.create(model="model-a", messages=MESSAGES)
    clients = []
    for k in range(1, 4):
        clients.append(StreamingClient(local.url, 120))
        assert _until(lambda k=k: (k, k) in clients[-1].positions(), timeout=10), clients[-1].lines
    assert local.state("model-a") == "ready" and not any(c.served() for c in clients)
    # The first in line is told when model-a's cooldown (10 s) ends; those behind it, a lower bound.
    first = re.search(r"position 1 of 1; expected start in about (\d+)s", "\n".join(clients[0].lines))
    assert first and 1 <= int(first.group(1)) <= 10, clients[0].lines
    behind = re.search(r"position 2 of 2; not before (\d+)s", "\n".join(clients[1].lines))
    assert behind and int(behind.group(1)) <= int(first.group(1)), clients[1].lines
    status = httpx.get(f"{local.url}/status", timeout=5).json()
    assert status["waiting"] == {"the whole cluster": ["model-b", "model-b", "model-b"]}
    for c in clients:
        assert c.done.wait(60), c.lines
    assert [c.status for c in clients] == [200, 200, 200]
    assert all(c.served() for c in clients), [c.lines for c in clients]
    # Each joined behind those already waiting, only ever moved up, and was at the front when served.
    assert [c.positions()[0] for c in clients] == [(1, 1), (2, 2), (3, 3)]
    for c in clients:
        places = [p for p, _ in c.positions()]
        assert places == sorted(places, reverse=True) and places[-1] == 1, c.positions()
    assert local.state("model-a") == "stopped"
    assert httpx.get(f"{local.url}/status", timeout=5).json()["waiting"] == {}
    assert local.max_declared <= 128 * GI


def test_a_client_whose_wait_runs_out_gets_the_429(local_factory):
    local = local_factory(_config(cooldown_a="10m"))
    client = local.client()
    client.chat.completions.create(model="model-a", messages=MESSAGES)
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="model-b", messages=MESSAGES, extra_headers={"X-IBC-Max-Wait": "2"})
    waited = time.monotonic() - began
    assert 1.9 <= waited < 5, waited
    body = info.value.response.json()
    assert body["error"]["code"] == "insufficient_memory" and body["blocking"][0]["model"] == "model-a"


def test_a_client_that_leaves_gives_its_place_up(local_factory):
    local = local_factory(_config(cooldown_a="10m"))
    local.client().chat.completions.create(model="model-a", messages=MESSAGES)
    first = StreamingClient(local.url, 120)
    assert _until(lambda: (1, 1) in first.positions(), timeout=10)
    second = StreamingClient(local.url, 120)
    assert _until(lambda: (2, 2) in second.positions(), timeout=10)
    first.leave()
    assert _until(lambda: second.positions()[-1] == (1, 1), timeout=15), second.lines
    second.leave()


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "99999"], ids=["word", "negative", "nan", "over-an-hour"])
def test_a_bad_max_wait_is_a_clear_400(local_factory, value):
    local = local_factory(_config(cooldown_a="10m"))
    local.client().chat.completions.create(model="model-a", messages=MESSAGES)
    response = httpx.post(
        f"{local.url}/v1/chat/completions",
        json={"model": "model-b", "messages": MESSAGES},
        headers={"X-IBC-Max-Wait": value},
        timeout=10,
    )
    assert response.status_code == 400
    assert "X-IBC-Max-Wait must be a number of seconds" in response.json()["error"]["message"]


def test_a_stopping_process_answers_every_held_request_instead_of_dropping_it(local_factory):
    """SIGTERM (a restart, a rollout) while requests are held: in line for memory, or for a start; plain or
    streaming. Each gets an explicit error it can act on (503 + Retry-After, or an SSE error event once its
    stream began), not a connection closed under it."""
    slow_c = (
        "  - name: model-c\n    memory: 16Gi\n    stop_grace_period: 5s\n"
        "    command: ibc mock-backend --bind 127.0.0.1:{port} --model model-c --startup-delay 60\n"
    )
    local = local_factory(_config(cooldown_a="10m") + slow_c)
    local.client().chat.completions.create(model="model-a", messages=MESSAGES)
    in_line = StreamingClient(local.url, 120)
    starting = StreamingClient(local.url, 120, model="model-c")
    plain: dict[str, httpx.Response] = {}

    def ask(model):
        plain[model] = httpx.post(
            f"{local.url}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES},
            headers={"X-IBC-Max-Wait": "120"},
            timeout=60,
        )

    askers = [threading.Thread(target=ask, args=(m,), daemon=True) for m in ("model-b", "model-c")]
    for t in askers:
        t.start()
    assert _until(lambda: (1, 1) in in_line.positions(), timeout=10), in_line.lines
    assert _until(lambda: any("waiting for model-c to start" in x for x in starting.lines), timeout=10)
    assert _until(lambda: httpx.get(f"{local.url}/status", timeout=5).json()["waiting"], timeout=10)
    assert _until(lambda: local.state("model-c") == "starting", timeout=10)

    local.proc.send_signal(signal.SIGTERM)
    for t in askers:
        t.join(30)
    for model in ("model-b", "model-c"):
        response = plain[model]
        assert response.status_code == 503, (model, response.text)
        assert response.json()["error"]["code"] == "shutting_down"
        assert response.headers["Retry-After"] == "1"
    for client in (in_line, starting):
        assert client.done.wait(30), client.lines
        assert client.status == 200
        errors = [json.loads(x[6:]) for x in client.lines if x.startswith("data: {")]
        assert "event: error" in client.lines, client.lines
        assert [e["error"]["code"] for e in errors] == ["shutting_down"], client.lines
        assert errors[0]["error"]["retry_after_seconds"] == 1
    assert local.proc.wait(60) == 0
