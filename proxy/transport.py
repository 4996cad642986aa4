"""A lean HTTP/1.1 transport for httpx: keep-alive sockets to model backends, nothing else.

Why not `httpx.HTTPTransport`: on the 2-core reference machine its httpcore + h11 layers cost the
proxy's hot path about 40% of its CPU per request (pool bookkeeping under a lock, a pure-Python state
machine, a separate write for headers and body). A proxy in front of known model servers needs only
this: write the request in one `sendall`, parse a status line and headers, read a Content-Length,
chunked or close-delimited body as it arrives, and put the socket back for the next request.

It is an `httpx.BaseTransport`, so the request path still deals in `httpx.Request`/`httpx.Response`
and `iter_raw()`, and tests swap in `httpx.MockTransport`. `https://` backends (an InferenceModel's
`backendUrl` may be one) go through a regular `httpx.HTTPTransport`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx

MAX_HEAD_BYTES = 64 * 1024
RECV_BYTES = 65536


class _Closed(Exception):
    """The peer closed the connection before a complete response head."""


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
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class _Body(httpx.SyncByteStream):
    """The response body, de-chunked, yielded as it arrives; the socket goes back to the pool at the end."""

    def __init__(
        self, transport: LeanTransport, conn: _Conn, request: httpx.Request, mode: str, length: int, keep_alive: bool
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._request = request
        self._mode = mode  # "length", "chunked", "close" or "none"
        self._length = length
        self._keep_alive = keep_alive
        self._done = mode == "none" or (mode == "length" and length == 0)
        self._released = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            if self._mode == "length":
                yield from self._by_length()
            elif self._mode == "chunked":
                yield from self._chunked()
            elif self._mode == "close":
                yield from self._until_close()
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
                self._keep_alive = False
                raise httpx.RemoteProtocolError("backend closed the connection mid-body", request=self._request)
            piece = bytes(conn.buffer[:remaining])
            del conn.buffer[: len(piece)]
            remaining -= len(piece)
            yield piece
        self._done = True

    def _chunked(self) -> Iterator[bytes]:
        conn = self._conn
        buf = conn.buffer
        while True:
            eol = buf.find(b"\r\n")
            while eol < 0:
                if len(buf) > MAX_HEAD_BYTES or not conn.fill():
                    self._keep_alive = False
                    raise httpx.RemoteProtocolError("bad or truncated chunked body", request=self._request)
                eol = buf.find(b"\r\n")
            try:
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            except ValueError:
                self._keep_alive = False
                raise httpx.RemoteProtocolError("bad chunk size", request=self._request) from None
            if size == 0:
                # The last chunk, then optional trailer lines, then an empty line.
                while True:
                    if len(buf) >= eol + 4 and buf[eol + 2 : eol + 4] == b"\r\n":
                        del buf[: eol + 4]
                        break
                    end = buf.find(b"\r\n\r\n", eol + 2)
                    if end >= 0:
                        del buf[: end + 4]
                        break
                    if len(buf) > MAX_HEAD_BYTES or not conn.fill():
                        self._keep_alive = False
                        raise httpx.RemoteProtocolError("truncated chunked trailer", request=self._request)
                self._done = True
                return
            need = eol + 2 + size + 2
            while len(buf) < need:
                if not conn.fill():
                    self._keep_alive = False
                    raise httpx.RemoteProtocolError("backend closed the connection mid-chunk", request=self._request)
            piece = bytes(buf[eol + 2 : eol + 2 + size])
            del buf[:need]
            yield piece

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
            sock = socket.create_connection(origin, timeout=self.connect_timeout_seconds)
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
            except _Closed:
                pass  # the backend closed an idle connection before any byte was written: one fresh try
        conn = self._connect(origin, request)
        try:
            return self._exchange(conn, request, payload)
        except _Closed as exc:
            raise httpx.RemoteProtocolError("backend closed the connection without answering", request=request) from exc

    def _exchange(self, conn: _Conn, request: httpx.Request, payload: bytes) -> httpx.Response:
        """Send and read the response head; `_Closed` only when a reused socket took none of the request.

        Once any byte of a request is written the backend may have read it and acted on it (a model
        may be generating), so whatever happens next is reported, never retried: a POST is not
        idempotent, and a retry that reaches a dead port reports the wrong failure.
        """
        try:
            try:
                sent = conn.sock.send(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if conn.reused:
                    raise _Closed() from exc
                raise httpx.WriteError(f"sending to the backend failed: {exc}", request=request) from exc
            try:
                if sent < len(payload):
                    conn.sock.sendall(memoryview(payload)[sent:])
            except OSError as exc:
                conn.close()
                raise httpx.WriteError(f"sending to the backend failed: {exc}", request=request) from exc
            status, headers, mode, length, keep_alive = self._read_head(conn, request)
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout("the backend did not answer in time", request=request) from exc
        except _Closed:
            conn.close()
            raise httpx.RemoteProtocolError(
                "backend closed the connection without answering", request=request
            ) from None
        except httpx.HTTPError:
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            raise httpx.ReadError(f"reading from the backend failed: {exc}", request=request) from exc
        if request.method == "HEAD":
            mode = "none"
        body = _Body(self, conn, request, mode, length, keep_alive)
        return httpx.Response(
            status, headers=headers, stream=body, request=request, extensions={"http_version": b"HTTP/1.1"}
        )

    def _read_head(self, conn: _Conn, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], str, int, bool]:
        buf = conn.buffer
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("response head too large", request=request)
                if not conn.fill():
                    if not buf:
                        raise _Closed()
                    raise httpx.RemoteProtocolError("truncated response head", request=request)
                end = buf.find(b"\r\n\r\n")
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}", request=request)
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue and friends: the real answer follows
            break
        headers: list[tuple[bytes, bytes]] = []
        length = -1
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}", request=request)
            name, value = name.strip(), value.strip()
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise httpx.RemoteProtocolError("bad Content-Length", request=request) from None
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                connection = value.lower()
        keep_alive = parts[0] == b"HTTP/1.1" and b"close" not in connection
        if parts[0] == b"HTTP/1.0":
            keep_alive = b"keep-alive" in connection
        if status in (204, 304):
            return status, headers, "none", 0, keep_alive
        if chunked:
            return status, headers, "chunked", 0, keep_alive
        if length >= 0:
            return status, headers, "length", length, keep_alive
        return status, headers, "close", 0, False
