"""Shared machinery of the stress tier (and of bench/stress_recovery.py): real `ibc` processes that can be
killed with SIGKILL and restarted, TLS files, /proc readers, a load recorder that says how long a
service took to answer again, and a recording stand-in for local mode's process runtime.

Why one module: every fault test needs the same things done the same way, and a benchmark that
reports recovery times must measure exactly what the tests assert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from budget import format_bytes
from certs.generate import CertPaths, TLSBundle, generate_serving_certificate, renew_serving_certificate, write_files
from local.config import LocalConfig
from local.runtime import ManagedProcess, Phase, ProcessSpec, free_port

IBC = [sys.executable, "-m", "ibc"]
GI = 2**30


# ----------------------------------------------------------------------------- /proc


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every live, non-zombie process."""
    rows: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[:1] in ([b"Z"], [b"X"]):
            continue
        rows[int(entry)] = (int(fields[1]), cmdline)
    return rows


def children(pid: int, rows: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """Direct children of `pid`."""
    rows = proc_table() if rows is None else rows
    return sorted(p for p, (ppid, _) in rows.items() if ppid == pid)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def wait_until(condition: Callable[[], bool], timeout_seconds: float, message: str, interval: float = 0.05) -> float:
    """Poll until `condition()` is true; returns the seconds it took; AssertionError naming `message`."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError):
            if condition():
                return time.monotonic() - started
        if time.monotonic() - started > timeout_seconds:
            raise AssertionError(f"timed out after {timeout_seconds:g}s waiting for {message}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- TLS


@dataclass
class TLSFiles:
    """A serving pair on disk signed by a CA that stays the same across `rotate()` calls."""

    paths: CertPaths
    bundle: TLSBundle

    @classmethod
    def create(cls, directory: Path) -> TLSFiles:
        bundle = generate_serving_certificate("ibc-stress", "ibc-system", ip_addresses=["127.0.0.1"])
        return cls(write_files(bundle, directory), bundle)

    def rotate(self) -> int:
        """Write a renewed pair (same CA) by temp file + rename, key first; returns the new serial."""
        self.bundle = renew_serving_certificate(self.bundle, "ibc-stress", "ibc-system", ip_addresses=["127.0.0.1"])
        write_files(self.bundle, self.paths.directory)
        return self.bundle.serial

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.paths.ca))


# ----------------------------------------------------------------------------- processes


@dataclass
class Service:
    """One `ibc <command>` process (in its own session, like a container), killable and restartable."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    ready_path: str = "/livez"
    ca: Path | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    started: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def client(self, **kwargs: object) -> httpx.Client:
        """An httpx client for this service (trusting its CA when it serves TLS)."""
        return httpx.Client(base_url=self.url, verify=str(self.ca) if self.ca else False, **kwargs)  # type: ignore[arg-type]

    def start(self, timeout_seconds: float = 60) -> float:
        """Start the process and wait until `ready_path` answers 200; returns the seconds that took."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with self.log_path.open("ab") as log:
            log.write(f"# {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        self.started.append(time.monotonic())
        return self.wait_ready(timeout_seconds)

    def wait_ready(self, timeout_seconds: float = 60) -> float:
        def ready() -> bool:
            if self.popen is None or self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_tail()}")
            with self.client(timeout=2) as c:
                return c.get(self.ready_path).status_code == 200

        try:
            return wait_until(ready, timeout_seconds, f"{self.name} ready", interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def workers(self) -> list[int]:
        """The gunicorn worker pids (children of the master running this app)."""
        return children(self.pid)

    def kill9(self) -> float:
        """SIGKILL the whole process group (master and workers), as a crashed container.

        Returns the monotonic time of the kill (taken right after it, not before the preparations).
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert self.popen is not None
        self.popen.wait(10)
        return killed_at

    def kill9_worker(self) -> float:
        """SIGKILL the one gunicorn worker (the master starts a new one); returns the time of the kill."""
        workers = self.workers()
        assert len(workers) == 1, f"expected one worker under {self.pid}, found {workers}"
        os.kill(workers[0], signal.SIGKILL)
        return time.monotonic()

    def stop(self, grace_seconds: float = 15) -> None:
        """SIGTERM, then SIGKILL the group after `grace_seconds`; idempotent."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def service(
    name: str, args: Sequence[str], work: Path, *, tls: TLSFiles | None = None, ready_path: str = "/livez"
) -> Service:
    """An `ibc` server command on a free port (`--bind` and TLS flags added), not yet started."""
    port = free_port()
    argv = [*IBC, "--log-level", "WARNING", *args, "--bind", f"127.0.0.1:{port}"]
    if tls is not None:
        argv += ["--tls-cert", str(tls.paths.cert), "--tls-key", str(tls.paths.key)]
    return Service(name, argv, port, work / f"{name}.log", ready_path, tls.paths.ca if tls else None)


# ----------------------------------------------------------------------------- load


@dataclass
class Outcome:
    """One request of a load run: when it was sent and when it ended (monotonic), whether it succeeded."""

    sent: float
    at: float
    ok: bool
    detail: str = ""


class Load:
    """`threads` threads calling `call()` in a loop until stopped; records every outcome with its time.

    `call()` returns (ok, detail): ok False for a wrong answer (a test failure), and raises for a
    transport error (the service is down: expected while it is killed, counted separately).
    """

    def __init__(self, call: Callable[[int], tuple[bool, str]], threads: int = 4, pause_seconds: float = 0.0) -> None:
        self._call = call
        self._pause = pause_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.transport_errors: list[Outcome] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                ok, detail = self._call(index)
            except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
                with self._lock:
                    self.transport_errors.append(Outcome(sent, time.monotonic(), False, f"{type(exc).__name__}: {exc}"))
                time.sleep(0.01)
                continue
            with self._lock:
                self.outcomes.append(Outcome(sent, time.monotonic(), ok, detail))
            if self._pause:
                time.sleep(self._pause)

    def successes_since(self, moment: float) -> int:
        """Good answers to requests sent after `moment` (a request in flight at `moment` does not count)."""
        with self._lock:
            return sum(1 for o in self.outcomes if o.ok and o.sent > moment)

    def first_success_after(self, moment: float) -> float | None:
        """Seconds from `moment` to the first good answer to a request sent after it."""
        with self._lock:
            times = [o.at for o in self.outcomes if o.ok and o.sent > moment]
        return min(times) - moment if times else None

    def wrong_answers(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok]

    def wait_for_success_after(self, moment: float, timeout_seconds: float) -> float:
        """Seconds from `moment` to the first successful request after it (AssertionError on timeout)."""
        return self.wait_for_successes_after(moment, 1, timeout_seconds)

    def wait_for_successes_after(self, moment: float, count: int, timeout_seconds: float) -> float:
        """Wait for `count` good answers to requests sent after `moment`; returns the seconds to the first."""
        wait_until(lambda: self.successes_since(moment) >= count, timeout_seconds, f"{count} successful requests")
        found = self.first_success_after(moment)
        assert found is not None
        return found


# ----------------------------------------------------------------------------- a stub process runtime


class _Popen:
    """What the scaler reads of a process: its pid and whether it has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class RecordingRuntime:
    """ProcessRuntime's surface without processes; checks the memory invariant at every spawn.

    A replica counts from its spawn until the runtime marks it EXITED, exactly the span during which
    the scaler promises to count it. Listener calls happen outside the runtime's lock, as the real
    runtime's do (the scaler's listener takes the scaler's lock).
    """

    def __init__(self, config: LocalConfig) -> None:
        self.capacity = {n.name: n.memory_bytes for n in config.nodes}
        self.memory = {m.key: m.memory_bytes for m in config.models}
        self._lock = threading.Lock()
        self._pids = itertools.count(10_000)
        self.live: list[ManagedProcess] = []
        self.violations: list[str] = []
        self.spawns = 0
        self._listener: Callable[[ManagedProcess], None] | None = None

    # the ProcessRuntime surface the scaler uses
    def set_listener(self, listener: Callable[[ManagedProcess], None]) -> None:
        self._listener = listener

    def start(self) -> None:
        pass

    def shutdown(self, timeout_seconds: float | None = None) -> None:
        pass

    def spawn(self, spec: ProcessSpec) -> ManagedProcess:
        with self._lock:
            # A replica marked EXITED is gone (its removal from `live` may trail by a moment).
            held = sum(
                self.memory[p.spec.owner] for p in self.live if p.spec.node == spec.node and p.phase is not Phase.EXITED
            )
            need = self.memory[spec.owner]
            if held + need > self.capacity[spec.node]:
                self.violations.append(
                    f"{spec.name} started on {spec.node} holding {format_bytes(held)} of "
                    f"{format_bytes(self.capacity[spec.node])}: {format_bytes(held + need)} declared"
                )
            proc = ManagedProcess(spec, _Popen(next(self._pids)), started_at=time.time())  # type: ignore[arg-type]
            self.live.append(proc)
            self.spawns += 1
        return proc

    def reap(self) -> None:
        with self._lock:
            dead = [p for p in self.live if p.popen.poll() is not None]
        for proc in dead:
            self._exit(proc)

    def stop(self, proc: ManagedProcess, *, grace_seconds: float | None = None) -> None:
        with proc.lock:
            if proc.phase in (Phase.STOPPING, Phase.EXITED):
                return
            proc.phase = Phase.STOPPING
        self._notify(proc)

    def sample_memory(self, procs: Any) -> dict[int, Any]:
        return {}

    # chaos, as the real runtime's threads would do it
    def random_live(self, rng: random.Random) -> ManagedProcess | None:
        with self._lock:
            return rng.choice(self.live) if self.live else None

    def make_ready(self, proc: ManagedProcess) -> None:
        with proc.lock:
            if proc.phase is not Phase.STARTING:
                return
            proc.phase = Phase.READY
        self._notify(proc)

    def kill(self, proc: ManagedProcess) -> None:
        """SIGKILL: the process is gone, noticed by the next reap (the reaper or a request)."""
        proc.popen.returncode = -9  # type: ignore[misc]

    def _exit(self, proc: ManagedProcess) -> None:
        with proc.lock:
            if proc.phase is Phase.EXITED:
                return
            proc.phase = Phase.EXITED
        with self._lock:
            if proc in self.live:
                self.live.remove(proc)
        self._notify(proc)

    def finish_stops(self) -> None:
        with self._lock:
            stopping = [p for p in self.live if p.phase is Phase.STOPPING]
        for proc in stopping:
            self._exit(proc)

    def _notify(self, proc: ManagedProcess) -> None:
        if self._listener is not None:
            self._listener(proc)


# ----------------------------------------------------------------------------- many streams at once


def stream_request(model: str, tokens: int, host: str = "bench") -> bytes:
    """The raw bytes of one streamed chat completion (Connection: close: one stream per connection)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": tokens}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Stream(asyncio.Protocol):
    """One client: send the request, timestamp every arrival that carries an SSE `data:` event."""

    def __init__(self, payload: bytes, done: asyncio.Future[None]) -> None:
        self.payload = payload
        self.done = done
        self.started = time.perf_counter()
        self.head = b""
        self.status = 0
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.finished = False
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.payload)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            self.status = int(head.split(b" ", 2)[1])
        if b"data:" in data:
            if self.first is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)
            self.last = now
        if b"[DONE]" in self.tail + data:
            self.finished = True
        self.tail = data[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class StreamRun:
    """What N clients saw: streams that ended with `[DONE]` after a 200, first-chunk times, gaps, wall."""

    streams: int
    completed: int
    ttfc_seconds: list[float]
    gap_seconds: list[float]
    wall_seconds: float
    statuses: dict[int, int]
    peak_rss_bytes: int = 0

    @property
    def errors(self) -> int:
        return self.streams - self.completed


async def _one_stream(host: str, port: int, payload: bytes, timeout: float) -> _Stream | None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _Stream(payload, done), host, port), timeout
        )
    except (OSError, TimeoutError):
        return None
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        transport.close()
    return proto


def hold_streams(
    url: str, n: int, payload: bytes, timeout_seconds: float, rss_of: Callable[[], int] | None = None
) -> StreamRun:
    """Open `n` streams at the same moment (one asyncio process of raw sockets) and wait for all of them;
    `rss_of()` is sampled every 100 ms and its peak returned. Raise the fd limit first (`raise_fd_limit`)."""

    async def run() -> StreamRun:
        host, port = url.removeprefix("http://").split(":")
        peak = [0]

        async def sample() -> None:
            while rss_of is not None:
                peak[0] = max(peak[0], rss_of())
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one_stream(host, int(port), payload, timeout_seconds) for _ in range(n)))
        wall = time.perf_counter() - t0
        sampler.cancel()
        ok = [r for r in results if r is not None and r.status == 200 and r.finished and r.first is not None]
        statuses: dict[int, int] = {}
        for r in results:
            code = r.status if r is not None else 0
            statuses[code] = statuses.get(code, 0) + 1
        return StreamRun(
            streams=n,
            completed=len(ok),
            ttfc_seconds=[r.first - r.started for r in ok if r.first is not None],
            gap_seconds=[g for r in ok for g in r.gaps],
            wall_seconds=wall,
            statuses=statuses,
            peak_rss_bytes=peak[0],
        )

    return asyncio.run(run())


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft open-files limit to the hard one; AssertionError if below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert hard >= needed, f"open-files hard limit {hard} < {needed} needed (raise it: ulimit -Hn)"
    return hard


def rss_bytes(pid: int, skip: str = "mock-backend") -> int:
    """Resident memory of `pid` and its descendants, leaving out processes whose command line has `skip`."""
    rows = proc_table()
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children(p, rows))
        if p in rows and skip in rows[p][1]:
            continue
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
