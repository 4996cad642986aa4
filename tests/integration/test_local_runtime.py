"""The process runtime with real processes: readiness, crashes, SIGTERM then SIGKILL, whole groups, no orphans."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from local.runtime import Phase, ProcessError, ProcessRuntime, ProcessSpec, free_port, session_members

pytestmark = pytest.mark.integration

BACKEND = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, time
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    ready_after = float(args[args.index("--ready-after") + 1]) if "--ready-after" in args else 0.0
    if "--ignore-term" in args:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--child" in args:
        extra = ["--ignore-term"] if "--ignore-term" in args else []
        subprocess.Popen([sys.executable, "-c", "import signal, time\\n"
                          + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if extra else "")
                          + "time.sleep(600)"])
    if "--fail" in args:
        print("fatal: weights not found", flush=True)
        sys.exit(3)
    t0 = time.monotonic()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = time.monotonic() - t0 >= ready_after and "--never-ready" not in args
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"loading")
        def log_message(self, *a):
            pass
    print(f"listening on {port}", flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@pytest.fixture
def backend_script(tmp_path):
    path = tmp_path / "backend.py"
    path.write_text(BACKEND)
    return str(path)


@pytest.fixture
def runtime():
    events = []
    rt = ProcessRuntime(listener=events.append, poll_interval_seconds=0.05, health_interval_seconds=0.05)
    rt.events = events
    rt.start()
    yield rt
    rt.shutdown(timeout_seconds=1)


def _spec(script, *flags, name="m", startup_timeout=20.0, grace=5.0):
    port = free_port()
    return ProcessSpec(
        owner=f"local/{name}",
        name=name,
        argv=(sys.executable, script, "--port", str(port), *flags),
        port=port,
        health_url=f"http://127.0.0.1:{port}/health",
        node="shadow",
        startup_timeout_seconds=startup_timeout,
        stop_grace_seconds=grace,
    )


def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _gone(pid):
    return not session_members(pid)


def test_ready_only_when_health_answers_2xx(runtime, backend_script):
    proc = runtime.spawn(_spec(backend_script, "--ready-after", "0.6"))
    assert proc.phase is Phase.STARTING
    time.sleep(0.3)
    assert proc.phase is Phase.STARTING  # /health says 503 while loading
    assert _until(lambda: proc.phase is Phase.READY)
    assert proc.ready_at - proc.started_at >= 0.5
    assert _until(lambda: proc in runtime.events)  # the listener hears it (right after the phase changes)
    assert os.getpgid(proc.pid) == proc.pid  # its own process group and session
    assert os.getsid(proc.pid) == proc.pid


def test_kill_9_is_noticed_and_reported(runtime, backend_script):
    proc = runtime.spawn(_spec(backend_script, "--child"))
    assert _until(lambda: proc.phase is Phase.READY)
    assert _until(lambda: len(session_members(proc.pid)) == 2)  # the server and its child
    os.kill(proc.pid, signal.SIGKILL)
    assert _until(lambda: proc.phase is Phase.EXITED, timeout=5)
    assert proc.failure == "was killed by SIGKILL: listening on " + str(proc.spec.port)
    assert _until(lambda: _gone(proc.pid), timeout=5)  # the child left in its group went too


def test_exit_during_startup_reports_the_last_output_line(runtime, backend_script):
    proc = runtime.spawn(_spec(backend_script, "--fail"))
    assert _until(lambda: proc.phase is Phase.EXITED)
    assert proc.failure == "exited with code 3: fatal: weights not found"


def test_startup_timeout_stops_the_process(runtime, backend_script):
    proc = runtime.spawn(_spec(backend_script, "--never-ready", startup_timeout=0.8, grace=1))
    assert _until(lambda: proc.phase is Phase.EXITED)
    assert proc.failure.startswith("was not ready within 0.8s")


def test_stop_escalates_to_sigkill_for_the_whole_group(runtime, backend_script):
    proc = runtime.spawn(_spec(backend_script, "--ignore-term", "--child", grace=0.5))
    assert _until(lambda: proc.phase is Phase.READY)
    assert _until(lambda: len(session_members(proc.pid)) == 2)
    t0 = time.monotonic()
    runtime.stop(proc)
    assert proc.phase is Phase.STOPPING
    time.sleep(0.3)
    assert proc.popen.poll() is None  # SIGTERM is ignored; the grace period runs
    assert _until(lambda: proc.phase is Phase.EXITED, timeout=5)
    assert 0.4 <= time.monotonic() - t0 < 3
    assert proc.exit_code == -signal.SIGKILL and proc.failure is None  # asked to stop: not a crash
    assert _until(lambda: _gone(proc.pid), timeout=5)


def test_missing_executable_is_a_process_error(runtime):
    spec = ProcessSpec(owner="local/x", name="x", argv=("/nonexistent/vllm", "serve"), port=1, health_url="http://x")
    with pytest.raises(ProcessError, match="x: cannot run '/nonexistent/vllm': No such file or directory"):
        runtime.spawn(spec)


def test_shutdown_leaves_nothing_behind(backend_script):
    rt = ProcessRuntime(poll_interval_seconds=0.05, health_interval_seconds=0.05)
    procs = [
        rt.spawn(_spec(backend_script, "--child", name="polite")),
        rt.spawn(_spec(backend_script, "--ignore-term", "--child", name="stubborn")),
    ]
    assert _until(lambda: all(p.phase is Phase.READY for p in procs))
    t0 = time.monotonic()
    rt.shutdown(timeout_seconds=0.5)
    assert time.monotonic() - t0 < 3
    assert all(p.phase is Phase.EXITED for p in procs)
    assert all(_gone(p.pid) for p in procs)
    with pytest.raises(ProcessError, match="shutting down"):
        rt.spawn(_spec(backend_script))


def test_memory_sample_sums_the_process_tree(runtime, backend_script):
    alone = runtime.spawn(_spec(backend_script, name="alone"))
    family = runtime.spawn(_spec(backend_script, "--child", name="family"))
    assert _until(lambda: alone.phase is Phase.READY and family.phase is Phase.READY)
    assert _until(lambda: len(session_members(family.pid)) == 2)
    samples = runtime.sample_memory([alone, family])
    assert samples[alone.pid].source == "rss"
    assert 1 << 20 < samples[alone.pid].memory_bytes < 1 << 30
    assert len(samples[family.pid].pids) == 2
    assert samples[family.pid].memory_bytes > samples[alone.pid].memory_bytes


PARENT = textwrap.dedent(
    """
    import sys, time, threading
    from local.runtime import ProcessRuntime, ProcessSpec
    rt = ProcessRuntime(forward_output=False)
    argv = (sys.executable, "-c", "import time; time.sleep(600)")
    proc = rt.spawn(ProcessSpec(owner="local/s", name="s", argv=argv, port=1, health_url="http://127.0.0.1:1/"))
    print(proc.pid, flush=True)
    time.sleep(600)
    """
)


def test_children_die_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()  # no atexit, no shutdown: only PR_SET_PDEATHSIG can save us
        parent.wait()
        assert _until(lambda: _gone(child), timeout=5)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_spawns_from_many_threads_survive_those_threads(runtime, backend_script):
    procs = []

    def start():
        procs.append(runtime.spawn(_spec(backend_script, name=f"t{len(procs)}")))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # the request threads end; their children must not (PDEATHSIG follows the forking thread)
    assert _until(lambda: all(p.phase is Phase.READY for p in procs))
    time.sleep(0.3)
    assert all(p.popen.poll() is None for p in procs)


def test_gpu_memory_from_nvidia_smi_wins_over_rss(runtime, backend_script, tmp_path, monkeypatch):
    proc = runtime.spawn(_spec(backend_script))
    assert _until(lambda: proc.phase is Phase.READY)
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    # What `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` prints: MiB per pid.
    fake.write_text(f"#!/bin/sh\necho '{proc.pid}, 75000'\necho '999999, 1000'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    sample = runtime.sample_memory([proc])[proc.pid]
    assert (sample.source, sample.memory_bytes) == ("nvidia-smi", 75000 * 2**20)
