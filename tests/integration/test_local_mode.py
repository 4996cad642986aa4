"""`ibc local` as a user runs it: a real subprocess, mock backends as model processes, the official openai client.

The seed scenario (one 128Gi node; model-a 80Gi, model-b 60Gi, model-c 16Gi) with short cooldowns:
success, the explained 429, service after the cooldown, a model that fits beside another, 50 concurrent
requests that never hold more declared memory than the node has (checked from the live processes, not
from the proxy's word), a crash that heals on the next request, and no process left after SIGTERM,
SIGINT or a killed worker.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from ibc.__main__ import main
from local.runtime import free_port

pytestmark = pytest.mark.integration

GI = 2**30
CAPACITY = 128 * GI
MEMORY = {"model-a": 80 * GI, "model-b": 60 * GI, "model-c": 16 * GI, "model-d": 60 * GI}
MESSAGES = [{"role": "user", "content": "hello"}]

STUBBORN = textwrap.dedent(
    """
    import http.server, signal, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends this one
    port = int(sys.argv[1])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def _config(cooldown_ab="6s", cooldown_c="60s", startup_delay="0.5", extra=""):
    def model(name, cooldown):
        return (
            f"  - name: {name}\n    memory: {MEMORY[name] // GI}Gi\n    cooldown: {cooldown}\n"
            f"    stop_grace_period: 5s\n"
            f"    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model {name} --startup-delay {startup_delay}\n"
        )

    return (
        "nodes:\n  - {name: shadow, memory: 128Gi}\nmodels:\n"
        + model("model-a", cooldown_ab)
        + model("model-b", cooldown_ab)
        + model("model-c", cooldown_c)
        + extra
    )


def _proc_rows():
    """pid -> (ppid, pgid, cmdline) for live, non-zombie processes."""
    rows = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        rows[int(entry)] = (int(fields[1]), int(fields[2]), cmdline)
    return rows


def _descendants(root, rows):
    children = {}
    for pid, (ppid, _, _) in rows.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Local:
    """One `ibc local` subprocess, with a sampler that records every process it ever had below it."""

    def __init__(self, tmp_path: Path, config_text: str) -> None:
        self.config = tmp_path / "local.yaml"
        self.config.write_text(config_text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "ibc-local.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ibc", "local", "--config", str(self.config), "--bind", f"127.0.0.1:{self.port}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.seen: dict[int, tuple[int, str]] = {}  # every descendant: pid -> (pgid, cmdline)
        self.max_declared = 0
        self.declared_samples = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ibc local did not start:\n{self.log()}")
            time.sleep(0.1)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rows = _proc_rows()
            declared = 0
            for pid in _descendants(self.proc.pid, rows):
                _, pgid, cmdline = rows[pid]
                self.seen[pid] = (pgid, cmdline)  # latest: a child looks like its parent until it execs
                if "mock-backend" in cmdline:
                    model = cmdline.split("--model ", 1)[1].split()[0]
                    declared += MEMORY[model]
            self.max_declared = max(self.max_declared, declared)
            self.declared_samples += 1
            self._stop.wait(0.02)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def state(self, model: str) -> str:
        body = httpx.get(f"{self.url}/v1/models", timeout=5).json()
        return next(m["state"] for m in body["data"] if m["id"] == model)

    def backend_pids(self, model: str) -> list[int]:
        rows = _proc_rows()
        return [
            pid for pid in _descendants(self.proc.pid, rows) if "mock-backend" in rows[pid][2] and model in rows[pid][2]
        ]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._stop.set()
            self._sampler.join(5)

    def cleanup(self) -> None:
        """Whatever a failed test left: never leave processes on a shared machine."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        rows = _proc_rows()
        for pid, (pgid, cmdline) in self.seen.items():
            if pid in rows and rows[pid][1:] == (pgid, cmdline):  # still ours, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self._log.close()


@pytest.fixture
def local_factory(tmp_path):
    started = []

    def start(config_text):
        local = Local(tmp_path, config_text)
        started.append(local)
        return local

    yield start
    for local in started:
        local.cleanup()


def _until(predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _alive(pid):
    row = _proc_rows().get(pid)
    return row is not None


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(row[1] == pgid for row in _proc_rows().values())


def test_seed_scenario_with_the_openai_client(local_factory):
    local = local_factory(_config())
    client = local.client()

    answer = client.chat.completions.create(model="model-a", messages=MESSAGES)
    assert answer.model == "model-a" and answer.choices[0].message.content.startswith("tok0")

    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="model-b", messages=MESSAGES)
    assert time.monotonic() - t0 < 1.0  # at once: no 600 s queue
    response = info.value.response
    body = response.json()
    assert response.status_code == 429
    assert body["error"]["code"] == "insufficient_memory"
    assert body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
    assert body["available"] == "48Gi"
    assert [b["model"] for b in body["blocking"]] == ["model-a"] and body["blocking"][0]["memory"] == "80Gi"
    assert "blocked by model-a (80Gi, idle" in body["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 6  # model-a's 6 s cooldown ends by then

    answer = client.chat.completions.create(model="model-c", messages=MESSAGES)
    assert answer.model == "model-c"  # 16Gi fits beside model-a's 80Gi
    assert local.state("model-a") == "ready" and local.state("model-c") == "ready"

    metrics = httpx.get(f"{local.url}/models/model-a/metrics", timeout=5).json()
    assert metrics["declaredMemory"] == "80Gi" and metrics["state"] == "ready"
    assert httpx.get(f"{local.url}/models/model-z/metrics", timeout=5).status_code == 404

    assert _until(lambda: local.state("model-a") == "stopped", timeout=20)  # its cooldown ran out
    chunks = list(client.chat.completions.create(model="model-b", messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("tok0") and chunks[0].model == "model-b"  # cold start held, then streamed
    assert local.state("model-b") == "ready" and local.state("model-c") == "ready"
    assert local.stop() == 0


def test_fifty_concurrent_requests_never_overcommit(local_factory):
    local = local_factory(_config(cooldown_ab="1s", cooldown_c="1s", startup_delay="0.3"))
    models = ["model-a", "model-b", "model-c"]  # the seed trio (MEMORY also knows model-d, for test_local_room)
    results: list[tuple[str, int]] = []
    served_exclusive = set()

    def one(client, model, barrier):
        barrier.wait()
        try:
            client.chat.completions.create(model=model, messages=MESSAGES)
            return model, 200
        except openai.APIStatusError as exc:
            if exc.status_code == 429:
                assert exc.response.json()["error"]["code"] == "insufficient_memory"
            return model, exc.status_code

    client = local.client()
    with ThreadPoolExecutor(50) as pool:
        for burst in range(3):
            rng = random.Random(burst)
            barrier = threading.Barrier(50)
            picks = [models[i % 3] for i in range(50)]
            rng.shuffle(picks)
            outcome = list(pool.map(lambda m, b=barrier: one(client, m, b), picks))
            results.extend(outcome)
            served = {m for m, status in outcome if status == 200}
            assert "model-c" in served  # fits beside either big model
            assert len(served & {"model-a", "model-b"}) == 1  # exactly one of the two exclusive models won
            served_exclusive |= served & {"model-a", "model-b"}
            assert all(status in (200, 429) for _, status in outcome), outcome
            # Let every model idle out before the next burst, so each burst races from cold.
            assert _until(lambda: all(local.state(m) == "stopped" for m in models), timeout=20)
    assert local.stop() == 0
    assert local.declared_samples > 100
    assert 0 < local.max_declared <= CAPACITY, local.max_declared / GI
    statuses = [s for _, s in results]
    assert statuses.count(200) > 0 and statuses.count(429) > 0


BROKEN = (
    "  - name: broken\n    memory: 1Gi\n"
    f"    command: [{json.dumps(sys.executable)}, '-c', "
    "'import sys; print(\"fatal: weights not found\"); sys.exit(1)', '{port}']\n"
)


def test_a_failed_start_backs_off_instead_of_running_the_process_for_every_retry(local_factory, tmp_path):
    runs = tmp_path / "runs"
    script = (
        f"import sys; open({str(runs)!r}, 'a').write('run\\n'); "
        "print('loading', flush=True); print('fatal: weights not found', file=sys.stderr); sys.exit(3)"
    )
    command = json.dumps([sys.executable, "-c", script, "{port}"])
    failing = f"  - name: failing\n    memory: 1Gi\n    command: {command}\n"
    local = local_factory(_config(extra=failing))
    client = local.client()
    with pytest.raises(openai.InternalServerError) as first:
        client.chat.completions.create(model="failing", messages=MESSAGES)
    retry_after = int(first.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 10  # the first backoff: 10 s
    message = str(first.value)
    assert "could not start failing: exited with code 3: fatal: weights not found" in message  # stderr, not stdout
    assert "failing: failing" not in message
    with pytest.raises(openai.InternalServerError) as again:  # a retry inside the backoff
        client.chat.completions.create(model="failing", messages=MESSAGES)
    assert int(again.value.response.headers["retry-after"]) <= retry_after
    assert runs.read_text().count("run") == 1  # the process ran once for both requests
    models = httpx.get(f"{local.url}/v1/models", timeout=5).json()["data"]
    entry = next(m for m in models if m["id"] == "failing")
    assert entry["state"] == "failed" and entry["nextStartAttempt"] is not None
    assert entry["lastFailure"].startswith("exited with code 3")
    metrics = httpx.get(f"{local.url}/models/failing/metrics", timeout=5).json()
    assert [f["message"] for f in metrics["recentFailures"]] == [entry["lastFailure"]]
    assert local.stop() == 0


def test_a_killed_backend_is_restarted_by_the_next_request(local_factory):
    local = local_factory(_config(extra=BROKEN))
    client = local.client()
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError):  # a start that fails ends the wait at once
        client.chat.completions.create(model="broken", messages=MESSAGES)
    assert time.monotonic() - t0 < 10  # not the cold-start timeout
    assert local.state("broken") == "failed"
    failure = httpx.get(f"{local.url}/models/broken/metrics", timeout=5).json()["lastFailure"]
    assert failure == "exited with code 1: fatal: weights not found"

    client.chat.completions.create(model="model-a", messages=MESSAGES)
    (first,) = local.backend_pids("model-a")
    os.kill(first, signal.SIGKILL)
    assert _until(lambda: not _alive(first), timeout=5)

    answer = client.chat.completions.create(model="model-a", messages=MESSAGES)  # the very next request
    assert answer.model == "model-a"
    (second,) = local.backend_pids("model-a")
    assert second != first
    assert local.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_no_process_survives_ibc_local(local_factory, tmp_path, sig):
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    extra = (
        "  - name: stubborn\n    memory: 8Gi\n    stop_grace_period: 1s\n"
        f"    command: [{json.dumps(sys.executable)}, {json.dumps(str(script))}, '{{port}}']\n"
    )
    local = local_factory(_config(extra=extra))
    client = local.client()
    for model in ("model-a", "model-c", "stubborn"):
        try:
            client.chat.completions.create(model=model, messages=MESSAGES)
        except openai.APIStatusError:
            pass  # the stubborn server does not speak OpenAI; it only has to be running
    assert local.state("stubborn") == "ready"
    models = {pid: pgid for pid, (pgid, cmd) in local.seen.items() if "mock-backend" in cmd or "stubborn.py" in cmd}
    assert len(models) == 3 and all(pid == pgid for pid, pgid in models.items())  # each leads its own group

    code = local.stop(sig)
    assert code == 0, local.log()
    everything = list(local.seen.items())
    survivors = [pid for pid, _ in everything if _alive(pid)]
    # Every process group a model led (ibc local itself stays in the test's group, which lives on).
    groups = [pgid for pid, (pgid, _) in everything if pid == pgid and _group_alive(pgid)]
    assert survivors == [] and groups == [], local.log()


def test_a_killed_worker_takes_its_model_processes_with_it(local_factory):
    local = local_factory(_config())
    local.client().chat.completions.create(model="model-c", messages=MESSAGES)
    (backend,) = local.backend_pids("model-c")
    rows = _proc_rows()
    (worker,) = [pid for pid, (ppid, _, _) in rows.items() if ppid == local.proc.pid]
    assert backend in _descendants(worker, rows)
    os.kill(worker, signal.SIGKILL)  # no atexit, no signal handler: the kernel's PDEATHSIG must do it
    assert _until(lambda: not _alive(backend), timeout=10)
    assert local.stop() == 0


def test_an_address_in_use_is_one_line_and_exit_1(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        assert main(["local", "--config", "examples/local.yaml", "--bind", f"127.0.0.1:{port}"]) == 1
    assert time.monotonic() - t0 < 2  # not gunicorn's five retries
    assert capsys.readouterr().err.strip() == f"ibc local: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_bind_port_zero_logs_the_port_it_really_listens_on(tmp_path):
    config = tmp_path / "local.yaml"
    config.write_text(_config())
    log_path = tmp_path / "ibc-local.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ibc", "local", "--config", str(config), "--bind", "127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", log_path.read_text())
            port = int(found.group(1)) if found else None
            time.sleep(0.05)
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
