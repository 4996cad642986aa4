"""`ibc extender` as a real process: HTTPS on 127.0.0.1 under gunicorn, answering the captured requests.

Why: the unit tests drive the Flask app in-process; this proves the command wires it up as the
scheduler will meet it: TLS verified against the CA, one worker whose threads share one reservation
book (so 24 concurrent filters never overbook), /readyz, /metrics, a clean SIGTERM, and the refusal
of several workers while reservations are on.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from budget.objects import ANNOTATION_MEMORY, LABEL_MODEL
from certs.generate import generate_serving_certificate, write_files
from tests.waiting import answers_200, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CAPTURED = REPO / "tests" / "fixtures" / "captured"
IBC = [sys.executable, "-m", "ibc"]
CAPACITY_GI = {"node-a": 24, "node-b": 48, "node-c": 80}

SNAPSHOT = "\n---\n".join(
    f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n"
    f"    inference.eh-ops.io/memory-capacity: {gi}Gi\n"
    for name, gi in CAPACITY_GI.items()
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, ca: Path, log: Path) -> None:
        self.proc, self.url, self.ca, self.log = proc, url, ca, log

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=str(self.ca), timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("extender")
    paths = write_files(
        generate_serving_certificate("ibc-extender", "ibc-system", ip_addresses=["127.0.0.1"]), work / "tls"
    )
    state = work / "cluster.yaml"
    state.write_text(SNAPSHOT)
    port = _free_port()
    log = work / "extender.log"
    argv = [
        *IBC,
        "extender",
        "--bind",
        f"127.0.0.1:{port}",
        "--cluster-state",
        str(state),
        "--tls-cert",
        str(paths.cert),
        "--tls-key",
        str(paths.key),
        "--threads",
        "8",
        "--no-bind",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    srv = Server(proc, f"https://127.0.0.1:{port}", paths.ca, log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"ibc extender exited {proc.returncode}:\n{log.read_text()}"
            return answers_200(f"{srv.url}/readyz", verify=str(srv.ca))

        wait_until(ready, 30, "ibc extender ready", interval=0.1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def model_filter(uid: str, memory: str = "20Gi") -> dict[str, Any]:
    args = json.loads((CAPTURED / "extender-filter-nodenames.json").read_text())
    meta = args["Pod"]["metadata"]
    meta["uid"] = uid
    meta["labels"][LABEL_MODEL] = "llama"
    meta.setdefault("annotations", {})[ANNOTATION_MEMORY] = memory
    return args


def test_https_filter_answers_the_captured_request_verified_against_the_ca(server: Server) -> None:
    plain = json.loads((CAPTURED / "extender-filter-nodenames.json").read_text())
    with server.client() as c:
        body = c.post("/filter", json=plain).json()
    assert body["NodeNames"] == ["node-a", "node-b", "node-c"] and body["Error"] == ""


def test_concurrent_filters_across_threads_never_overbook(server: Server) -> None:
    told: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(24)

    def one(i: int) -> None:
        with server.client() as c:
            barrier.wait()
            body = c.post("/filter", json=model_filter(f"concurrent-{i}")).json()
        with lock:
            told.extend(body["NodeNames"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    per_node = Counter(told)
    # 20Gi holes: node-a 1, node-b 2, node-c 4 -> 7 pods told "fits", never more per node.
    assert all(per_node[n] * 20 <= gi for n, gi in CAPACITY_GI.items()), per_node
    assert sum(per_node.values()) == 7, per_node
    with server.client() as c:
        held = c.get("/debug/reservations").json()["reservations"]
        metrics = c.get("/metrics").text
    assert Counter(r["node"] for r in held if r["uid"].startswith("concurrent-")) == per_node
    assert "ibc_extender_reservations 7.0" in metrics
    assert 'ibc_extender_filter_duration_seconds_count{form="nodenames"}' in metrics


def test_bad_requests_over_the_wire_get_json_errors(server: Server) -> None:
    with server.client() as c:
        not_json = c.post("/filter", content=b"Pod=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
        broken = c.post("/filter", content=b'{"Pod": ', headers={"Content-Type": "application/json"})
        bind = c.post("/bind", json=json.loads((CAPTURED / "extender-bind.json").read_text()))
    assert not_json.status_code == 415 and "application/json" in not_json.json()["Error"]
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["Error"]
    assert bind.status_code == 200 and "--no-bind" in bind.json()["Error"]


def test_sigterm_stops_the_server_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "cluster.yaml"
    state.write_text(SNAPSHOT)
    port = _free_port()
    proc = subprocess.Popen(
        [*IBC, "extender", "--bind", f"127.0.0.1:{port}", "--cluster-state", str(state), "--no-bind"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_until(lambda: answers_200(f"http://127.0.0.1:{port}/livez"), 30, "ibc extender live", interval=0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--workers", "2"], "each worker its own reservation book", id="several-workers"),
        pytest.param(["--reservation-ttl", "0"], "--reservation-ttl must be > 0", id="zero-ttl"),
        pytest.param(["--cluster-state", "/nonexistent.yaml"], "no such file", id="missing-snapshot"),
        pytest.param(["--kubeconfig", "/nonexistent"], "no such file", id="missing-kubeconfig"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags: list[str], message: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    base = copy.copy(flags)
    if "--cluster-state" not in base and "--kubeconfig" not in base:
        state = tmp_path / "cluster.yaml"
        state.write_text(SNAPSHOT)
        base += ["--cluster-state", str(state)]
    result = subprocess.run(
        [*IBC, "extender", "--bind", "127.0.0.1:0", *base],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
