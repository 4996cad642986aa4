"""A fast OpenAI-compatible test server: the stand-in for vLLM in tests, local-mode demos and benchmarks.

It is the baseline the proxy's benchmarks subtract, so it must cost as little as possible per request:
a hand-written HTTP/1.1 server on a bare :class:`asyncio.Protocol` (stdlib only, keep-alive, pipelining),
answering from templates. It speaks the parts of the API the proxy forwards: chat completions,
completions (both optionally streamed as SSE, one network write per token), embeddings and the model list.
``GET /health`` answers 503 until the configured startup delay has passed, like a model server loading
weights; ``/v1/*`` answers 503 during that time too.

It also behaves like vLLM where the load layer and the proxy's routing look: at most ``max_running``
generations run at once (the rest wait in a FIFO queue), a simulated prefix cache (an LRU of the prompt
block keys of :mod:`serving.prompt`) shortens the first token of a prompt whose leading blocks it has
seen, and ``GET /metrics`` serves vLLM's Prometheus names with vLLM's meanings and labels
(``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``,
``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``, the last two in tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import signal
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.bind import format_bind
from serving.prompt import (
    BLOCK_BYTES,
    BYTES_PER_TOKEN,
    block_count,
    prefix_keys,
    prompt_bytes,
    prompt_text,
    token_count,
)

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_TOKENS = 100_000

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class MockSettings:
    """How the mock behaves; every delay is in seconds and defaults to none (fastest baseline)."""

    model: str
    startup_delay_seconds: float = 0.0  # /health is 503 until then, like vLLM loading weights
    token_delay_seconds: float = 0.0  # pause between streamed tokens
    tokens: int = 16  # completion length unless the request's max_tokens is smaller
    latency_seconds: float = 0.0  # pause before the first byte of every /v1 answer
    embedding_dim: int = 8
    max_running: int = 0  # generations at once (vLLM's max_num_seqs); beyond it they wait, FIFO; 0 = no limit
    kv_capacity_tokens: int = 65536  # simulated KV cache: kv_cache_usage_perc = running tokens / this
    prefix_cache_blocks: int = 1024  # simulated prefix cache, in blocks of serving.prompt.BLOCK_BYTES; 0 = off
    prefill_block_seconds: float = 0.0  # first-token delay per prompt block not in the prefix cache
    serve_metrics: bool = True  # False: /metrics answers 404, like a backend without Prometheus metrics


@dataclass(frozen=True)
class Generation:
    """A completion the backend accepted: what it answers and what it costs (prefill time, KV tokens)."""

    kind: str  # "chat" or "text"
    tokens: int
    stream: bool
    include_usage: bool
    prefill_seconds: float
    kv_tokens: int


@dataclass
class _Request:
    method: str
    path: str
    keep_alive: bool
    body: bytes


class _BadRequest(Exception):
    """The client sent something that is not HTTP/1.1 we understand; answer with `status` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_body(message: str, type_: str, code: int | str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def _head(status: int, content_type: str, length: int | None, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"content-type: {content_type}"]
    if length is None:
        lines.append("transfer-encoding: chunked")
        lines.append("cache-control: no-cache")
    else:
        lines.append(f"content-length: {length}")
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class MockBackend:
    """The server state shared by all connections: settings, start time, counters."""

    def __init__(self, settings: MockSettings, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.tokens < 0 or settings.embedding_dim < 1:
            raise ValueError("tokens must be >= 0 and embedding_dim >= 1")
        if settings.max_running < 0 or settings.prefix_cache_blocks < 0 or settings.kv_capacity_tokens < 1:
            raise ValueError("max_running and prefix_cache_blocks must be >= 0, kv_capacity_tokens >= 1")
        if settings.prefill_block_seconds < 0:
            raise ValueError("prefill_block_seconds must be >= 0")
        self.settings = settings
        self._clock = clock
        self.started_at = clock()
        self.ids = itertools.count(1)
        self.requests_served = 0
        self._created = int(time.time())
        self._templates: dict[tuple[str, int], tuple[bytes, bytes, bytes]] = {}
        self._models_body = json.dumps(
            {
                "object": "list",
                "data": [{"id": settings.model, "object": "model", "created": self._created, "owned_by": "ibc-mock"}],
            }
        ).encode()
        # Scheduler state, as vLLM reports it: generations running, waiting (FIFO) and their KV tokens.
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.running_kv_tokens = 0
        # The simulated prefix cache: keys of prompt prefixes ending at a block, least recently used first.
        self._prefix_cache: OrderedDict[bytes, None] = OrderedDict()
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        label = settings.model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        self._labels = f'{{engine="0",model_name="{label}"}}'

    @property
    def ready(self) -> bool:
        return self._clock() - self.started_at >= self.settings.startup_delay_seconds

    # ----- answers (status, content type, body) or a generation to schedule -----
    def route(self, req: _Request) -> tuple[int, bytes] | tuple[str, Generation]:
        """A complete answer `(status, json_body)` or a completion to run `("generate", Generation)`."""
        if req.path == "/metrics" and self.settings.serve_metrics:
            if req.method != "GET":
                return 405, _error_body("use GET", "invalid_request_error", 405)
            return 200, self.metrics_text()
        if req.path == "/health" or req.path == "/healthz":
            if req.method != "GET":
                return 405, _error_body("use GET", "invalid_request_error", 405)
            if self.ready:
                return 200, b'{"status":"ok"}'
            return 503, b'{"status":"starting"}'
        if not req.path.startswith("/v1/"):
            return 404, _error_body(f"no route {req.path}", "invalid_request_error", 404)
        if not self.ready:
            return 503, _error_body(f"{self.settings.model} is still loading", "service_unavailable", 503)
        path = req.path.split("?", 1)[0]
        if path == "/v1/models":
            return 200, self._models_body
        if req.method != "POST":
            return 405, _error_body(f"use POST for {path}", "invalid_request_error", 405)
        try:
            body = json.loads(req.body)
        except (ValueError, RecursionError):
            return 400, _error_body("the request body is not valid JSON", "invalid_request_error", 400)
        if not isinstance(body, dict):
            return 400, _error_body("the request body must be a JSON object", "invalid_request_error", 400)
        model = body.get("model")
        if model != self.settings.model:
            return 404, _error_body(f"The model `{model}` does not exist.", "NotFoundError", 404)
        if path == "/v1/chat/completions":
            kind = "chat"
        elif path == "/v1/completions":
            kind = "text"
        elif path == "/v1/embeddings":
            return 200, self._embeddings(body)
        else:
            return 404, _error_body(f"no route {path}", "invalid_request_error", 404)
        n = self._tokens(body)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        text = prompt_text(body)
        size = prompt_bytes(text)
        uncached_blocks = self._prefill(text, size)
        return "generate", Generation(
            kind=kind,
            tokens=n,
            stream=body.get("stream") is True,
            include_usage=include_usage,
            prefill_seconds=uncached_blocks * self.settings.prefill_block_seconds,
            kv_tokens=token_count(size) + n,
        )

    def _prefill(self, text: str, size_bytes: int) -> int:
        """Look the prompt's leading blocks up in the prefix cache, then cache them (most recent last);
        returns how many blocks (full or partial) were not cached, and counts queries and hits in tokens
        as vLLM does."""
        capacity = self.settings.prefix_cache_blocks
        blocks = block_count(size_bytes)
        if capacity == 0:
            return blocks
        cache = self._prefix_cache
        hashes = prefix_keys(text, range(1, min(blocks, capacity) + 1))  # more than the cache holds cannot hit
        hits = 0
        for digest in hashes:  # a key covers the whole prefix: the first miss ends the cached part
            if digest not in cache:
                break
            hits += 1
        for digest in hashes:
            cache[digest] = None
            cache.move_to_end(digest)
        while len(cache) > capacity:
            cache.popitem(last=False)
        self.prefix_queries_tokens += token_count(size_bytes)
        self.prefix_hits_tokens += hits * BLOCK_BYTES // BYTES_PER_TOKEN
        return blocks - hits

    def completion(self, work: Generation) -> bytes:
        """The non-streamed body of an accepted completion."""
        return self._completion(work.kind, work.tokens)

    # ----- the scheduler: at most max_running generations, the rest wait in arrival order -----
    def free_slot(self) -> bool:
        """Whether a generation arriving now would run at once."""
        limit = self.settings.max_running
        return limit == 0 or (self.running < limit and not self._waiting)

    async def admit(self) -> None:
        """Wait (FIFO) until this generation may run; it then counts as running until `release()`."""
        if self.free_slot():
            self.running += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # release() hands its slot over: `running` already counts this one
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # the slot arrived together with the cancellation: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
            raise

    def release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def metrics_text(self) -> bytes:
        """vLLM's scheduler and cache metrics in Prometheus text format (names, meanings, labels)."""
        labels = self._labels
        usage = min(1.0, self.running_kv_tokens / self.settings.kv_capacity_tokens)
        rows = [
            ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", self.running),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", self.waiting),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage),
            (
                "vllm:prefix_cache_queries_total",
                "counter",
                "Prefix cache queries, in terms of number of queried tokens.",
                self.prefix_queries_tokens,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "counter",
                "Prefix cache hits, in terms of number of cached tokens.",
                self.prefix_hits_tokens,
            ),
        ]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {float(value)!r}"]
        return ("\n".join(lines) + "\n").encode()

    def _tokens(self, body: dict[str, Any]) -> int:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            return min(limit, MAX_TOKENS)
        return self.settings.tokens

    @staticmethod
    def _word(i: int) -> str:
        return f" tok{i}" if i else "tok0"

    def _completion(self, kind: str, n: int) -> bytes:
        """A non-streamed answer, from a per-(kind, length) template so the baseline stays cheap."""
        template = self._templates.get((kind, n))
        if template is None:
            template = self._completion_template(kind, n)
            if len(self._templates) < 1024:
                self._templates[(kind, n)] = template
        head, middle, tail = template
        return b"%s%d%s%d%s" % (head, next(self.ids), middle, int(time.time()), tail)

    def _completion_template(self, kind: str, n: int) -> tuple[bytes, bytes, bytes]:
        text = "".join(self._word(i) for i in range(n))
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        finish = "length" if n else "stop"
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            prefix, obj = "chatcmpl-mock-", "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            prefix, obj = "cmpl-mock-", "text_completion"
        out = {
            "id": "\x00",
            "object": obj,
            "created": -1,
            "model": self.settings.model,
            "choices": [choice],
            "usage": usage,
        }
        raw = json.dumps(out, separators=(",", ":")).encode()
        head, rest = raw.split(b'"\\u0000"', 1)
        middle, tail = rest.split(b'"created":-1', 1)
        return head + b'"' + prefix.encode(), b'"' + middle + b'"created":', tail

    def _embeddings(self, body: dict[str, Any]) -> bytes:
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        data = []
        for i, item in enumerate(inputs):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            while len(digest) < 4 * self.settings.embedding_dim:
                digest += hashlib.sha256(digest).digest()
            ints = struct.unpack(f"<{self.settings.embedding_dim}I", digest[: 4 * self.settings.embedding_dim])
            vector = [round(v / 2**32 * 2 - 1, 6) for v in ints]
            data.append({"object": "embedding", "index": i, "embedding": vector})
        out = {
            "object": "list",
            "data": data,
            "model": self.settings.model,
            "usage": {"prompt_tokens": 8 * len(inputs), "total_tokens": 8 * len(inputs)},
        }
        return json.dumps(out, separators=(",", ":")).encode()

    def stream_events(self, plan: Generation) -> tuple[list[bytes], bytes]:
        """One SSE event per token (chat starts with the role), then the finish, usage and [DONE] events."""
        rid = next(self.ids)
        model = self.settings.model
        n = plan.tokens
        chat = plan.kind == "chat"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-mock-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        def event(content: str | None, finish: str | None, role: bool = False) -> bytes:
            choice: dict[str, Any]
            if chat:
                delta: dict[str, Any] = {} if content is None else {"content": content}
                if role:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
            return b"data: " + json.dumps({**base, "choices": [choice]}, separators=(",", ":")).encode() + b"\n\n"

        events = [event("", None, role=True)] if chat else []
        events += [event(self._word(i), None) for i in range(n)]
        final = event(None, "length" if n else "stop")
        if plan.include_usage:
            usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
            payload = {**base, "choices": [], "usage": usage}
            final += b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        return events, final + b"data: [DONE]\n\n"


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order, answers each before the next (HTTP/1.1)."""

    def __init__(self, backend: MockBackend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # an answer is being produced asynchronously (stream, latency, queue, prefill)
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a client gone while waiting or generating frees its place, like vLLM's abort

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._process()

    # ----- parsing -----
    def _parse(self) -> _Request | None:
        """One complete request from the buffer (consumed), or None when more bytes are needed."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise _BadRequest(431, "request headers too large")
            return None
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, "malformed header line")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parsed = self._dechunk(start)
            if parsed is None:
                return None
            body, consumed = parsed
            del self.buffer[:consumed]
            return _Request(method, path, keep_alive, body)
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise _BadRequest(400, "bad content-length") from exc
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BadRequest(413, "request body too large")
        if len(self.buffer) < start + length:
            return None
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        return _Request(method, path, keep_alive, body)

    def _dechunk(self, pos: int) -> tuple[bytes, int] | None:
        body = bytearray()
        while True:
            eol = self.buffer.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(self.buffer[pos:eol]).split(b";", 1)[0], 16)
            except ValueError as exc:
                raise _BadRequest(400, "bad chunk size") from exc
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", eol)
                if trailer_end < 0:
                    return None
                return bytes(body), trailer_end + 4
            if len(body) + size > MAX_BODY_BYTES:
                raise _BadRequest(413, "request body too large")
            if len(self.buffer) < eol + 2 + size + 2:
                return None
            body += self.buffer[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2

    # ----- answering -----
    def _process(self) -> None:
        transport = self.transport
        assert transport is not None
        while not self.closed:
            try:
                req = self._parse()
            except _BadRequest as exc:
                body = _error_body(str(exc), "invalid_request_error", exc.status)
                transport.write(_head(exc.status, "application/json", len(body), False) + body)
                transport.close()
                self.closed = True
                return
            if req is None:
                return
            backend = self.backend
            answer = backend.route(req)
            backend.requests_served += 1
            if answer[0] == "generate":
                work = answer[1]
                assert isinstance(work, Generation)
                if work.stream or work.prefill_seconds > 0 or backend.settings.latency_seconds > 0:
                    self._later(self._generate(req, work))
                    return
                if not backend.free_slot():
                    self._later(self._generate(req, work))
                    return
                answer = 200, backend.completion(work)  # instant: never counted as running
            elif backend.settings.latency_seconds > 0 and req.path.startswith("/v1/"):
                self._later(self._answer_later(req, answer))
                return
            status, body = answer
            assert isinstance(status, int) and isinstance(body, bytes)
            content_type = METRICS_TYPE if req.path == "/metrics" else "application/json"
            transport.write(_head(status, content_type, len(body), req.keep_alive) + body)
            if not req.keep_alive:
                transport.close()
                self.closed = True
                return

    def _later(self, answer: Any) -> None:
        """Answer asynchronously; requests pipelined behind this one wait for it (HTTP/1.1 order)."""
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(answer)

    async def _answer_later(self, req: _Request, answer: tuple[Any, Any]) -> None:
        """A complete answer after the configured latency."""
        transport = self.transport
        assert transport is not None
        try:
            await asyncio.sleep(self.backend.settings.latency_seconds)
            status, body = answer
            transport.write(_head(status, "application/json", len(body), req.keep_alive) + body)
        except (ConnectionError, RuntimeError):
            self.closed = True
        self._done(req)

    async def _generate(self, req: _Request, work: Generation) -> None:
        """Wait for a place among the running generations, prefill (latency + uncached blocks), answer."""
        transport = self.transport
        assert transport is not None
        backend = self.backend
        await backend.admit()
        backend.running_kv_tokens += work.kv_tokens
        try:
            delay = backend.settings.latency_seconds + work.prefill_seconds
            if delay > 0:
                await asyncio.sleep(delay)
            if work.stream:
                await self._stream(req, work)
            elif not self.closed:
                body = backend.completion(work)
                transport.write(_head(200, "application/json", len(body), req.keep_alive) + body)
        except (ConnectionError, RuntimeError):
            self.closed = True
        finally:
            backend.running_kv_tokens -= work.kv_tokens
            backend.release()
        self._done(req)

    def _done(self, req: _Request) -> None:
        """After an asynchronous answer: close, or go on with the requests pipelined behind it."""
        self.task = None
        if self.closed:
            return
        transport = self.transport
        assert transport is not None
        if not req.keep_alive:
            transport.close()
            self.closed = True
            return
        self.busy = False
        if self.buffer:
            self._process()

    async def _stream(self, req: _Request, plan: Generation) -> None:
        transport = self.transport
        assert transport is not None
        tokens, final = self.backend.stream_events(plan)
        delay = self.backend.settings.token_delay_seconds
        transport.write(_head(200, "text/event-stream", None, req.keep_alive))
        for i, event in enumerate(tokens):
            if self.closed:
                return
            if delay > 0 and i > 0:
                await asyncio.sleep(delay)
                if self.closed:
                    return
            transport.write(_chunk(event))
            if transport.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0)  # let the loop flush a slow reader's backlog
        if delay > 0:
            await asyncio.sleep(delay)
        if not self.closed:
            transport.write(_chunk(final) + b"0\r\n\r\n")


async def start_server(settings: MockSettings, host: str, port: int) -> tuple[asyncio.Server, MockBackend]:
    """Start listening (the startup delay counts from here); returns the server and its state."""
    backend = MockBackend(settings)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(backend), host, port, reuse_address=True, backlog=1024)
    return server, backend


def serve(settings: MockSettings, host: str, port: int, on_listening: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; `on_listening(url)` is called once the socket accepts connections."""

    async def main() -> None:
        # Signal handlers first: whoever reads "listening" may send SIGTERM at once.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        server, _ = await start_server(settings, host, port)
        sock_host, sock_port = server.sockets[0].getsockname()[:2]
        if on_listening is not None:
            on_listening(f"http://{format_bind(sock_host, sock_port)}")
        async with server:
            await stop.wait()

    asyncio.run(main())


class MockInThread:
    """The mock served by an event loop in a daemon thread, for tests and benchmarks in one process."""

    def __init__(self, settings: MockSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mock-backend", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_server(settings, host, port), self._loop)
        self._server, self.backend = future.result(timeout=10)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{format_bind(sock_host, sock_port)}"

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
