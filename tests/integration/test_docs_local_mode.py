"""docs/local-mode.md's examples, run as written against a real `ibc local --config examples/local.yaml`.

Every fenced example on the page is run: the `console` blocks (each `$ command`, compared with the
output shown), the `python` block (each commented `print` compared with what it prints), the `yaml`
configuration (`ibc local --check` must accept it) and the `bash` start command (the one this test runs).
Outputs are compared loosely where time passes: digits are wildcards, whitespace is ignored, and `...` in
the page stands for anything; an HTTP status line must match and each header shown must be sent.
A page that drifts from what the product prints fails here (and in test_deploy_docs for the links).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_local_mode import Local

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "local-mode.md"
BLOCK = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.S | re.M)  # also blocks indented in a list


def blocks(kind: str) -> list[str]:
    text = PAGE.read_text().split("\n## Tests", 1)[0]  # the pytest commands at the end are this file's job
    return [textwrap.dedent(body) for _, lang, body in BLOCK.findall(text) if lang == kind]


def commands(block: str) -> list[tuple[str, str]]:
    """(command, output shown) pairs of a console block: `$ ` lines, with `\\` continuations."""
    pairs: list[tuple[str, list[str]]] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            pairs.append((cmd, []))
        elif pairs:
            pairs[-1][1].append(line)
        i += 1
    return [(cmd, "\n".join(out)) for cmd, out in pairs]


def _norm(text: str) -> str:
    return re.sub(r"[0-9]+", "0", re.sub(r"\s+", "", text))


def assert_shows(shown: str, actual: str) -> None:
    """Every piece of `shown` between `...` appears in `actual`, in order (digits and spaces aside)."""
    real = _norm(actual)
    pos = 0
    for piece in (p for p in _norm(shown).split("...") if p):
        found = real.find(piece, pos)
        assert found >= 0, f"the page shows\n{shown}\nbut the product printed\n{actual}\n(missing: {piece})"
        pos = found + len(piece)


def assert_http(shown: str, actual: str) -> None:
    shown_head, _, shown_body = shown.replace("\r\n", "\n").partition("\n\n")
    head, _, body = actual.replace("\r\n", "\n").partition("\n\n")
    shown_lines, lines = shown_head.splitlines(), head.splitlines()
    assert shown_lines[0] == lines[0], (shown_lines[0], lines[0])  # the status line, word for word
    sent = {_norm(line.lower()) for line in lines[1:]}
    for header in shown_lines[1:]:
        assert _norm(header.lower()) in sent, f"{header!r} not among {lines[1:]}"
    assert_shows(shown_body, body)


def run_shell(cmd: str, port: int, cwd: Path = REPO) -> str:
    cmd = cmd.replace("localhost:8080", f"127.0.0.1:{port}")
    cmd = re.sub(r"^ibc ", f"{sys.executable} -m ibc ", cmd)
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=cwd)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory):
    (start,) = [b for b in blocks("bash") if "ibc local" in b]
    assert start.split("#")[0].split() == ["ibc", "local", "--config", "examples/local.yaml"]
    server = Local(tmp_path_factory.mktemp("docs"), (REPO / "examples" / "local.yaml").read_text())
    yield server
    server.stop()


def test_every_example_kind_on_the_page_is_run():
    kinds = {lang for _, lang, _ in BLOCK.findall(PAGE.read_text().split("\n## Tests", 1)[0])}
    assert kinds <= {"bash", "console", "python", "yaml"}, kinds  # a new kind needs a runner below


def test_the_console_examples_print_what_the_page_shows(local: Local, tmp_path: Path):
    ran = 0
    for block in blocks("console"):
        for cmd, shown in commands(block):
            if cmd.startswith("ibc local --config examples/local.yaml"):
                # The page's mistake: `memory: 60GB` in the second model of a copy of the example file.
                (tmp_path / "examples").mkdir(exist_ok=True)
                text = (REPO / "examples" / "local.yaml").read_text()
                first, second = text.split("memory: 60Gi", 1)
                (tmp_path / "examples" / "local.yaml").write_text(first + "memory: 60GB" + second)
                assert_shows(shown, run_shell(cmd, local.port, cwd=tmp_path))
            elif "/metrics" in cmd:
                deadline = time.monotonic() + 30  # the first memory sample is taken within 5 s
                while httpx.get(f"{local.url}/models/model-a/metrics", timeout=5).json()["lastObservation"] is None:
                    assert time.monotonic() < deadline, "no memory observation within 30 s"
                    time.sleep(0.2)
                assert_shows(shown, run_shell(cmd, local.port))
            elif " -si " in cmd:
                assert_http(shown, run_shell(cmd, local.port))
            else:
                assert_shows(shown, run_shell(cmd, local.port))
            ran += 1
    assert ran >= 4  # model-a served, model-b refused, the metrics, the config mistake


def test_the_python_example_prints_what_its_comments_say(local: Local, tmp_path: Path):
    (code,) = blocks("python")
    script = tmp_path / "example.py"
    script.write_text(code.replace("127.0.0.1:8080", f"127.0.0.1:{local.port}"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = [line.split("#", 1)[1].strip() for line in code.splitlines() if line.strip().startswith("print(")
                and "#" in line]
    printed = done.stdout.splitlines()
    assert len(printed) == len(expected), (printed, expected)
    for shown, actual in zip(expected, printed, strict=True):
        assert_shows(shown, actual)
    assert "None" not in done.stdout


def test_the_configuration_example_is_accepted(tmp_path: Path):
    (config,) = [b for b in blocks("yaml") if "models:" in b]
    path = tmp_path / "local.yaml"
    path.write_text(config)
    done = subprocess.run(
        [sys.executable, "-m", "ibc", "local", "--config", str(path), "--check"], capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
