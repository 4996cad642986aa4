"""The proxy's app under the production runner (`serving.runner.serve`: gunicorn, several gthread workers).

What differs from the in-thread server of the other tests and a user would notice: requests answered
by different worker processes all show up in `/metrics` (Prometheus multiprocess mode), keep-alive
connections and streaming work through gunicorn, and SIGTERM stops every worker.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_mock_backend import MockProcess
from tests.waiting import answers_200, wait_until

pytestmark = pytest.mark.integration

SERVER = textwrap.dedent(
    """
    import sys
    from budget import ClusterView, Model, Node
    from ibc.logs import configure
    from serving.runner import serve
    from proxy.app import create_app
    from proxy.settings import ProxySettings
    from proxy.static_scaler import StaticScaler

    backend, bind = sys.argv[1], sys.argv[2]
    configure("INFO")

    def factory():
        gi = 2**30
        view = ClusterView.build(
            nodes=[Node("n", {}, 64 * gi, "annotation")],
            models=[Model("default", "m", gi, "m", replicas=1), Model("default", "big", 128 * gi, "big")],
        )
        return create_app(ProxySettings(), StaticScaler(view, {"default/m": [backend]}))

    sys.exit(serve(factory, bind=bind, workers=2, threads=4, name="proxy-test"))
    """
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    mock = MockProcess("m", "--token-delay", "0.01")
    port = free_port()
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, mock.url, f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers_200(f"{url}/livez", timeout=1), 30, "the proxy live", interval=0.1)
    except AssertionError:
        proc.kill()
        raise RuntimeError((tmp_path / "proxy.log").read_text()) from None
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()
        mock.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chat(model: str, **extra: object) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def test_metrics_add_up_over_workers_and_sigterm_stops_them(
    served: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = served
    for _ in range(40):  # a new connection each time: gunicorn spreads them over its workers
        resp = httpx.post(
            f"{url}/v1/chat/completions",
            content=chat("m", max_tokens=2),
            timeout=10,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        assert resp.status_code == 200
    for _ in range(10):
        assert httpx.post(f"{url}/v1/chat/completions", content=chat("big"), timeout=10).status_code == 429
    # Whichever worker answers /metrics (new connections land on either), it reports every worker's counts.
    for _ in range(10):
        text = httpx.get(f"{url}/metrics", timeout=10, headers={"Connection": "close"}).text
        assert 'ibc_proxy_requests_total{model="m",status="200"} 40.0' in text
        assert 'ibc_proxy_requests_total{model="big",status="429"} 10.0' in text
        assert 'ibc_proxy_rejections_total{model="big",reason="insufficient_memory"} 10.0' in text
    pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(pids) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_keep_alive_and_streaming_through_gunicorn(served: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    for _ in range(20):
        conn.request("POST", "/v1/chat/completions", body=chat("m"), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["model"] == "m"
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=chat("m", stream=True, max_tokens=5),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream"
    reads = []
    while chunk := resp.read1(65536):
        reads.append(chunk)
    body = b"".join(reads)
    assert body.endswith(b"data: [DONE]\n\n")
    assert len(reads) >= 5, "events arrive as the backend sends them, not in one piece"
