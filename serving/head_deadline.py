"""gunicorn's gevent worker with a request-head deadline that is answered: 408 and Connection: close.

Why: under gevent, gunicorn bounds the wait for each request head with its keep-alive timeout, and
when that passes it closes the connection without a word. A client whose head is slow (a slowloris, a
stalled network) then sees a bare EOF, which it cannot tell from a crash, while a stalled body gets
the proxy's 408. One answer for both deadlines: the head's is gunicorn's timer, still; only what
happens when it fires changes.

When the timer fires nothing of the request has reached the app, so the answer is written here: the
status line, `Connection: close`, the body the command gave (the proxy's is OpenAI's error envelope),
then the write side is shut and whatever the client still sends is read and dropped for at most
`LINGER_SECONDS` before the socket closes: closing with unread bytes would reset the connection and
could destroy the 408 before the client reads it. The connection idle between two keep-alive requests
gets the same answer (RFC 9110 allows it; HTTP clients check a pooled connection before reuse and
drop one the server has answered or closed, so the 408 reaches none as the answer to a new request).

Imported only by `serving.runner.serve` for `worker_class="gevent"` (it imports gevent).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from serving.wsgi import honour_connection_close

log = logging.getLogger(__name__)

LINGER_SECONDS = 1.0
"""After the 408, how long the client's remaining bytes are read and dropped before the socket closes."""

LINGER_MAX_BYTES = 1 << 16
"""... and how many at most: a client that keeps sending does not keep the connection."""

WRITE_SECONDS = 1.0
"""The 408 is a few hundred bytes into an empty send buffer; a client that does not read gets this long."""


def timeout_response(content_type: str, body: bytes) -> bytes:
    """The whole 408 response a stalled request head gets."""
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeadDeadlineWorker(GeventWorker):  # type: ignore[misc]
    """GeventWorker whose head deadline (gunicorn's keepalive) answers 408 before closing.

    `serve` subclasses it with `answer`: the command's (content type, body), built in the worker after
    gevent patched it (the command's modules are not imported before the patch).
    """

    answer: Callable[[], tuple[str, bytes]] | None = None
    response = timeout_response("text/plain", b"request head not received in time\n")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[Any, socket.socket] = {}  # connection greenlet -> its client socket

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = honour_connection_close(self.wsgi)
        if self.answer is not None:
            self.response = timeout_response(*self.answer())

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        current = gevent.getcurrent()
        self._clients[current] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(current, None)

    def timeout_ctx(self) -> _HeadDeadline:
        # gunicorn enters this around the read of each request head, in the connection's greenlet.
        return _HeadDeadline(self.cfg.keepalive, self._clients.get(gevent.getcurrent()), self.response)


class _HeadDeadline:
    """`with` block: if `seconds` pass inside it, answer 408 on `client` and end the block quietly (gunicorn
    then sees no request and closes the connection, as it did after its own silent timeout)."""

    def __init__(self, seconds: float, client: socket.socket | None, response: bytes) -> None:
        self._timer = gevent.Timeout(seconds)
        self._seconds = seconds
        self._client = client
        self._response = response

    def __enter__(self) -> _HeadDeadline:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        self._timer.close()
        if exc is not self._timer:
            return False
        if self._client is not None:
            log.debug("request head not received within %gs: 408", self._seconds)
            answer_and_linger(self._client, self._response)
        return True


def answer_and_linger(client: socket.socket, response: bytes) -> None:
    """Write `response`, shut the write side, drop what the client still sends (bounded); never raises."""
    with contextlib.suppress(OSError), gevent.Timeout(WRITE_SECONDS, False):
        client.sendall(response)
    if isinstance(client, ssl.SSLSocket):
        return  # a TLS socket's shutdown() would drop the session layer: let the close follow
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        dropped = 0
        while dropped < LINGER_MAX_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with gevent.Timeout(remaining, False):
                data = client.recv(LINGER_MAX_BYTES)
                if not data:
                    break
                dropped += len(data)
                continue
            break  # the linger deadline passed
