"""The engine tier's parts: llama.cpp's OpenAI server (built once by build-engine.sh), three generated
GGUF models (cached by the generator's own digest), and `ibc local` run as a user runs it."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.engine.parts import HERE, built_engine_python, cached_models
from tests.integration.test_local_mode import Local

MI = 2**20


NOT_BUILT = "llama.cpp's server is not built (`bash tests/engine/build-engine.sh`; needs a C++ compiler and cmake)"


@pytest.hookimpl(trylast=True)  # after `-m` deselection: only a selected engine test costs the check
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the engine: one line and the tier left out; under CI=true the tests stay and fail instead."""
    mine = [item for item in items if HERE in Path(item.path).parents]
    if not mine or os.environ.get("CI") == "true" or built_engine_python() is not None:
        return
    items[:] = [item for item in items if item not in mine]
    config.hook.pytest_deselected(items=mine)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"engine tier skipped ({len(mine)} tests): {NOT_BUILT}")


@pytest.fixture(scope="session")
def engine_python() -> str:
    """The python of the engine's venv."""
    python = built_engine_python()
    if python is None:
        pytest.fail(f"engine tier under CI=true: {NOT_BUILT}")  # outside CI the tier was left out at collection
    return python


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    return cached_models()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout_seconds: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll until `predicate()` is truthy; its value, or AssertionError naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds:g}s waiting for {what}")
        time.sleep(interval)


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live process below `root`."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            continue
        parents[int(entry)] = int(fields[1])
        cmdlines[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace")
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdlines[pid]
                todo.append(pid)
    return found


def rss_bytes(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LocalIbc(Local):
    """`ibc local` as the integration tier runs it (a subprocess, its log in a file), with engine helpers."""

    def __init__(self, tmp_path: Path, config_text: str) -> None:
        super().__init__(tmp_path, config_text)
        self.seen_engines: set[int] = set()

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout)

    def engine_pids(self, model_file: Path) -> list[int]:
        """The engine processes serving `model_file` right now."""
        pids = sorted(pid for pid, cmd in descendants(self.proc.pid).items() if f"--model {model_file} " in cmd)
        self.seen_engines.update(pids)
        return pids

    def metrics(self, model: str) -> dict:  # type: ignore[type-arg]
        response = httpx.get(f"{self.url}/models/{model}/metrics", timeout=10)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def local_ibc(tmp_path: Path) -> Iterator[list[LocalIbc]]:
    """Start with `started.append(LocalIbc(...))`; every one is stopped, and leaves no engine behind."""
    started: list[LocalIbc] = []
    yield started
    for ibc in started:
        try:
            ibc.stop(timeout=60)
            left = [pid for pid in ibc.seen_engines if alive(pid)]
            assert not left, f"engine processes outlived ibc local: {left}"
        finally:
            ibc.cleanup()


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")
