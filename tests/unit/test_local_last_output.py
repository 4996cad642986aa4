"""`lastFailure` quotes what a model process said just before it exited: its own error, not a traceback
frame, an access-log line on stdout, or a warning from long ago."""

from types import SimpleNamespace

import pytest

from local.runtime import ManagedProcess, ProcessSpec

pytestmark = pytest.mark.unit

TRACEBACK = [
    "llama_model_load: error loading model: tensor 'blk.0.ffn_down.weight' data is not within the file bounds",
    "llama_model_load_from_file_impl: failed to load model",
    "Traceback (most recent call last):",
    *[f'  File "/venv/llama_cpp/frame{i}.py", line {i}, in f{i}' for i in range(12)],
    '    raise ValueError(f"Failed to load model from file: {path_model}")',
    "ValueError: Failed to load model from file: /models/m.gguf",
]


@pytest.mark.parametrize(
    ("stdout", "stderr", "quoted"),
    [
        pytest.param([], [], "", id="said-nothing"),
        pytest.param(["listening on 8000", "GET /health 200"], [], "GET /health 200", id="stdout-only"),
        pytest.param(
            ["INFO: POST /v1/chat/completions 200"],
            ["INFO: Started server process", "INFO: Uvicorn running on http://127.0.0.1:8000"],
            "INFO: Started server process | INFO: Uvicorn running on http://127.0.0.1:8000",
            id="stderr-over-an-access-log-line",
        ),
        pytest.param(
            [],
            TRACEBACK,
            f"{TRACEBACK[0]} | {TRACEBACK[1]} | {TRACEBACK[-1]}",
            id="loader-error-and-exception-not-frames",
        ),
        pytest.param(
            [],
            ["warning: old error long ago", *[f"tick {i}" for i in range(100)]],
            "tick 97 | tick 98 | tick 99",
            id="an-old-error-outside-the-window-is-not-quoted",
        ),
        pytest.param([], ["x" * 1000], "x" * 297 + "...", id="long-line-clipped"),
    ],
)
def test_last_output_quotes_the_reason(stdout, stderr, quoted):
    spec = ProcessSpec(owner="local/m", name="m", argv=("engine",), port=1, health_url="http://127.0.0.1:1/health")
    proc = ManagedProcess(spec, SimpleNamespace(pid=1), started_at=0.0)  # type: ignore[arg-type]
    for line in stdout:
        proc.tail.append(line)
    for line in stderr:
        proc.tail.append(line)
        proc.stderr_tail.append(line)
    assert proc.last_output() == quoted
