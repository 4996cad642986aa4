"""A request head that misses its deadline is answered 408 with `Connection: close`, not cut without a word.

Why: under gunicorn's gevent worker the head deadline (`--header-timeout`) used to close the connection
silently, so a slow client could not tell a deadline from a crash, while a stalled body got a 408. And
gunicorn drops the `Connection: close` an app sets, so that 408 said keep-alive and then closed. Each
test drives `serving.runner.serve` in its own process with raw sockets, as a client on a slow link would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import answers_200, wait_until

pytestmark = pytest.mark.integration

DEADLINE_SECONDS = 1

SERVER = textwrap.dedent(
    """
    import sys
    from flask import Flask, Response
    from ibc.logs import configure
    from serving.runner import serve

    bind, worker_class, deadline = sys.argv[1], sys.argv[2], int(sys.argv[3])
    configure("INFO")

    def factory():
        app = Flask("deadline")
        app.add_url_rule("/livez", "livez", lambda: "ok")
        app.add_url_rule("/closing", "closing", lambda: Response("bye", headers={"Connection": "close"}))
        return app

    def answer():
        return "application/json", b'{"error": {"code": "request_timeout"}}'

    sys.exit(serve(factory, bind=bind, worker_class=worker_class, header_timeout=deadline,
                   header_timeout_answer=answer, keepalive=deadline, name="deadline-test"))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["gevent", "gthread"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    argv = [sys.executable, "-c", SERVER, f"127.0.0.1:{port}", request.param, str(DEADLINE_SECONDS)]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answers_200(f"http://127.0.0.1:{port}/livez", timeout=1), 30, "the server live")
        yield request.param, port
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def until_closed(sock: socket.socket, timeout_seconds: float) -> tuple[bytes, float]:
    """Everything the server sent until it closed the connection, and when the close came (monotonic)."""
    sock.settimeout(timeout_seconds)
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return got, time.monotonic()
        got += data


HALF_HEAD = b"GET /livez HTTP/1.1\r\nHost: x\r\n"
WHOLE = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("server", ["gevent"], indirect=True)  # gthread bounds a head by socket reads
@pytest.mark.parametrize(
    ("sent", "answers_first"),
    [(HALF_HEAD, 0), (b"", 0), (WHOLE, 1)],
    ids=["half-a-head", "nothing-sent", "idle-after-a-keep-alive-answer"],
)
def test_a_head_past_its_deadline_gets_408_and_the_connection_closes(
    server: tuple[str, int], sent: bytes, answers_first: int
) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        got, closed_at = until_closed(sock, 10 * DEADLINE_SECONDS)
    answers = got.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == answers_first + 1, got
    last = b"HTTP/1.1 " + answers[-1]
    assert last.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got
    assert b"\r\nConnection: close\r\n" in last and b"\r\nContent-Type: application/json\r\n" in last
    assert last.endswith(b'{"error": {"code": "request_timeout"}}')
    assert DEADLINE_SECONDS - 0.1 <= closed_at - started <= DEADLINE_SECONDS + 2.5


def test_a_head_in_time_is_served_without_a_408(server: tuple[str, int]) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(HALF_HEAD)
        time.sleep(DEADLINE_SECONDS / 4)  # the client is slow, but within the deadline (this IS the scenario)
        sock.sendall(b"Connection: close\r\n\r\n")
        got, _ = until_closed(sock, 10 * DEADLINE_SECONDS)
    assert got.startswith(b"HTTP/1.1 200 ") and b"408" not in got.split(b"\r\n", 1)[0], got


def test_an_apps_connection_close_reaches_the_client_and_closes(server: tuple[str, int]) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /closing HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        got, closed_at = until_closed(sock, 10 * DEADLINE_SECONDS)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"bye"), got
    assert b"\r\nConnection: close\r\n" in got and b"keep-alive" not in got.lower(), got
    assert closed_at - started < DEADLINE_SECONDS / 2, "closed after the answer, not by the idle deadline"
