"""What running real engines under `ibc local` needs, with small stand-ins: each model's output in its own
file (named in `/v1/models`) and only its first lines in ibc's log; `lastFailure` quoting the last stderr
lines before the exit; model processes on ports from the config's `ports:` range."""

import json
import socket
import sys
import textwrap

import httpx
import openai
import pytest

from local.runtime import FORWARDED_LINES
from tests.integration import test_local_mode
from tests.integration.test_local_mode import MESSAGES, _proc_rows

pytestmark = pytest.mark.integration
local_factory = test_local_mode.local_factory  # the same `ibc local` subprocess fixture

# Like an engine that fails to load: a flood of start-up lines on stdout, the error on stderr, then one
# more stdout line after it (an access log, say) that is not the reason.
CHATTY_FAILURE = textwrap.dedent(
    """
    import sys
    for i in range(200):
        print("loader: tensor", i, "loaded", flush=True)
    print("llama_model_load: error loading model: tensor data is not within the file bounds", file=sys.stderr)
    print("ValueError: Failed to load model from file", file=sys.stderr, flush=True)
    print("INFO: unrelated access log line", flush=True)
    sys.exit(1)
    """
)


def _model(name: str, command: list[str], extra: str = "") -> str:
    return f"  - name: {name}\n    memory: 1Gi\n    stop_grace_period: 5s\n    command: {json.dumps(command)}\n{extra}"


def _mock(name: str) -> str:
    return _model(name, ["ibc", "mock-backend", "--bind", "127.0.0.1:{port}", "--model", name])


def _free_range(size: int) -> int:
    """The first port of `size` consecutive ports that are free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size > 65535:
            continue
        try:
            held = []
            for port in range(base, base + size):
                probe = socket.socket()
                held.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in held:
                probe.close()
    raise AssertionError("no free port range")


def test_a_models_output_goes_to_its_own_file_and_the_failure_quotes_stderr(local_factory, tmp_path):
    logs = tmp_path / "model-logs"
    command = [sys.executable, "-c", CHATTY_FAILURE, "{port}"]
    local = local_factory(f"nodes: [{{name: n, memory: 2Gi}}]\nlogs: {logs}\nmodels:\n" + _model("broken", command))
    with pytest.raises(openai.InternalServerError) as info:
        local.client().chat.completions.create(model="broken", messages=MESSAGES)
    assert info.value.status_code == 503
    reason = (
        "exited with code 1: llama_model_load: error loading model: tensor data is not within the file bounds"
        " | ValueError: Failed to load model from file"
    )
    assert reason in str(info.value)
    assert httpx.get(f"{local.url}/models/broken/metrics", timeout=5).json()["lastFailure"] == reason

    listed = httpx.get(f"{local.url}/v1/models", timeout=5).json()["data"]
    path = next(m for m in listed if m["id"] == "broken")["log"]
    assert path == str(logs / "broken.log")
    status = httpx.get(f"{local.url}/status", timeout=5).json()
    assert next(m for m in status["models"] if m["name"] == "broken")["log"] == path
    text = (logs / "broken.log").read_text()
    assert "ibc local started pid" in text.splitlines()[0]
    assert "loader: tensor 199 loaded" in text and "Failed to load model" in text and "access log" in text

    ibc_log = local.log_path.read_text()
    forwarded = [line for line in ibc_log.splitlines() if "broken | " in line and "broken | ..." not in line]
    assert len(forwarded) == FORWARDED_LINES, "only the first lines of a model's output reach ibc's log"
    assert f"broken | ... (the rest of its output: {path})" in ibc_log


def test_model_processes_listen_on_ports_from_the_range(local_factory):
    base = _free_range(3)
    models = _mock("model-a") + _mock("model-b")
    local = local_factory(f"nodes: [{{name: n, memory: 4Gi}}]\nports: {base}-{base + 2}\nmodels:\n" + models)
    client = local.client()
    for name in ("model-a", "model-b"):
        client.chat.completions.create(model=name, messages=MESSAGES)
    rows = _proc_rows()
    ports = {
        int(rows[pid][2].split("--bind 127.0.0.1:", 1)[1].split()[0])
        for name in ("model-a", "model-b")
        for pid in local.backend_pids(name)
    }
    assert len(ports) == 2 and all(base <= port <= base + 2 for port in ports), (base, ports)


def test_a_range_with_no_free_port_is_a_503_that_says_so(local_factory):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        local = local_factory(f"nodes: [{{name: n, memory: 4Gi}}]\nports: {port}\nmodels:\n" + _mock("model-a"))
        with pytest.raises(openai.InternalServerError) as info:
            local.client().chat.completions.create(model="model-a", messages=MESSAGES)
    assert info.value.status_code == 503
    assert f"no free port in {port}-{port}" in str(info.value)
