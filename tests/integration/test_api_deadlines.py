"""Every API call has a deadline: when the API server stops answering, nothing waits past its caller's.

Leadership: a real HTTP server on 127.0.0.1 plays the API server for one Lease (resourceVersion conflicts and all)
and a model's scale subresource. Once it starts to hang (accept, read, never answer), the elector's
calls may take no longer than the time left before the renew deadline, `may_write` turns false at the
deadline whatever the renew loop is doing, and no write arrives at the server after it: the lease
(`lease - renew` seconds later) can then pass to another replica without two writers. The webhook's
ledger gives up inside its deadline (and the webhook answers "busy, retry"), and the proxy's scaler
inside its request timeout and its writer's period.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from budget.view import model_key
from controller.errors import NotLeader
from controller.kube import Kube
from controller.leader import LeaderElector, LeaseTimings
from kubeview import load_api_client
from kubeview.api import INFERENCE_MODELS, LEASES, ApiError

pytestmark = pytest.mark.integration

TIMINGS = LeaseTimings(lease_duration_seconds=3.0, renew_deadline_seconds=1.5, retry_period_seconds=0.25)
SLACK = 0.5  # thread wake-ups and a loaded 2-core machine
LEASE = LEASES.path("ns", "ctl")
SCALE = INFERENCE_MODELS.path("ns", "m", "scale")


@dataclass
class LeaseServer:
    """The Lease API and a scale endpoint; `hang` makes every request wait unanswered."""

    hang: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lease: dict[str, Any] | None = None
    rv: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[float] = field(default_factory=list)  # arrival (monotonic) of every scale write
    renewed: list[float] = field(default_factory=list)  # when each lease write was answered

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if path == SCALE:
                return 200, {"kind": "Scale", "spec": {"replicas": 1}}
            if method == "GET" and path == LEASE:
                return (404, {"kind": "Status", "reason": "NotFound"}) if self.lease is None else (200, self.lease)
            if method in ("POST", "PUT") and body is not None:
                current = (self.lease or {}).get("metadata", {}).get("resourceVersion")
                if (method == "POST" and self.lease is not None) or (
                    method == "PUT" and body["metadata"].get("resourceVersion") != current
                ):
                    return 409, {"kind": "Status", "reason": "Conflict", "message": "the object has been modified"}
                self.rv += 1
                self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
                self.renewed.append(time.monotonic())
                return 200, self.lease
        return 404, {"kind": "Status", "reason": "NotFound"}


def _handler(server: LeaseServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            if path == SCALE:
                server.writes.append(time.monotonic())
            if server.hang.is_set():
                server.release.wait(30)  # never answers while the test runs
                self.close_connection = True
                return
            status, body = server.handle(self.command, path, json.loads(raw) if raw else None)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[LeaseServer, Any]]:
    state = LeaseServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{httpd.server_port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    api = load_api_client(str(kubeconfig))
    try:
        yield state, api
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        api.close()


def test_a_leader_whose_api_hangs_stops_writing_within_the_renew_deadline(api_server):
    state, api = api_server
    elector = LeaderElector(Kube(api), "ns", "ctl", "a", TIMINGS)
    writer = Kube(api, may_write=elector.may_write, write_seconds_left=elector.write_seconds_left)
    stop, started, stopped = threading.Event(), threading.Event(), threading.Event()
    run = threading.Thread(target=elector.run, args=(started.set, stopped.set, stop), daemon=True)
    run.start()
    outcomes: list[tuple[float, str]] = []  # (when the call returned, how)

    def write_until_refused() -> None:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                writer.merge_patch(SCALE, {"spec": {"replicas": 1}})
                outcomes.append((time.monotonic(), "ok"))
            except NotLeader:
                outcomes.append((time.monotonic(), "not-leader"))
                return
            except ApiError:
                outcomes.append((time.monotonic(), "timeout"))

    try:
        assert started.wait(5), "never became leader"
        # The leader renews twice (the server answered), then the API server hangs.
        end = time.monotonic() + 5
        while len(state.renewed) < 3 and time.monotonic() < end:
            stop.wait(0.05)
        assert len(state.renewed) >= 3
        w = threading.Thread(target=write_until_refused, daemon=True)
        w.start()
        end = time.monotonic() + 5
        while not any(how == "ok" for _, how in outcomes) and time.monotonic() < end:
            stop.wait(0.01)
        assert any(how == "ok" for _, how in outcomes), "the leader could not write before the hang"
        state.hang.set()
        hung_at = time.monotonic()
        assert stopped.wait(TIMINGS.renew_deadline_seconds + TIMINGS.retry_period_seconds + SLACK), (
            "the leader did not step down within the renew deadline"
        )
        stepped_down = time.monotonic()
        w.join(TIMINGS.renew_deadline_seconds + SLACK)
        assert not w.is_alive(), "a write was still waiting on the hung API after the deadline"
    finally:
        stop.set()
        state.release.set()
        run.join(TIMINGS.renew_deadline_seconds * 2 + SLACK)

    deadline = state.renewed[-1] + TIMINGS.renew_deadline_seconds  # the last renewal answered, plus the deadline
    assert hung_at <= deadline
    assert not elector.may_write()
    late = [t - deadline for t in state.writes if t > deadline]
    assert late == [], f"writes reached the API server {late} s after the renew deadline"
    refused_at = [t for t, how in outcomes if how == "not-leader"]
    assert refused_at and refused_at[0] <= deadline + SLACK, outcomes
    assert stepped_down <= deadline + TIMINGS.retry_period_seconds + SLACK
    # ... and well before the lease expires for the other replicas (lease - renew = 1.5 s later).
    assert refused_at[0] < state.renewed[-1] + TIMINGS.lease_duration_seconds


def test_campaign_calls_are_bounded_too(api_server):
    """A candidate facing a hung API gives up each attempt within the renew deadline, not 4 x 30 s."""
    state, api = api_server
    state.hang.set()
    elector = LeaderElector(Kube(api), "ns", "ctl", "b", TIMINGS)
    t0 = time.monotonic()
    assert not elector.try_acquire_or_renew()
    assert time.monotonic() - t0 <= TIMINGS.renew_deadline_seconds + SLACK
    assert not elector.may_write()


def test_the_webhook_ledger_gives_up_inside_its_deadline(api_server):
    from webhook.kube import ConfigMapLedger
    from webhook.ledger import LedgerError

    state, api = api_server
    state.hang.set()
    ledger = ConfigMapLedger(api, "ibc-system", "ledger", deadline_seconds=1.0)
    t0 = time.monotonic()
    with pytest.raises(LedgerError):  # the webhook answers "busy, retry"
        ledger.transact(lambda entries, now: pytest.fail("decided without the ledger"), dry_run=False,
                        reflected=lambda entry: False)
    assert time.monotonic() - t0 <= 1.0 + SLACK


def test_the_proxy_scaler_gives_up_inside_its_callers_deadlines(api_server):
    from proxy.kube_scaler import KubeScaler
    from proxy.scaler import ScalerUnavailable

    state, api = api_server
    state.hang.set()
    scaler = KubeScaler(api, request_timeout_seconds=2.0, touch_interval_seconds=0.5)
    scaler.cache.apply(
        "InferenceModel",
        "ADDED",
        {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"modelName": "m", "memory": "1Gi", "replicas": 0}},
    )
    key = model_key("ns", "m")
    t0 = time.monotonic()
    with pytest.raises(ScalerUnavailable):
        scaler.scale_up(key, 1)
    assert time.monotonic() - t0 <= 2.0 + SLACK, "the scale PATCH outlived its request timeout"
    scaler.touch(key, time.time())
    t0 = time.monotonic()
    assert scaler.flush() == 0
    assert time.monotonic() - t0 <= 0.5 + SLACK, "a lastRequestTime write outlived the writer's period"
    t0 = time.monotonic()
    assert scaler.flush(force=True, deadline=time.monotonic() + 0.3) == 0
    assert time.monotonic() - t0 <= 0.3 + SLACK
