"""`ibc controller` as a process on 127.0.0.1, without a cluster: flags, health, metrics, SIGTERM.

Why: an operator's first contact is the command line and the probes. A bad flag must be one line and
exit 2; an API server that cannot be reached must leave the controller alive, not ready, and still
stoppable at once; the Prometheus source must give up on a hung Prometheus instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from controller.errors import ObservationError
from controller.observe import PrometheusSource
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ibc(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ibc", "controller", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def dead_kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig whose API server is a closed port on 127.0.0.1."""
    port = free_port()
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True}}
                ],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--observed-memory", "prometheus"], "needs --prometheus-url", id="prometheus-without-url"),
        pytest.param(["--prometheus-url", "prom:9090"], "must start with http://", id="url-without-scheme"),
        pytest.param(
            ["--prometheus-query", 'sum(DCGM_FI_DEV_FB_USED{namespace="{namespace}"})'],
            "must contain {pod} or {model}",
            id="query-names-no-pod",
        ),
        pytest.param(["--metrics-bind", "8080"], "is not HOST:PORT", id="bind-without-host"),
        pytest.param(["--headroom-percent", "150"], "within 0..100", id="headroom-over-100"),
        pytest.param(["--resync-seconds", "0"], "--resync-seconds must be > 0", id="resync-zero"),
        pytest.param(["--load-interval-seconds", "-1"], "within 0..3600", id="load-interval-negative"),
        pytest.param(["--proxy-metrics-url", "proxy:8080"], "must start with http://", id="proxy-url-no-scheme"),
        pytest.param(
            ["--lease-duration-seconds", "4", "--lease-renew-seconds", "4"], "lease timings", id="renew-not-below-lease"
        ),
        pytest.param(["--kubeconfig", "/nonexistent/kubeconfig"], "cannot reach the cluster", id="missing-kubeconfig"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], message: str) -> None:
    res = ibc(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ibc controller: "), res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.stderr


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_unreachable_api_server_leaves_it_alive_not_ready_and_stoppable(dead_kubeconfig: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "controller.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ibc", "controller", "--kubeconfig", str(dead_kubeconfig),
         "--metrics-bind", f"127.0.0.1:{port}", "--leader-elect"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"

        def healthz() -> int | None:
            assert proc.poll() is None, (tmp_path / "controller.log").read_text()
            try:
                return get(base + "/healthz")[0]
            except OSError:
                return None

        code = wait_until(healthz, 20, "the metrics server", interval=0.1)
        assert code == 200
        code, text = get(base + "/readyz")
        assert code == 503 and "not synced" in text
        code, text = get(base + "/models/model-a/metrics")
        assert code == 404 and json.loads(text)["error"] == "not_found"
        code, text = get(base + "/metrics")
        assert code == 200 and "inference_controller_leader 0.0" in text
        time.sleep(1)
        assert proc.poll() is None  # still trying, not crashed
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        stopped_in = time.monotonic() - t0
        assert stopped_in < 3, f"SIGTERM took {stopped_in:.1f}s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "controller.log").read_text()
    assert "Traceback" not in text, text
    assert "list/watch of InferenceModel failed" in text or "list/watch of InferenceModel broke" in text, text


class SlowPrometheus:
    """Answers after `delay_seconds` (a hung Prometheus); records the queries."""

    def __init__(self, delay_seconds: float) -> None:
        self.delay_seconds = delay_seconds
        self.release = threading.Event()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    @Request.application  # type: ignore[misc]
    def _app(self, request: Request) -> Response:
        self.release.wait(self.delay_seconds)
        body = {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, "42"]}]}}
        return Response(json.dumps(body), mimetype="application/json")

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def slow_prometheus() -> Iterator[SlowPrometheus]:
    server = SlowPrometheus(delay_seconds=10)
    yield server
    server.stop()


def test_hung_prometheus_is_given_up_on_within_the_timeout(slow_prometheus: SlowPrometheus) -> None:
    source = PrometheusSource(slow_prometheus.url, timeout_seconds=0.5)
    t0 = time.monotonic()
    with pytest.raises(ObservationError, match="unreachable"):
        source.observe("ml", "model-a", ["p1"])
    assert time.monotonic() - t0 < 2
    slow_prometheus.delay_seconds = 0
    slow_prometheus.release.set()
    assert source.observe("ml", "model-a", ["p1"]) == {"p1": 42}
    source.close()
