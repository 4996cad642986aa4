"""The proxy's lean HTTP/1.1 transport against scripted servers on 127.0.0.1.

What the proxy relies on: every body framing a model server may use (Content-Length, chunked with or
without trailers, close-delimited), keep-alive reuse, a fresh retry when a backend closed an idle
connection (and never a re-send of a request the backend may have read), and failures surfacing as
the httpx exceptions the request path maps to 502/504.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from proxy.transport import LeanTransport
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

Script = Callable[[socket.socket, int], bool]  # (connection, request index) -> keep the connection open?


class ScriptedServer:
    """Accepts connections; for each request head read, runs `script(conn, n)`; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests = 0
        self.bodies: list[bytes] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(buf) < length:
                    buf += conn.recv(65536)
                self.bodies.append(buf[:length])
                buf = buf[length:]
                n = self.requests
                self.requests += 1
                if not self.script(conn, n):
                    return

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def transport() -> Iterator[LeanTransport]:
    t = LeanTransport(connect_timeout_seconds=2, read_timeout_seconds=1)
    yield t
    t.close()


def post(transport: LeanTransport, url: str, body: bytes = b'{"x":1}') -> tuple[int, dict[str, str], bytes]:
    request = httpx.Request(
        "POST", f"{url}/v1/chat/completions?a=1", content=body, headers={"content-type": "application/json"}
    )
    response = transport.handle_request(request)
    try:
        data = b"".join(response.iter_raw())
    finally:
        response.close()
    return response.status_code, dict(response.headers), data


def reply(raw: bytes, keep: bool = True) -> Script:
    def script(conn: socket.socket, n: int) -> bool:
        conn.sendall(raw)
        return keep

    return script


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", id="content-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
            b"hello",
            id="chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
            b"hello",
            id="chunked-extension-and-trailer",
        ),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            id="100-continue-first",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="no-content"),
    ],
)
def test_body_framings_and_keep_alive(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport, raw: bytes, body: bytes
) -> None:
    server = serve(reply(raw))
    for _ in range(3):
        status, _, data = post(transport, server.url)
        assert data == body
        assert status in (200, 204)
    assert server.connections == 1, "one connection reused for every request"
    assert server.bodies == [b'{"x":1}'] * 3


def test_close_delimited_body_and_connection_close_are_not_reused(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport
) -> None:
    server = serve(reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", keep=False))
    assert post(transport, server.url)[2] == b"until the end"
    assert post(transport, server.url)[2] == b"until the end"
    assert server.connections == 2
    assert transport.idle_connections() == 0


def test_streamed_chunks_are_yielded_as_they_arrive(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport
) -> None:
    def stream(conn: socket.socket, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = f"data: {i}\n\n".encode()
            conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            time.sleep(0.1)
        conn.sendall(b"0\r\n\r\n")
        return True

    server = serve(stream)
    response = transport.handle_request(httpx.Request("POST", f"{server.url}/v1/x", content=b"{}"))
    arrivals = []
    for chunk in response.iter_raw():
        arrivals.append((time.monotonic(), chunk))
    response.close()
    assert [c for _, c in arrivals] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert arrivals[2][0] - arrivals[0][0] >= 0.15, "not buffered until the end"
    assert transport.idle_connections() == 1


def test_backend_that_closed_an_idle_connection_gets_one_fresh_try(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport
) -> None:
    # Answers, keeps the socket, then (like a keep-alive timeout) closes it without a word.
    def once_then_close(conn: socket.socket, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False

    server = serve(once_then_close)
    assert post(transport, server.url)[2] == b"ok"
    time.sleep(0.1)  # the server has closed its end by now
    assert post(transport, server.url)[2] == b"ok"
    assert server.connections == 2
    assert server.requests == 2, "the request was sent once to a live server"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"", id="closes-without-a-word"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", id="closes-mid-body"),
    ],
)
def test_request_a_backend_read_is_never_sent_again(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport, answer: bytes
) -> None:
    # Answers the first request; reads the second on the same (reused) connection, then goes away,
    # like a model server killed while it generates. A POST may have been acted on: no re-send.
    def answer_then_die(conn: socket.socket, n: int) -> bool:
        if n == 0:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        conn.sendall(answer)
        return False

    server = serve(answer_then_die)
    assert post(transport, server.url)[2] == b"ok"
    with pytest.raises(httpx.RemoteProtocolError):
        post(transport, server.url, body=b'{"second":1}')
    assert server.bodies.count(b'{"second":1}') == 1, "the request that was read was sent once"
    assert server.connections == 1, "no fresh connection was opened to re-send it"


def test_unread_body_is_not_reused(serve: Callable[[Script], ScriptedServer], transport: LeanTransport) -> None:
    server = serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"))
    response = transport.handle_request(httpx.Request("POST", f"{server.url}/v1/x", content=b"{}"))
    response.close()  # the client went away before reading
    assert transport.idle_connections() == 0
    assert post(transport, server.url)[2] == b"0123456789"


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        pytest.param(b"garbage\r\n\r\n", httpx.RemoteProtocolError, id="bad-status-line"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", httpx.RemoteProtocolError, id="truncated-body"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            httpx.RemoteProtocolError,
            id="bad-chunk-size",
        ),
        pytest.param(b"", httpx.RemoteProtocolError, id="closed-without-answer"),
    ],
)
def test_broken_answers_raise_protocol_errors(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport, raw: bytes, exc: type[Exception]
) -> None:
    server = serve(reply(raw, keep=False))
    with pytest.raises(exc):
        post(transport, server.url)


def test_silent_backend_is_a_read_timeout(serve: Callable[[Script], ScriptedServer], transport: LeanTransport) -> None:
    server = serve(lambda conn, n: (time.sleep(1.5), True)[1])
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(transport, server.url)
    assert time.monotonic() - started < 1.4


def test_refused_connection_is_a_connect_error(transport: LeanTransport) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        post(transport, f"http://127.0.0.1:{port}")


def test_request_head_carries_method_target_and_headers(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport
) -> None:
    heads: list[bytes] = []

    def capture(conn: socket.socket, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return True

    server = serve(capture)
    original = server._serve

    def spy(conn: socket.socket) -> None:
        peek = conn.recv(65536, socket.MSG_PEEK)
        heads.append(peek.split(b"\r\n\r\n", 1)[0])
        original(conn)

    server._serve = spy  # type: ignore[method-assign]
    post(transport, server.url, body=b"abc")
    wait_until(lambda: heads, message="the request head seen by the server")
    lines = heads[0].split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?a=1 HTTP/1.1"
    assert b"content-length: 3" in [line.lower() for line in lines]
    assert any(line.lower().startswith(b"host: 127.0.0.1:") for line in lines)


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashing backend or a dropped pod does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


@pytest.mark.parametrize("how", ["reset", "close"])
def test_request_written_to_a_reused_connection_is_never_sent_again(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport, how: str
) -> None:
    # The first request is answered and the connection kept; the second is read, then the backend dies
    # without answering. It may have started (and billed) a generation: the proxy must not re-send it.
    def answer_then_die(conn: socket.socket, n: int) -> bool:
        if n == 0:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        if how == "reset":
            _reset(conn)
        return False

    server = serve(answer_then_die)
    assert post(transport, server.url)[2] == b"ok"
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        post(transport, server.url, body=b'{"second":1}')
    assert server.bodies == [b'{"x":1}', b'{"second":1}'], "the second request was sent exactly once"
    assert server.connections == 1


def test_fresh_connection_reset_after_the_request_is_read_is_not_retried(
    serve: Callable[[Script], ScriptedServer], transport: LeanTransport
) -> None:
    def die(conn: socket.socket, n: int) -> bool:
        _reset(conn)
        return False

    server = serve(die)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        post(transport, server.url)
    assert server.requests == 1
    assert server.connections == 1
