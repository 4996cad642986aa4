"""LiteLLM as a client of ibc: its exception shows the 429's message, and its Router waits as Retry-After says.

LiteLLM comes from PyPI into its own venv under ~/.cache/ibc (like bench/ does for the LiteLLM proxy), so
its many dependencies never meet the project's. Outside CI a machine without PyPI skips this test with
one line; under CI=true it must install and run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_local_mode import Local

pytestmark = pytest.mark.integration

LITELLM_SPEC = "litellm==1.110.2"
VENV = Path.home() / ".cache" / "ibc" / f"litellm-client-{LITELLM_SPEC.split('==')[1]}"
SCRIPT = Path(__file__).with_name("litellm_client.py")

CONFIG = """\
nodes:
  - {name: shadow, memory: 128Gi}
models:
  - name: model-a
    memory: 80Gi
    cooldown: 8s
    stop_grace_period: 2s
    command: ibc mock-backend --bind 127.0.0.1:{port} --model model-a
  - name: model-b
    memory: 60Gi
    cooldown: 60s
    command: ibc mock-backend --bind 127.0.0.1:{port} --model model-b
"""


def litellm_python() -> Path:
    """The venv's python with LiteLLM installed (installed on first use); skip (or fail under CI) without it."""
    python = VENV / "bin" / "python"
    ready = VENV / ".installed"
    if not ready.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", LITELLM_SPEC],
                check=True, capture_output=True, timeout=900,
            )
            ready.touch()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            reason = f"LiteLLM could not be installed from PyPI into {VENV}: {exc}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    return python


def test_litellm_shows_the_message_and_waits_as_retry_after_says(tmp_path: Path) -> None:
    python = litellm_python()
    local = Local(tmp_path, CONFIG)
    try:
        run = subprocess.run(
            [str(python), str(SCRIPT), f"{local.url}/v1"], capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONPATH": ""},
        )
    finally:
        local.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    plain = result["plain"]
    assert (plain["type"], plain["status"]) == ("RateLimitError", 429), plain
    assert "model-b needs 60Gi in the whole cluster; 48Gi available; blocked by model-a" in plain["str"], plain
    assert result["router"].get("model") == "model-b", result["router"]
    statuses = re.findall(r"POST /v1/chat/completions model=model-b status=(\d+)", local.log_path.read_text())
    # One refusal for the plain call, then the Router's: it slept as told instead of spending its retries
    # (its own backoff, 0.5 s doubling, would have used all three long before model-a's cooldown ended).
    assert statuses[-1] == "200" and 2 <= statuses.count("429") <= 3, statuses
    assert result["router"]["elapsed"] >= 4, result  # model-a's 8 s cooldown, less the time since its request
