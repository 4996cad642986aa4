"""`ibc webhook` as a real process: HTTPS on 127.0.0.1 under gunicorn, answering captured AdmissionReviews.

Why: the unit tests drive the Flask app in-process; this proves the command wires it up as the
kube-apiserver will meet it (offline mode, on the seed scenario): TLS verified against the CA, the
seed's explanation in the deny, threads of one worker sharing the in-process lock (concurrent scale-ups
never overcommit), HTTP 400 for a body that is not a review, /readyz, /metrics and a clean SIGTERM.
The race across several processes and replicas needs the shared ledger in a real API server: that
proof lives in tests/cluster/test_webhook.py.
"""

from __future__ import annotations

import copy
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from certs.generate import generate_serving_certificate, write_files
from tests.waiting import answers_200, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CAPTURED = REPO / "tests" / "fixtures" / "captured"
SEED = REPO / "examples" / "seed-scenario.yaml"
IBC = [sys.executable, "-m", "ibc"]
# Beside the seed scenario: a 64Gi pool and 16 models of 16Gi each, for the race between threads.
RACE_MODELS = 16
RACE_POOL = """
apiVersion: v1
kind: Node
metadata:
  name: race-node
  labels: {inference-pool: race}
  annotations: {inference.eh-ops.io/memory-capacity: 64Gi}
""" + "".join(
    f"""---
apiVersion: inference.eh-ops.io/v1alpha1
kind: InferenceModel
metadata: {{name: race-{i:02d}, namespace: default}}
spec: {{modelName: race-{i:02d}, memory: 16Gi, replicas: 0, nodeSelector: {{inference-pool: race}}}}
"""
    for i in range(RACE_MODELS)
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
    work = tmp_path_factory.mktemp("webhook")
    paths = write_files(
        generate_serving_certificate("ibc-webhook", "ibc-system", ip_addresses=["127.0.0.1"]), work / "tls"
    )
    state = work / "cluster.yaml"
    state.write_text(SEED.read_text() + "\n---\n" + RACE_POOL)
    port = _free_port()
    log = work / "webhook.log"
    argv = [*IBC, "webhook", "--bind", f"127.0.0.1:{port}", "--cluster-state", str(state),
            "--tls-cert", str(paths.cert), "--tls-key", str(paths.key), "--threads", "8"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    srv = Server(proc, f"https://127.0.0.1:{port}", paths.ca, log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"ibc webhook exited {proc.returncode}:\n{log.read_text()}"
            return answers_200(f"{srv.url}/readyz", verify=str(srv.ca))

        wait_until(ready, 30, "ibc webhook ready", interval=0.1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def scale_review(
    name: str, replicas: int, uid: str, *, old: int | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """The captured inferencemodels/scale review, retargeted at a model of the seed scenario."""
    review = json.loads((CAPTURED / "admission-update-inferencemodel-scale.json").read_text())
    req = review["request"]
    req["uid"] = uid
    req["name"] = name
    for key in ("object", "oldObject"):
        req[key]["metadata"]["name"] = name
    req["object"]["spec"] = {"replicas": replicas}
    if old is not None:
        req["oldObject"]["spec"] = {"replicas": old}
    req["dryRun"] = dry_run
    return review


def post(client: httpx.Client, review: Any) -> httpx.Response:
    return client.post("/validate", content=json.dumps(review), headers={"Content-Type": "application/json"})


def test_seed_scenario_deny_over_https_explains_itself(server: Server) -> None:
    with server.client() as c:
        resp = post(c, scale_review("model-b", 1, "uid-b"))
    assert resp.status_code == 200
    body = resp.json()
    assert (body["apiVersion"], body["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    answer = body["response"]
    assert answer["uid"] == "uid-b"
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 403 and answer["status"]["reason"] == "Forbidden"
    assert answer["status"]["message"].startswith(
        "insufficient_memory: model-b needs 60Gi in pool inference-pool=gpu-nodes; 48Gi available; "
        "blocked by model-a (80Gi, idle "
    )


def test_threads_of_one_worker_never_overcommit(server: Server) -> None:
    """16 concurrent reviews each scale a different 16Gi model 0 -> 1 into 64Gi: exactly 4 pass."""
    answers: dict[str, bool] = {}
    barrier = threading.Barrier(RACE_MODELS)

    def review(name: str) -> None:
        with server.client() as c:
            barrier.wait()
            answers[name] = post(c, scale_review(name, 1, f"uid-{name}")).json()["response"]["allowed"]

    threads = [threading.Thread(target=review, args=(f"race-{i:02d}",)) for i in range(RACE_MODELS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(answers) == RACE_MODELS
    assert sorted(answers.values()).count(True) == 4, answers
    with server.client() as c:
        entries = c.get("/debug/ledger").json()["entries"]
    assert sorted(e["model"] for e in entries) == sorted(f"default/{n}" for n, ok in answers.items() if ok)


def test_dry_run_and_decrease_leave_the_ledger_alone(server: Server) -> None:
    with server.client() as c:
        before = c.get("/debug/ledger").json()["entries"]
        dry = post(c, scale_review("model-b", 1, "uid-dry", dry_run=True)).json()["response"]
        down = post(c, scale_review("model-a", 0, "uid-down", old=1)).json()["response"]
        after = c.get("/debug/ledger").json()["entries"]
    assert dry["allowed"] is False and dry["uid"] == "uid-dry"
    assert down["allowed"] is True and down["uid"] == "uid-down"
    assert [e["model"] for e in after] == [e["model"] for e in before]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"{oops", 400, id="not-json"),
        pytest.param(b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', 400, id="no-request"),
    ],
)
def test_body_that_is_not_a_review_gets_http_400_json(server: Server, body: bytes, status: int) -> None:
    with server.client() as c:
        resp = c.post("/validate", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]


def test_malformed_object_with_uid_is_a_400_deny(server: Server) -> None:
    review = json.loads((CAPTURED / "admission-create-inferencemodel.json").read_text())
    review["request"]["object"]["spec"]["memory"] = "sixteen gigs"
    with server.client() as c:
        answer = post(c, review).json()["response"]
    assert answer["uid"] == review["request"]["uid"]
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 400
    assert "spec.memory" in answer["status"]["message"]


def test_probes_and_metrics(server: Server) -> None:
    with server.client() as c:
        post(c, scale_review("model-b", 1, "uid-m"))
        assert c.get("/livez").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready", "ledger": "in-process"}
        text = c.get("/metrics").text
    assert 'ibc_webhook_reviews_total{reason="insufficient_memory",resource="inferencemodels/scale",result="denied"}' \
        in text


def test_captured_deployment_reviews_round_trip(server: Server) -> None:
    with server.client() as c:
        for name in ("admission-create-deployment.json", "admission-update-deployment.json",
                     "admission-update-deployment-scale.json", "admission-update-deployment-status.json"):
            review = json.loads((CAPTURED / name).read_text())
            answer = post(c, copy.deepcopy(review)).json()["response"]
            # None of the captured Deployments is a model workload: all pass, uid echoed.
            assert (answer["uid"], answer["allowed"]) == (review["request"]["uid"], True), name


def test_a_review_that_waited_for_a_thread_past_its_deadline_is_told_to_retry_in_time(server: Server) -> None:
    """Every thread is held by a slow client; a review sent with the apiserver's `?timeout=2s` waits in
    gunicorn's queue. The webhook measures that wait and, with no time left to decide, answers 429 busy
    with a retry hint instead of letting the apiserver time out."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(server.ca))
    host, port = server.url.removeprefix("https://").split(":")
    slow = []
    for _ in range(8):  # --threads 8: each slow client holds one, mid-request
        sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host)
        sock.sendall(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow.append(sock)
    answers: list[httpx.Response] = []
    sent = time.monotonic()

    def send() -> None:
        with server.client() as c:
            answers.append(c.post("/validate?timeout=2s", content=json.dumps(scale_review("model-c", 1, "uid-q")),
                                  headers={"Content-Type": "application/json"}))

    waiter = threading.Thread(target=send)
    waiter.start()
    try:
        time.sleep(1.5)  # the thing under test: a review that waits 1.5 s of its 2 s for a thread
    finally:
        for sock in slow:
            sock.close()
    waiter.join(10)
    elapsed = time.monotonic() - sent
    answer = answers[0].json()["response"]
    assert answer["uid"] == "uid-q" and answer["allowed"] is False
    assert answer["status"]["code"] == 429 and answer["status"]["details"] == {"retryAfterSeconds": 1}
    assert "admission is busy: this review waited 1." in answer["status"]["message"], answer
    assert elapsed < 2.0, f"answered after {elapsed:.2f}s: past the apiserver's timeout"
    with server.client() as c:
        metrics = c.get("/metrics").text
        assert post(c, scale_review("model-c", 1, "uid-after", dry_run=True)).json()["response"]["allowed"]
    count = float(next(line.split()[1] for line in metrics.splitlines()
                       if line.startswith("ibc_webhook_queue_seconds_count")))
    total = float(next(line.split()[1] for line in metrics.splitlines()
                       if line.startswith("ibc_webhook_queue_seconds_sum")))
    assert count >= 1 and total >= 1.4, (count, total)
