"""The client side of the request path: reading a request body under a deadline, closing a connection
after an answer, and noticing at once that a streaming client went away.

Why a module of its own: these are the places where a slow or hostile client could hold the proxy's
resources (a thread or a greenlet, a socket, an upstream generation), and they depend on the server's
concurrency model. Under gunicorn's gevent worker (the default for `ibc proxy` and `ibc local`) the
body deadline is one `gevent.Timeout` over the whole read, and a greenlet watches each streaming
client's socket so that its upstream request is closed the moment the client leaves. Under threads
(`--worker-class gthread`, werkzeug in tests) the deadline bounds each read from the socket and a
departed client is noticed on the next write.
"""

from __future__ import annotations

import _socket
import contextlib
import select
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

READ_PIECE_BYTES = 65536


class BodyError(Exception):
    """The request body could not be read; `status` and `code` say how to answer."""

    status = 400
    code = "invalid_body"


class BodyTooLarge(BodyError):
    """The body is larger than the proxy accepts."""

    status = 413
    code = "request_too_large"


class BodyTimeout(BodyError):
    """The client did not send its whole body before the deadline."""

    status = 408
    code = "request_timeout"


class BadBody(BodyError):
    """The body's framing is malformed (a bad chunk size, a truncated upload)."""


def cooperative() -> bool:
    """True in a gevent-patched process (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("socket"))


def immediate_poll() -> Any:
    """A `select.poll()` for a zero-timeout check. Under gevent the original one: gevent's costs a hub
    round trip (~45 us here) where the system call costs 2 us, and a zero timeout never blocks anyway."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")()
    return select.poll()


def client_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    return sock if isinstance(sock, socket.socket) else None


def read_body(environ: Mapping[str, Any], limit: int, deadline_seconds: float) -> bytes:
    """The request body (Content-Length or chunked), read within `deadline_seconds` of this call.

    Raises BodyTooLarge (not read), BodyTimeout or BadBody; never reads more than `limit` + 1 bytes.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    size = -1
    if length:
        try:
            size = int(length)
        except ValueError:
            raise BadBody(f"bad Content-Length {length[:40]!r}") from None
        if size > limit:
            raise BodyTooLarge(f"request body larger than {limit} bytes")
        if size == 0:
            return b""
    elif not ("chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower() or environ.get("wsgi.input_terminated")):
        return b""
    want = size if size >= 0 else limit + 1
    if cooperative():
        import gevent

        timer = gevent.Timeout(deadline_seconds, BodyTimeout(f"request body not received within {deadline_seconds:g}s"))
        timer.start()
        try:
            data = _read(stream, want)
        finally:
            timer.close()
    else:
        data = _read_with_socket_timeout(environ, stream, want, deadline_seconds)
    if size >= 0 and len(data) < size:
        raise BadBody(f"the client closed the upload after {len(data)} of {size} bytes")
    if len(data) > limit:
        raise BodyTooLarge(f"request body larger than {limit} bytes")
    return data


def _read(stream: Any, want: int) -> bytes:
    try:
        return bytes(stream.read(want))
    except BodyTimeout:
        raise
    except TimeoutError as exc:
        raise BodyTimeout(f"request body stalled: {exc}") from exc
    except Exception as exc:  # the server's parser: bad chunk size, missing terminator, no more data
        raise BadBody(f"malformed request body: {exc or type(exc).__name__}") from exc


def _read_with_socket_timeout(environ: Mapping[str, Any], stream: Any, want: int, seconds: float) -> bytes:
    sock = client_socket(environ)
    if sock is None:
        return _read(stream, want)
    previous = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        return _read(stream, want)
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)


class ClosingAnswer:
    """A response body after which the client's connection is shut down (a 408: the rest of a stalled
    upload must not be read as the next request). WSGI servers call `close()` after the last byte."""

    def __init__(self, chunks: Iterable[bytes], environ: Mapping[str, Any]) -> None:
        self._chunks = chunks
        self._sock = client_socket(environ)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


class DisconnectWatch:
    """Calls `on_gone()` the moment the client closes its connection; `stop()` ends the watch.

    Only under gevent: an event-loop watcher on the client's socket (no greenlet per stream: that cost
    ~5% of a worker's CPU at 1,000 streams), whose callback peeks without consuming: readable with no
    data is EOF, and `on_gone()` then runs in a greenlet of its own. Bytes from a pipelining client end
    the watch unharmed.
    """

    def __init__(self, environ: Mapping[str, Any], on_gone: Callable[[], None]) -> None:
        self.gone = False
        self._watcher: Any = None
        sock = client_socket(environ)
        if sock is None or not cooperative():
            return
        import gevent

        self._on_gone = on_gone
        self._sock = sock
        self._watcher = gevent.get_hub().loop.io(sock.fileno(), 1)  # 1: readable
        self._watcher.start(self._readable)

    def _readable(self) -> None:
        """In the event loop itself: must neither block nor switch."""
        sock = self._sock
        # The descriptor's bytes, peeked through a plain socket object on the same descriptor (detached
        # after, never closed): no byte consumed, no system call but the peek, and TLS sockets work too.
        # (`_socket.socket` is the C type: gevent's patch replaces `socket.socket`, not it.)
        peek = _socket.socket(sock.family, sock.type, sock.proto, sock.fileno())
        try:
            data = peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # woken for nothing: keep watching
        except OSError:
            data = b""
        finally:
            peek.detach()
        self.stop()
        if data:
            return
        self.gone = True
        import gevent

        gevent.spawn(self._on_gone)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
