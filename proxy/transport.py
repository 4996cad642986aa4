"""A lean HTTP/1.1 transport for httpx: keep-alive sockets to model backends, nothing else.

Why not `httpx.HTTPTransport`: on the 2-core reference machine its httpcore + h11 layers cost the
proxy's hot path about 40% of its CPU per request (pool bookkeeping under a lock, a pure-Python state
machine, a separate write for headers and body). A proxy in front of known model servers needs only
this: write the request in one `sendall`, parse a status line and headers, read a Content-Length,
chunked or close-delimited body as it arrives, and put the socket back for the next request.

Exactness is not traded for speed, because a proxy that guesses is a smuggling or double-billing bug:

- a request is re-sent (on a fresh connection, never to a second replica from here) only when none of
  its bytes left this process: the pooled connection was found closed before writing, or the very first
  `send` failed with nothing written. Once the request is written, any failure is reported, never retried:
  the backend may have read it and started a billed generation;
- the response head and body framing are parsed as strictly as h11 (the differential test
  `tests/unit/test_transport_parser.py` holds the two to the same verdicts), and stricter in one place:
  a response with both Content-Length and Transfer-Encoding is refused (RFC 9112 6.3 lets a recipient
  treat it as an error; h11 lets Transfer-Encoding win).

It is an `httpx.BaseTransport`, so the request path still deals in `httpx.Request`/`httpx.Response`
and `iter_raw()`, and tests swap in `httpx.MockTransport`. `https://` backends (an InferenceModel's
`backendUrl` may be one) go through a regular `httpx.HTTPTransport`. Under gunicorn's gevent worker the
`socket` and `select` modules are patched, so every wait here yields to other requests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from proxy.client_io import immediate_poll

MAX_HEAD_BYTES = 64 * 1024
RECV_BYTES = 65536

# RFC 9110/9112 grammar, as h11 applies it (lenient only where real servers need it: a missing reason
# phrase, bare LF line ends, obsolete line folding, whitespace after a chunk size).
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: [ \t\x21-\xff]*)?")
_FIELD_VALUE = rb"[^\x00\s](?:[ \t]+[^\x00\s]|[^\x00\s])*"
_HEADER_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*(" + _FIELD_VALUE + rb")?[ \t]*")
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,20}")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_FOLD = re.compile(rb"[ \t]+")


class BadMessage(ValueError):
    """The backend's bytes are not a valid HTTP/1.1 response (the proxy answers 502, never guesses)."""


@dataclass(frozen=True)
class Head:
    """A parsed response head and how its body is framed: `mode` is length, chunked, close or none."""

    status: int
    headers: list[tuple[bytes, bytes]]
    mode: str
    length: int
    keep_alive: bool


def split_lines(block: bytes) -> list[bytes]:
    """The lines of a head (without its blank line), CRLF or bare LF."""
    return [line[:-1] if line.endswith(b"\r") else line for line in block.split(b"\n")]


def unfold(lines: list[bytes]) -> list[bytes]:
    """Field lines with obsolete line folding joined to the line they continue."""
    out: list[bytes] = []
    for line in lines:
        fold = _FOLD.match(line)
        if fold and out:
            out[-1] += b" " + line[fold.end() :]
        elif fold:
            raise BadMessage("continuation line at the start of the headers")
        else:
            out.append(line)
    return out


def parse_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header (or trailer) lines as (name, value) pairs; BadMessage on any malformed line."""
    fields = []
    for line in unfold(lines):
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise BadMessage(f"bad header line {line[:80]!r}")
        fields.append((match.group(1), match.group(2) or b""))
    return fields


def body_framing(status: int, method: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    """(mode, length) of a response body; BadMessage for conflicting or malformed framing headers."""
    length: bytes | None = None
    encoding: bytes | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            values = {v.strip() for v in value.split(b",")}
            if len(values) != 1:
                raise BadMessage("conflicting Content-Length values")
            (one,) = values
            if not _DIGITS.fullmatch(one):
                raise BadMessage(f"bad Content-Length {value[:40]!r}")
            if length is not None and length != one:
                raise BadMessage("conflicting Content-Length headers")
            length = one
        elif lower == b"transfer-encoding":
            if encoding is not None:
                raise BadMessage("more than one Transfer-Encoding header")
            encoding = value.lower()
            if encoding != b"chunked":
                raise BadMessage(f"unsupported Transfer-Encoding {value[:40]!r} (only chunked)")
    if status in (204, 304) or method == "HEAD":
        return "none", 0
    if encoding is not None and length is not None:
        raise BadMessage("both Content-Length and Transfer-Encoding: chunked")
    if encoding is not None:
        return "chunked", 0
    if length is not None:
        return "length", int(length)
    return "close", 0


def parse_head(block: bytes, method: str) -> Head | None:
    """The head in `block` (up to, not including, its blank line); None for a 1xx (another head follows)."""
    lines = split_lines(block)
    match = _STATUS_LINE.fullmatch(lines[0]) if lines else None
    if match is None:
        raise BadMessage(f"bad status line {lines[0][:80] if lines else b''!r}")
    status = int(match.group(3))
    headers = parse_fields(lines[1:])
    if status < 200:
        if status == 101:
            raise BadMessage("101 Switching Protocols without an Upgrade request")
        return None
    mode, length = body_framing(status, method, headers)
    connection = b",".join(v for n, v in headers if n.lower() == b"connection").lower()
    tokens = {t.strip() for t in connection.split(b",")}
    keep_alive = match.group(1, 2) == (b"1", b"1") and b"close" not in tokens
    return Head(status, headers, mode, length, keep_alive and mode != "close")


def parse_chunk_size(line: bytes) -> int:
    """The size in a chunk header line (without its CRLF); BadMessage unless it is hex digits."""
    match = _CHUNK_HEADER.fullmatch(line)
    if match is None:
        raise BadMessage(f"bad chunk size line {line[:40]!r}")
    return int(match.group(1), 16)


_LAST = b""  # `_take_chunk`'s answer after the last chunk (a real chunk's data is never empty)


class _NothingSent(Exception):
    """A pooled connection turned out closed before any byte of the request was written."""


class _Conn:
    """One TCP connection to a backend and the bytes read from it but not yet consumed."""

    __slots__ = ("buffer", "idle_since", "origin", "reused", "sock")

    def __init__(self, sock: socket.socket, origin: tuple[str, int]) -> None:
        self.sock = sock
        self.origin = origin
        self.buffer = bytearray()
        self.reused = False
        self.idle_since = 0.0

    def fill(self) -> int:
        data = self.sock.recv(RECV_BYTES)
        self.buffer += data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def stale(self) -> bool:
        """Readable while idle means closed by the peer (or garbage): not reusable."""
        try:
            poller = immediate_poll()
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def write(self, payload: bytes) -> None:
        """Send all of `payload`; `_NothingSent` when the very first send fails having written nothing."""
        view = memoryview(payload)
        sent = 0
        while sent < len(view):
            try:
                sent += self.sock.send(view[sent:])
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
                if sent == 0:
                    raise _NothingSent() from exc
                raise


class _Body(httpx.SyncByteStream):
    """The response body, de-chunked, yielded as it arrives; the socket goes back to the pool at the end."""

    def __init__(self, transport: LeanTransport, conn: _Conn, request: httpx.Request, head: Head) -> None:
        self._transport = transport
        self._conn = conn
        self._request = request
        self._mode = head.mode
        self._length = head.length
        self._keep_alive = head.keep_alive
        self._done = head.mode == "none" or (head.mode == "length" and head.length == 0)
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._mode == "length":
                yield from self._by_length()
            elif self._mode == "chunked":
                yield from self._chunked()
            elif self._mode == "close":
                yield from self._until_close()
        except BadMessage as exc:
            self._keep_alive = False
            raise httpx.RemoteProtocolError(f"backend sent a malformed body: {exc}", request=self._request) from exc
        except TimeoutError as exc:
            self._keep_alive = False
            raise httpx.ReadTimeout(f"backend silent for too long: {exc}", request=self._request) from exc
        except OSError as exc:
            self._keep_alive = False
            raise httpx.ReadError(f"backend connection broke: {exc}", request=self._request) from exc

    def _by_length(self) -> Iterator[bytes]:
        conn = self._conn
        remaining = self._length
        while remaining > 0:
            if not conn.buffer and not conn.fill():
                raise BadMessage("the backend closed the connection mid-body")
            piece = bytes(conn.buffer[:remaining])
            del conn.buffer[: len(piece)]
            remaining -= len(piece)
            yield piece
        self._done = True

    def _chunked(self) -> Iterator[bytes]:
        """Each arrival's complete chunks joined into one piece: a backlog (a slow proxy, a burst) costs
        one write downstream, not one per token."""
        conn = self._conn
        buf = conn.buffer
        while True:
            pieces = []
            while True:
                piece = self._take_chunk(buf)
                if piece is None:
                    break
                if not piece:  # _LAST
                    if pieces:
                        yield b"".join(pieces)
                    self._done = True
                    return
                pieces.append(piece)
            if pieces:
                yield b"".join(pieces)
            if not conn.fill():
                raise BadMessage("the backend closed the connection mid-chunk")

    @staticmethod
    def _take_chunk(buf: bytearray) -> bytes | None:
        """The next chunk's data if it is complete in `buf` (consumed), `_LAST` after the last chunk and
        its trailer, None when more bytes are needed (nothing consumed)."""
        eol = buf.find(b"\r\n")
        if eol < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise BadMessage("chunk size line too long")
            return None
        size = parse_chunk_size(bytes(buf[:eol]))
        start = eol + 2
        if size == 0:
            # Optional trailer fields after the last chunk, then the blank line; validated, then dropped.
            if buf[start : start + 2] == b"\r\n" or buf[start : start + 1] == b"\n":
                del buf[: start + (2 if buf[start : start + 1] == b"\r" else 1)]
                return _LAST
            end = _BLANK_LINE.search(buf, start)
            if end is None:
                if len(buf) - start > MAX_HEAD_BYTES:
                    raise BadMessage("chunked trailer too large")
                return None
            parse_fields(split_lines(bytes(buf[start : end.start()])))
            del buf[: end.end()]
            return _LAST
        if len(buf) < start + size + 2:
            return None
        if buf[start + size : start + size + 2] != b"\r\n":
            raise BadMessage("chunk data not followed by CRLF")
        piece = bytes(buf[start : start + size])
        del buf[: start + size + 2]
        return piece

    def _until_close(self) -> Iterator[bytes]:
        conn = self._conn
        self._keep_alive = False
        if conn.buffer:
            yield bytes(conn.buffer)
            conn.buffer.clear()
        while True:
            data = conn.sock.recv(RECV_BYTES)
            if not data:
                self._done = True
                return
            yield data

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        if self._done and self._keep_alive and not self._conn.buffer:
            self._transport._checkin(self._conn)
        else:
            self._conn.close()


def _connect_socket(origin: tuple[str, int], timeout_seconds: float) -> socket.socket:
    """A connected TCP socket. An IP address (a pod's, a local replica's) skips name resolution, which
    under gevent is a hand-off to a pool of native threads: 1,000 connects at once queued behind it."""
    host = origin[0].strip("[]")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection(origin, timeout=timeout_seconds)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_seconds)
        sock.connect((host, origin[1]))
    except BaseException:
        sock.close()
        raise
    return sock


class LeanTransport(httpx.BaseTransport):
    """Keep-alive HTTP/1.1 to `http://` backends; thread-safe; each connection serves one request at a time."""

    def __init__(
        self,
        *,
        connect_timeout_seconds: float = 5.0,
        read_timeout_seconds: float = 600.0,
        max_idle_per_origin: int = 256,
        idle_expiry_seconds: float = 30.0,
        fallback: httpx.BaseTransport | None = None,
    ) -> None:
        self.connect_timeout_seconds = connect_timeout_seconds
        self.read_timeout_seconds = read_timeout_seconds
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_expiry_seconds = idle_expiry_seconds
        self._fallback = fallback
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._closed = False

    # ----- pool -----
    def _checkout(self, origin: tuple[str, int]) -> _Conn | None:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                if not idle:
                    return None
                conn = idle.pop()
            if now - conn.idle_since > self.idle_expiry_seconds or conn.stale():
                conn.close()
                continue
            conn.reused = True
            return conn

    def _checkin(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(conn.origin, [])
                if len(idle) < self.max_idle_per_origin:
                    idle.append(conn)
                    return
        conn.close()

    def _connect(self, origin: tuple[str, int], request: httpx.Request) -> _Conn:
        try:
            sock = _connect_socket(origin, self.connect_timeout_seconds)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {origin[0]}:{origin[1]} timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {origin[0]}:{origin[1]}: {exc}", request=request) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.read_timeout_seconds)
        return _Conn(sock, origin)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()
        if self._fallback is not None:
            self._fallback.close()

    def idle_connections(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    # ----- one exchange -----
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            with self._lock:
                if self._fallback is None:
                    self._fallback = httpx.HTTPTransport()
                fallback = self._fallback
            return fallback.handle_request(request)
        origin = (url.host, url.port or 80)
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path)]
        head.extend(b"%s: %s\r\n" % (k, v) for k, v in request.headers.raw)
        head.append(b"\r\n")
        payload = b"".join(head) + request.read()
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return self._exchange(conn, request, payload)
            except _NothingSent:
                pass  # the backend closed this idle connection before we wrote a byte: one fresh try
        conn = self._connect(origin, request)
        try:
            return self._exchange(conn, request, payload)
        except _NothingSent as exc:
            raise httpx.ConnectError(
                "the backend closed a new connection before any byte of the request was written", request=request
            ) from exc

    def _exchange(self, conn: _Conn, request: httpx.Request, payload: bytes) -> httpx.Response:
        """Write the request and read the response head; `_NothingSent` only if no byte was written."""
        try:
            try:
                conn.write(payload)
            except _NothingSent:
                conn.close()
                raise
            except OSError as exc:
                raise httpx.WriteError(f"sending to the backend failed midway: {exc}", request=request) from exc
            head = self._read_head(conn, request)
        except _NothingSent:
            raise
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout("the backend did not answer in time", request=request) from exc
        except BadMessage as exc:
            conn.close()
            raise httpx.RemoteProtocolError(f"backend sent a malformed response: {exc}", request=request) from exc
        except httpx.HTTPError:
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            raise httpx.ReadError(
                f"the backend broke the connection after the request was sent (not re-sent): {exc}", request=request
            ) from exc
        body = _Body(self, conn, request, head)
        return httpx.Response(
            head.status, headers=head.headers, stream=body, request=request, extensions={"http_version": b"HTTP/1.1"}
        )

    def _read_head(self, conn: _Conn, request: httpx.Request) -> Head:
        buf = conn.buffer
        while True:
            end = _BLANK_LINE.search(buf)
            while end is None:
                if buf[:2] == b"\r\n" or buf[:1] == b"\n":
                    raise BadMessage("empty status line")
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadMessage("response head too large")
                if not conn.fill():
                    if not buf:
                        raise httpx.RemoteProtocolError(
                            "the backend closed the connection after the request was sent, without answering "
                            "(not re-sent: it may have been processed)",
                            request=request,
                        )
                    raise BadMessage("truncated response head")
                end = _BLANK_LINE.search(buf)
            block = bytes(buf[: end.start()])
            del buf[: end.end()]
            head = parse_head(block, request.method)
            if head is not None:
                return head  # else a 1xx such as 100 Continue: the real answer follows
