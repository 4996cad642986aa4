"""Talking to model backends: one shared keep-alive httpx client per worker, least-outstanding balancing,
hop-by-hop header filtering, and upstream failures turned into a small exception tree.

Kept apart from the Flask app so the request path's I/O is in one place: `prepare()` builds a plain
request value without sockets (unit tests read it), `send()` does the I/O, and tests swap the network
for `httpx.MockTransport` through `transport=`.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.routing import Pick
from proxy.transport import LeanTransport

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1 plus the de-facto ones: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the proxy sets itself (or that describe the client's connection to us).
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
# Response headers the WSGI server sets itself.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "date", "server"}


class UpstreamError(Exception):
    """A backend call failed before a complete answer; `status` and `code` say how to tell the client."""

    status = 502
    code = "upstream_error"

    @property
    def connect_failed(self) -> bool:
        """True when no byte reached the backend (connection refused or not established in time)."""
        return isinstance(self.__cause__, httpx.ConnectError | httpx.ConnectTimeout)


class UpstreamUnreachable(UpstreamError):
    """The backend refused or dropped the connection (pod gone, process died, wrong address)."""

    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    """The backend did not connect or answer within the configured timeout."""

    status = 504
    code = "upstream_timeout"


def environ_headers(environ: Mapping[str, Any], *, drop_authorization: bool) -> list[tuple[str, str]]:
    """The client's headers from a WSGI environ, minus hop-by-hop ones and those its Connection names
    (and Authorization when it was meant for the proxy), minus `X-IBC-*`: those are the proxy's own
    (`X-IBC-Max-Wait`), not the backend's business."""
    connection = environ.get("HTTP_CONNECTION", "")
    named = {t.strip().lower() for t in connection.split(",")} if connection else ()
    out = []
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = key[5:].replace("_", "-").lower()
        if name in _REQUEST_DROP or name in named or name.startswith("x-ibc-"):
            continue
        if drop_authorization and name == "authorization":
            continue
        out.append((name, value))
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        out.append(("content-type", content_type))
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The backend's headers minus hop-by-hop ones and those the WSGI server writes."""
    return [(k, v) for k, v in headers if k.lower() not in _RESPONSE_DROP]


def raw_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The body as it arrives, undecoded; a response already read in memory (tests' MockTransport) at once."""
    if response.is_stream_consumed:
        yield response.content
        return
    yield from response.iter_raw()


@dataclass(frozen=True)
class Prepared:
    """A request to one backend, as a value: what `send()` will put on the wire."""

    backend: str
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


UPSTREAM_MODES = ("lean", "httpcore", "client")


class Upstream:
    """The shared connection pool and per-backend outstanding counts of one worker; thread-safe.

    One `httpx.Client` per worker owns one transport (the keep-alive pool); `transport=` replaces it
    (tests pass `httpx.MockTransport`). Modes, measured side by side by `bench/proxy_bench.py`:

    - `lean` (default): requests go straight to :class:`proxy.transport.LeanTransport`;
    - `httpcore`: straight to `httpx.HTTPTransport` (httpcore + h11);
    - `client`: through `httpx.Client.send` over `httpx.HTTPTransport`, whose per-request URL merging,
      cookie extraction and auth/redirect loops a proxy does not need (~150 us of CPU per request).
    """

    def __init__(
        self,
        *,
        connect_timeout_seconds: float = 5.0,
        read_timeout_seconds: float = 600.0,
        max_connections: int = 256,
        transport: httpx.BaseTransport | None = None,
        mode: str = "lean",
        on_in_flight: Callable[[str, int], None] | None = None,
    ) -> None:
        if mode not in UPSTREAM_MODES:
            raise ValueError(f"upstream mode must be one of {', '.join(UPSTREAM_MODES)}, got {mode!r}")
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30.0
        )
        if transport is None:
            if mode == "lean":
                transport = LeanTransport(
                    connect_timeout_seconds=connect_timeout_seconds,
                    read_timeout_seconds=read_timeout_seconds,
                    max_idle_per_origin=max_connections,
                )
            else:
                transport = httpx.HTTPTransport(limits=limits)
        self.transport = transport
        timeout = httpx.Timeout(
            connect=connect_timeout_seconds,
            read=read_timeout_seconds,
            write=read_timeout_seconds,
            pool=connect_timeout_seconds,
        )
        self.client = httpx.Client(
            transport=self.transport,
            timeout=timeout,
            limits=limits,
            trust_env=False,  # never route pod traffic through an HTTP(S)_PROXY from the environment
            follow_redirects=False,
        )
        self.direct = mode != "client"
        self._timeout_extension = timeout.as_dict()
        self._lock = threading.Lock()
        self._on_in_flight = on_in_flight  # (backend, +1 | -1): published for the controller's load loop
        self._outstanding: dict[str, int] = {}
        self._turn = itertools.count()
        self._urls: dict[str, httpx.URL] = {}

    def close(self) -> None:
        self.client.close()

    # ----- balancing -----
    def acquire(self, backends: list[str], pick: Pick | None = None) -> str:
        """The backend `pick` chooses from the in-flight counts (see proxy.routing), else the one with the
        fewest requests in flight (ties rotate); counted as one more in flight."""
        with self._lock:
            outstanding = self._outstanding
            if len(backends) == 1:
                best = backends[0]
            elif pick is not None:
                best = pick(backends, outstanding)
            else:
                start = next(self._turn) % len(backends)
                best = backends[start]
                best_count = outstanding.get(best, 0)
                for i in range(1, len(backends)):
                    candidate = backends[(start + i) % len(backends)]
                    count = outstanding.get(candidate, 0)
                    if count < best_count:
                        best, best_count = candidate, count
            outstanding[best] = outstanding.get(best, 0) + 1
        if self._on_in_flight is not None:
            self._on_in_flight(best, 1)
        return best

    def release(self, backend: str) -> None:
        with self._lock:
            left = self._outstanding.get(backend, 0) - 1
            if left > 0:
                self._outstanding[backend] = left
            else:
                self._outstanding.pop(backend, None)
        if self._on_in_flight is not None:
            self._on_in_flight(backend, -1)

    def outstanding(self) -> Mapping[str, int]:
        with self._lock:
            return dict(self._outstanding)

    # ----- I/O -----
    @staticmethod
    def prepare(backend: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Prepared:
        """The request for `backend` (a base URL such as `http://10.0.0.5:8000`) and a path with query."""
        return Prepared(backend, method, backend.rstrip("/") + path, headers, body)

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx.URL(url)
            if len(self._urls) >= 4096:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    def send(self, prepared: Prepared) -> httpx.Response:
        """Send and return once the response headers arrived; the caller reads the body and closes it."""
        try:
            if self.direct:
                request = httpx.Request(
                    prepared.method,
                    self._url(prepared.url),
                    headers=prepared.headers,
                    content=prepared.body,
                    extensions={"timeout": self._timeout_extension},
                )
                response = self.transport.handle_request(request)
                response.request = request
                return response
            request = self.client.build_request(
                prepared.method, prepared.url, headers=prepared.headers, content=prepared.body
            )
            return self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{prepared.backend} did not answer in time ({type(exc).__name__})") from exc
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise UpstreamUnreachable(f"{prepared.backend} unreachable: {exc or type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{prepared.backend} failed: {exc or type(exc).__name__}") from exc
        except httpx.InvalidURL as exc:
            raise UpstreamUnreachable(f"backend URL {prepared.url!r} is invalid: {exc}") from exc

    @staticmethod
    def read_all(response: httpx.Response, backend: str) -> bytes:
        """The whole body as sent (still content-encoded), mapping failures like `send`."""
        try:
            return b"".join(raw_chunks(response))
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{backend} stopped answering mid-response") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnreachable(f"{backend} broke the response: {exc or type(exc).__name__}") from exc
        finally:
            response.close()
