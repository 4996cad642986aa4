"""The lean transport and h11 read the same backend byte streams to the same verdicts.

Each stream is sent by a real socket on 127.0.0.1 (then closed) and read through
`LeanTransport.handle_request`; the same bytes go to an `h11.Connection` playing the client. A verdict
is `("ok", status, body)` or `("error",)`. One difference is intended and asserted as such: a response
with both Content-Length and Transfer-Encoding is an error for the transport (RFC 9112 6.3 allows it;
a proxy should not guess which framing a backend meant), while h11 lets Transfer-Encoding win.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import h11
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.transport import LeanTransport

pytestmark = pytest.mark.integration

Verdict = tuple[object, ...]


class OneShotServer:
    """Answers each connection with the next byte stream handed to `answer`, then closes it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.data = b""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                got = b""
                while b"\r\n\r\n" not in got:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    got += piece
                conn.sendall(self.data)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # until the client closes: no RST that could eat our bytes
                    pass


@pytest.fixture(scope="module")
def server() -> Iterator[OneShotServer]:
    s = OneShotServer()
    yield s
    s.sock.close()


def transport_verdict(server: OneShotServer, data: bytes, method: str = "POST") -> Verdict:
    server.data = data
    transport = LeanTransport(connect_timeout_seconds=2, read_timeout_seconds=2)
    try:
        response = transport.handle_request(httpx.Request(method, server.url + "/v1/x", content=b"{}"))
        try:
            body = b"".join(response.iter_raw())
        finally:
            response.close()
        return ("ok", response.status_code, body)
    except httpx.RemoteProtocolError:
        return ("error",)
    finally:
        transport.close()


def h11_verdict(data: bytes, method: str = "POST") -> Verdict:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/v1/x", headers=[("Host", "x"), ("Content-Length", "2")]))
    conn.send(h11.Data(data=b"{}"))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    status, body = None, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return ("error",)
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return ("ok", status, body)
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return ("error",)


def both_framings(data: bytes) -> bool:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return b"\ncontent-length:" in head and b"\ntransfer-encoding:" in head


def check(server: OneShotServer, data: bytes, method: str = "POST") -> Verdict:
    ours, theirs = transport_verdict(server, data, method), h11_verdict(data, method)
    if both_framings(data) and theirs[0] == "ok":
        assert ours == ("error",), f"{data!r}: Content-Length with Transfer-Encoding must be refused"
    else:
        assert ours == theirs, f"{data!r}: transport {ours} vs h11 {theirs}"
    return ours


OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"
CASES = {
    "content-length": OK + b"Content-Length: 5\r\n\r\nhello",
    "same-length-twice": OK + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "same-length-listed": OK + b"Content-Length: 5, 5\r\n\r\nhello",
    "conflicting-lengths": OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "conflicting-length-list": OK + b"Content-Length: 5, 6\r\n\r\nhello!",
    "signed-length": OK + b"Content-Length: +5\r\n\r\nhello",
    "negative-length": OK + b"Content-Length: -1\r\n\r\nhello",
    "hex-length": OK + b"Content-Length: 0x5\r\n\r\nhello",
    "empty-length": OK + b"Content-Length:\r\n\r\nhello",
    "huge-length": OK + b"Content-Length: 123456789012345678901\r\n\r\nhello",
    "truncated-body": OK + b"Content-Length: 10\r\n\r\nhello",
    "length-and-chunked": OK + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked-and-length": OK + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked": CHUNKED + b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
    "chunked-upper-hex": CHUNKED + b"A\r\n0123456789\r\n0\r\n\r\n",
    "chunked-extension": CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n",
    "chunked-trailer": CHUNKED + b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n",
    "chunked-bad-trailer": CHUNKED + b"5\r\nhello\r\n0\r\nnot a header\r\n\r\n",
    "chunk-size-space-after": CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",
    "chunk-size-space-before": CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-plus": CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-0x": CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-underscore": CHUNKED + b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "chunk-size-negative": CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-not-hex": CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-empty": CHUNKED + b"\r\nhello\r\n0\r\n\r\n",
    "chunk-size-too-long": CHUNKED + b"000000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-size-bare-lf": CHUNKED + b"5\nhello\r\n0\r\n\r\n",
    "chunk-longer-than-size": CHUNKED + b"3\r\nhello\r\n0\r\n\r\n",
    "chunk-missing-crlf": CHUNKED + b"5\r\nhello0\r\n\r\n",
    "chunked-truncated": CHUNKED + b"5\r\nhel",
    "chunked-no-last-chunk": CHUNKED + b"5\r\nhello\r\n",
    "chunked-uppercase": OK + b"Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "gzip-chunked": OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunked-twice": OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "identity": OK + b"Transfer-Encoding: identity\r\n\r\nhello",
    "close-delimited": OK + b"\r\nuntil the end",
    "http10-close": b"HTTP/1.0 200 OK\r\n\r\nold",
    "no-reason": b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    "bare-lf-head": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "folded-header": OK + b"X-A: 1\r\n  2\r\nContent-Length: 2\r\n\r\nok",
    "fold-at-start": OK + b" X-A: 1\r\nContent-Length: 2\r\n\r\nok",
    "space-before-colon": OK + b"Content-Length : 2\r\n\r\nok",
    "no-colon": OK + b"Content-Length 2\r\n\r\nok",
    "bad-status-line": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "lowercase-http": b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "garbage": b"garbage\r\n\r\n",
    "empty": b"",
    "truncated-head": OK + b"Content-Len",
    "continue-then-ok": b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok",
    "no-content-with-length": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    "not-modified": b"HTTP/1.1 304 Not Modified\r\n\r\n",
}


@pytest.mark.parametrize("data", list(CASES.values()), ids=list(CASES))
def test_same_verdict_as_h11(server: OneShotServer, data: bytes) -> None:
    check(server, data)


def test_head_response_has_no_body(server: OneShotServer) -> None:
    assert check(server, OK + b"Content-Length: 5\r\n\r\n", method="HEAD") == ("ok", 200, b"")


def test_the_smuggling_cases_are_refused(server: OneShotServer) -> None:
    # What the table above means for a user: none of these reaches a client as a guessed body.
    for name in ("conflicting-lengths", "length-and-chunked", "chunk-size-plus", "chunk-size-0x", "gzip-chunked"):
        assert transport_verdict(server, CASES[name]) == ("error",), name


_length = st.sampled_from([b"5", b"05", b"5, 5", b"5,6", b"+5", b"-5", b" 5", b"5 ", b"0x5", b"", b"5a", b"6", b"4"])
_encoding = st.sampled_from([b"chunked", b"CHUNKED", b"gzip, chunked", b"chunked, chunked", b"identity", b" chunked"])
_size = st.sampled_from([b"5", b"05", b"+5", b" 5", b"5 ", b"5\t", b"0x5", b"5;x=y", b"5;", b"-5", b"5_", b"g", b""])
_end = st.sampled_from([b"\r\n", b"\n", b"", b"X\r\n", b"\r\n\r\n"])
_last = st.sampled_from([b"\r\n", b"T: 1\r\n\r\n", b""])


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    headers = b""
    for _ in range(draw(st.integers(0, 2))):
        headers += b"Content-Length: " + draw(_length) + b"\r\n"
    for _ in range(draw(st.integers(0, 2))):
        headers += b"Transfer-Encoding: " + draw(_encoding) + b"\r\n"
    if draw(st.booleans()):
        body = draw(_size) + b"\r\nhello" + draw(_end) + b"0\r\n" + draw(_last)
    else:
        body = b"hello"
    return OK + headers + b"\r\n" + body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=responses())
def test_generated_framings_get_the_same_verdict_as_h11(server: OneShotServer, data: bytes) -> None:
    check(server, data)
