"""`GET /status`, `ibc status` and `ibc start|stop` against a real `ibc local` (mock backends as processes)."""

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.integration.test_local_mode import MESSAGES, _config, _until, local_factory  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def _ibc(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "ibc", *argv], capture_output=True, text=True, timeout=timeout)


def _status(local):
    return httpx.get(f"{local.url}/status", timeout=5).json()


def _model(local, name):
    return next(m for m in _status(local)["models"] if m["name"] == name)


def test_status_after_a_429_says_what_the_429_said(local_factory):  # noqa: F811 (fixture)
    server = local_factory(_config(cooldown_ab="10m"))
    client = server.client()
    client.chat.completions.create(model="model-a", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="model-b", messages=MESSAGES)
    body = refused.value.response.json()
    doc = _status(server)
    models = {m["name"]: m for m in doc["models"]}
    refusal = models["model-b"]["last_refusal"]
    for field in ("message", "requested", "available", "blocking"):
        assert refusal[field] == body[field], field
    assert doc["models"][0]["name"] == "model-a"  # the largest holder first
    assert models["model-a"]["placements"][0]["node"] == "shadow" and models["model-a"]["held"] == "80Gi"
    assert doc["nodes"][0]["free"] == body["available"] == "48Gi"

    shown = _ibc("status", "--url", server.url)
    assert shown.returncode == 0, shown.stderr
    assert "model-b" in shown.stdout.split("LAST REFUSALS", 1)[1]
    assert "shadow  80Gi / 128Gi" in shown.stdout


def test_requests_held_during_a_start_are_counted(local_factory):  # noqa: F811 (fixture)
    server = local_factory(_config(startup_delay="3"))
    answers = []
    thread = threading.Thread(
        target=lambda: answers.append(server.client().chat.completions.create(model="model-c", messages=MESSAGES))
    )
    thread.start()
    try:
        assert _until(lambda: _model(server, "model-c")["held_requests"] == 1, timeout=10)
        assert _model(server, "model-c")["state"] == "starting"
    finally:
        thread.join(30)
    assert len(answers) == 1
    assert _until(lambda: _model(server, "model-c")["held_requests"] == 0, timeout=5)
    assert _model(server, "model-c")["state"] == "ready"


def test_ibc_start_and_stop_by_hand(local_factory):  # noqa: F811 (fixture)
    server = local_factory(_config(cooldown_ab="10m"))
    started = _ibc("start", "model-a", "--url", server.url, "--wait", "20")
    assert started.returncode == 0 and started.stdout.strip() == "model-a: ready", started.stderr
    assert len(server.backend_pids("model-a")) == 1

    refused = _ibc("start", "model-b", "--url", server.url)
    assert refused.returncode == 1 and "blocked by model-a" in refused.stderr
    assert server.backend_pids("model-b") == []

    stopped = _ibc("stop", "model-a", "--url", server.url)
    assert stopped.returncode == 0 and "stopping 1 replica" in stopped.stdout, stopped.stderr
    assert _until(lambda: server.backend_pids("model-a") == [] and _model(server, "model-a")["state"] == "stopped")
    assert _ibc("stop", "model-a", "--url", server.url).stdout.strip() == "model-a: was not running"
    # The memory is free again: model-b starts now, by hand too.
    assert _ibc("start", "model-b", "--url", server.url, "--wait", "20").returncode == 0


def test_stopping_a_starting_model_answers_its_held_requests_at_once(local_factory):  # noqa: F811 (fixture)
    server = local_factory(_config(startup_delay="20"))
    errors = []

    def held():
        try:
            server.client().chat.completions.create(model="model-c", messages=MESSAGES)
        except openai.APIStatusError as exc:
            errors.append(exc)

    thread = threading.Thread(target=held)
    thread.start()
    try:
        assert _until(lambda: _model(server, "model-c")["held_requests"] == 1, timeout=10)
        began = time.monotonic()
        assert httpx.post(f"{server.url}/models/model-c/stop", timeout=5).json()["stopping"] == 1
    finally:
        thread.join(30)
    assert time.monotonic() - began < 5  # not the 20 s start, nor the cold-start timeout
    assert errors and errors[0].status_code == 503 and "stopped by hand" in str(errors[0])


@pytest.mark.parametrize("command", ["status", "start", "stop"])
def test_unreachable_proxy_is_one_line_and_exit_1(command):
    argv = [command] if command == "status" else [command, "model-a"]
    done = _ibc(*argv, "--url", "http://127.0.0.1:1")
    assert done.returncode == 1 and "cannot reach http://127.0.0.1:1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
