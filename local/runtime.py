"""Local processes as model replicas: start, probe, reap, stop, and never leave one behind.

Local mode has no kubelet, so this module does its job for `ibc local`: each replica is a child
process in its own session (so a Ctrl-C at the terminal reaches `ibc local` only, which then stops
the children in order), readiness is an HTTP probe, a crash is noticed by a reaper thread, and a stop
is SIGTERM then SIGKILL after a grace period, sent to the whole process group. A child that outlives
an `ibc local` killed with SIGKILL is asked to go by the kernel (`PR_SET_PDEATHSIG`, Linux only).

The runtime only runs processes; whether one may start (the memory budget) is decided by the local
scaler in :mod:`local.scaler` with :func:`budget.decide_scale`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import enum
import http.client
import logging
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, BinaryIO, NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
output_log = log.getChild("output")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TAIL_LINES = 20
FORWARDED_LINES = 20
"""Lines of each process's output also written to ibc's own log: its start-up, then only its log file.
A real engine prints about a thousand lines per start (llama.cpp's loader), which would drown ibc's log."""
FAILURE_LINES = 3
"""Lines of stderr quoted in `lastFailure`: the error and the lines that led to it."""
_STDERR_WINDOW = 64
"""The last stderr lines kept per process: what it said just before it exited (a Python traceback is ~25)."""
_ERRORISH = re.compile(r"error|fatal|fail|exception|panic|abort|killed|out of memory|denied|no such", re.IGNORECASE)
LOG_ROTATE_BYTES = 64 * 2**20
"""A model's log file is moved to `<name>.log.1` at a start when it has grown past this."""
_DRAIN_SECONDS = 1.0
"""After an exit, how long to wait for its last output to be read (a grandchild may hold the pipe)."""


class ProcessError(Exception):
    """A process could not be started (no such executable, permission denied, runtime closed)."""


class Phase(enum.StrEnum):
    """Where a replica process is in its life."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


@dataclass(frozen=True)
class ProcessSpec:
    """What to run for one replica and how to tell it is ready; `owner` is the model key."""

    owner: str
    name: str
    argv: tuple[str, ...]
    port: int
    health_url: str
    node: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    devices: tuple[int, ...] = ()  # the node's devices the budget gave it (its env says so); () = unified memory
    startup_timeout_seconds: float = 600.0
    stop_grace_seconds: float = 30.0
    log_path: str | None = None  # the process's stdout and stderr, appended; None: ibc's log only

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ManagedProcess:
    """One running child; phase changes come from the runtime's threads, under the process's lock."""

    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen[bytes], started_at: float) -> None:
        self.spec = spec
        self.popen = popen
        self.pid = popen.pid
        self.started_at = started_at
        self.ready_at: float | None = None
        self.phase = Phase.STARTING
        self.exit_code: int | None = None
        self.failure: str | None = None  # why it ended, when it was not asked to
        self.stop_deadline: float | None = None  # monotonic time of the SIGKILL
        self.killed = False
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_WINDOW)
        self.lock = threading.Lock()
        self.readers: list[threading.Thread] = []
        self.forwarded = 0  # output lines written to ibc's log so far
        self.open_streams = 0  # the last reader to finish closes the log file
        self.log_file: BinaryIO | None = None
        self.log_lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.phase is not Phase.EXITED

    def last_output(self) -> str:
        """What the process said last, for error messages ('' when it said nothing).

        Its last error-looking lines on stderr (a traceback's frames skipped: the loader's own error and
        the exception are what a person needs), else its last stderr lines, else its last stdout line.
        """
        said = [line for line in self.stderr_tail if not line[:1].isspace()]
        errors = [line for line in said if _ERRORISH.search(line)]
        quoted = (errors or said)[-FAILURE_LINES:]
        if quoted:
            return " | ".join(_clip(line) for line in quoted)
        return _clip(self.tail[-1]) if self.tail else ""

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.spec.name} pid={self.pid} {self.phase.value}>"


Listener = Callable[[ManagedProcess], None]


@dataclass(frozen=True)
class MemorySample:
    """Observed memory of one process tree: GPU memory where nvidia-smi reports it, else RSS."""

    memory_bytes: int
    source: str  # "nvidia-smi" or "rss"
    pids: tuple[int, ...] = ()


def _clip(line: str, limit: int = 300) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def open_log(path: str, header: str) -> BinaryIO:
    """Open a model's log file for appending (rotated once when large), starting with `header`."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) > LOG_ROTATE_BYTES:
            os.replace(path, path + ".1")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f = open(path, "ab")  # closed by the last reader of the process's output
    f.write(header.encode() + b"\n")
    f.flush()
    return f


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel says is free right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PortRange:
    """Hands out ports from `first`..`last` in turn, skipping busy ones and ones something else holds.

    In turn, not lowest-first: a port a process just left may still be in TIME_WAIT or about to be
    reused by its child, and two starts picking at once (before either child binds) get different ports.
    """

    def __init__(self, first: int, last: int, host: str = "127.0.0.1") -> None:
        if not 0 < first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        self.first, self.last, self.host = first, last, host
        self._next = first
        self._lock = threading.Lock()

    def pick(self, busy: Iterable[int] = ()) -> int:
        """A port of the range that is not in `busy` and can be bound now; ProcessError when none is left."""
        taken = set(busy)
        with self._lock:
            for _ in range(self.last - self.first + 1):
                port = self._next
                self._next = self.first if port == self.last else port + 1
                if port not in taken and _bindable(self.host, port):
                    return port
        raise ProcessError(f"no free port in {self.first}-{self.last} (ports: in the config)")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


_PRCTL = _libc_prctl()


def _child_setup(parent_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with the parent (Linux), even if it died already."""

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return setup


# /proc/<pid>/stat after the ")" closing the command name: state ppid pgrp session ... rss at index 21.
_STAT_STATE, _STAT_PPID, _STAT_PGRP, _STAT_SESSION, _STAT_RSS = 0, 1, 2, 3, 21


class ProcInfo(NamedTuple):
    """What /proc says about one live process."""

    ppid: int
    pgrp: int
    session: int
    rss_pages: int


def _proc_table() -> dict[int, ProcInfo]:
    """Every live process in /proc (zombies hold no memory and cannot be signalled, so they are left out)."""
    table: dict[int, ProcInfo] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited while we looked
        fields = raw[raw.rfind(b")") + 2 :].split()
        if fields[:1] in ([b"Z"], [b"X"]):
            continue
        try:
            table[int(entry)] = ProcInfo(
                int(fields[_STAT_PPID]), int(fields[_STAT_PGRP]), int(fields[_STAT_SESSION]), int(fields[_STAT_RSS])
            )
        except (IndexError, ValueError):
            continue
    return table


def session_members(session_id: int, table: Mapping[int, ProcInfo] | None = None) -> list[int]:
    """Pids still in the session (or process group) a replica's leader created."""
    rows = _proc_table() if table is None else table
    return sorted(pid for pid, info in rows.items() if session_id in (info.session, info.pgrp))


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux PR_SET_CHILD_SUBREAPER), so a last sweep can still find them."""
    if _PRCTL is None:
        return False
    return bool(_PRCTL(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def sweep_children(parent_pid: int, *, grace_seconds: float = 5.0) -> list[int]:
    """Stop every remaining child of `parent_pid` with all of its session: SIGTERM, then SIGKILL.

    The last line of defence of `ibc local`'s main process, run after its worker is gone: whatever
    model process the worker could not stop (it was killed) has been re-parented here. Returns the pids.
    """
    children = [pid for pid, info in _proc_table().items() if info.ppid == parent_pid]
    if not children:
        return []
    log.warning("stopping %d model process(es) left behind: %s", len(children), children)
    for pid in children:
        _signal_tree(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        table = _proc_table()
        if not any(pid in table or session_members(pid, table) for pid in children):
            return children
        time.sleep(0.05)
    for pid in children:
        _signal_tree(pid, signal.SIGKILL)
    return children


def _nvidia_used_bytes() -> dict[int, int]:
    """pid -> GPU memory in bytes from nvidia-smi; empty where there is no NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return {}
    used: dict[int, int] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = used.get(int(parts[0]), 0) + int(parts[1]) * 2**20
    return used


def _signal_tree(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group `pid` leads and to any straggler left in its session."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for member in session_members(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, sig)


def probe_http(url: str, *, timeout_seconds: float = 2.0) -> bool:
    """True when a GET of `url` answers 2xx. Like a kubelet probe: no proxy, no TLS verification, no logs."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout_seconds, context=context)
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout_seconds)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        response.read()
        return 200 <= response.status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ProcessRuntime:
    """Starts replica processes and watches them; thread-safe. `listener` hears every phase change.

    Children are forked from one long-lived spawner thread, because Linux ties PR_SET_PDEATHSIG to
    the thread that forked, not to the process: a request thread that later ends would take its
    children with it.
    """

    def __init__(
        self,
        *,
        listener: Listener | None = None,
        poll_interval_seconds: float = 0.1,
        health_interval_seconds: float = 0.2,
        health_timeout_seconds: float = 2.0,
        probe: Callable[[str], bool] | None = None,
        forward_output: bool = True,
    ) -> None:
        self._listener = listener
        self._poll_interval_seconds = poll_interval_seconds
        self._health_interval_seconds = health_interval_seconds
        self._probe_url = probe or (lambda url: probe_http(url, timeout_seconds=health_timeout_seconds))
        self._forward_output = forward_output
        self._lock = threading.Lock()
        self._live: list[ManagedProcess] = []
        self._closed = threading.Event()
        self._spawn_queue: queue.SimpleQueue[tuple[ProcessSpec, Future[ManagedProcess]] | None] = queue.SimpleQueue()
        self._spawner = threading.Thread(target=self._spawn_loop, name="ibc-local-spawner", daemon=True)
        self._reaper = threading.Thread(target=self._reap_loop, name="ibc-local-reaper", daemon=True)
        self._started = False

    def set_listener(self, listener: Listener) -> None:
        """Install the phase-change callback (called from runtime threads, never under runtime locks)."""
        self._listener = listener

    def start(self) -> None:
        """Start the spawner and reaper threads and the exit safety net; idempotent."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._spawner.start()
        self._reaper.start()
        atexit.register(self.shutdown)

    # -- starting ---------------------------------------------------------------------------------

    def spawn(self, spec: ProcessSpec) -> ManagedProcess:
        """Start one replica; returns once the process exists (readiness is probed in the background)."""
        if self._closed.is_set():
            raise ProcessError(f"{spec.name}: the runtime is shutting down")
        self.start()
        future: Future[ManagedProcess] = Future()
        self._spawn_queue.put((spec, future))
        return future.result()

    def _spawn_loop(self) -> None:
        while True:
            item = self._spawn_queue.get()
            if item is None:
                return
            spec, future = item
            try:
                future.set_result(self._spawn_now(spec))
            except BaseException as exc:
                future.set_exception(exc)

    def _spawn_now(self, spec: ProcessSpec) -> ManagedProcess:
        if self._closed.is_set():
            raise ProcessError(f"{spec.name}: the runtime is shutting down")
        env = {**os.environ, **spec.env}
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self._forward_output else subprocess.DEVNULL,
                stderr=subprocess.PIPE if self._forward_output else subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(os.getpid()) if _PRCTL is not None else None,
                close_fds=True,
            )
        except OSError as exc:
            raise ProcessError(f"{spec.name}: cannot run {spec.argv[0]!r}: {exc.strerror or exc}") from exc
        proc = ManagedProcess(spec, popen, started_at=time.time())
        with self._lock:
            self._live.append(proc)
        argv_text = " ".join(spec.argv)
        log.info(
            "started %s pid=%d port=%d node=%s%s%s: %s",
            spec.name,
            proc.pid,
            spec.port,
            spec.node,
            f" devices={','.join(map(str, spec.devices))}" if spec.devices else "",
            f" log={spec.log_path}" if spec.log_path and self._forward_output else "",
            argv_text,
        )
        if spec.log_path and self._forward_output:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(proc.started_at))
            try:
                proc.log_file = open_log(spec.log_path, f"----- {stamp} ibc local started pid {proc.pid}: {argv_text}")
            except OSError as exc:
                log.warning(
                    "%s: cannot write its log %s (%s); its output goes to ibc's log", spec.name, spec.log_path, exc
                )
        streams = [(out, is_err) for out, is_err in ((popen.stdout, False), (popen.stderr, True)) if out is not None]
        proc.open_streams = len(streams)
        for stream, is_stderr in streams:
            if stream is not None:
                reader = threading.Thread(
                    target=self._read_output,
                    args=(proc, stream, is_stderr),
                    name=f"ibc-local-{'err' if is_stderr else 'out'}-{proc.pid}",
                    daemon=True,
                )
                proc.readers.append(reader)
                reader.start()
        threading.Thread(target=self._probe, args=(proc,), name=f"ibc-local-probe-{proc.pid}", daemon=True).start()
        return proc

    def _read_output(self, proc: ManagedProcess, stream: IO[bytes], is_stderr: bool) -> None:
        """Copy one of the process's streams to its log file and tails; the first lines to ibc's log too."""
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip()
                if proc.log_file is not None:
                    with proc.log_lock, contextlib.suppress(OSError, ValueError):
                        proc.log_file.write(raw if raw.endswith(b"\n") else raw + b"\n")
                        proc.log_file.flush()
                if not line:
                    continue
                proc.tail.append(line)
                if is_stderr:
                    proc.stderr_tail.append(line)
                if proc.log_file is None:
                    output_log.info("%s | %s", proc.spec.name, line)
                    continue
                with proc.log_lock:
                    proc.forwarded += 1
                    forwarded = proc.forwarded
                if forwarded <= FORWARDED_LINES:
                    output_log.info("%s | %s", proc.spec.name, line)
                elif forwarded == FORWARDED_LINES + 1:
                    output_log.info("%s | ... (the rest of its output: %s)", proc.spec.name, proc.spec.log_path)
        with contextlib.suppress(OSError):
            stream.close()
        with proc.log_lock:
            proc.open_streams -= 1
            if proc.open_streams == 0 and proc.log_file is not None:
                with contextlib.suppress(OSError):
                    proc.log_file.close()
                proc.log_file = None

    def _probe(self, proc: ManagedProcess) -> None:
        """Poll the health URL until 2xx; give up (and stop the process) after the startup timeout."""
        deadline = time.monotonic() + proc.spec.startup_timeout_seconds
        while proc.phase is Phase.STARTING and not self._closed.is_set():
            # Healthy only while our process lives: a child that lost the race for its port exits,
            # and whoever does listen there is not our model.
            if self._probe_url(proc.spec.health_url) and proc.popen.poll() is None:
                with proc.lock:
                    if proc.phase is not Phase.STARTING:
                        return
                    proc.phase = Phase.READY
                    proc.ready_at = time.time()
                log.info(
                    "%s ready after %.1fs at %s", proc.spec.name, proc.ready_at - proc.started_at, proc.spec.base_url
                )
                self._notify(proc)
                return
            if time.monotonic() >= deadline:
                proc.failure = (
                    f"was not ready within {proc.spec.startup_timeout_seconds:g}s "
                    f"({proc.spec.health_url} did not answer 2xx)"
                )
                log.warning("%s pid=%d %s; stopping it", proc.spec.name, proc.pid, proc.failure)
                self.stop(proc)
                return
            self._closed.wait(self._health_interval_seconds)

    # -- stopping and reaping ---------------------------------------------------------------------

    def stop(self, proc: ManagedProcess, *, grace_seconds: float | None = None) -> None:
        """Ask a replica to go: SIGTERM to its group now, SIGKILL after the grace period. Non-blocking."""
        grace = proc.spec.stop_grace_seconds if grace_seconds is None else grace_seconds
        with proc.lock:
            if proc.phase in (Phase.STOPPING, Phase.EXITED):
                if proc.phase is Phase.STOPPING and proc.stop_deadline is not None:
                    proc.stop_deadline = min(proc.stop_deadline, time.monotonic() + grace)
                return
            proc.phase = Phase.STOPPING
            proc.stop_deadline = time.monotonic() + grace
        log.info("stopping %s pid=%d (SIGTERM, SIGKILL after %gs)", proc.spec.name, proc.pid, grace)
        _signal_tree(proc.pid, signal.SIGTERM)
        self._notify(proc)

    def _reap_loop(self) -> None:
        while not self._closed.wait(self._poll_interval_seconds):
            self.reap()

    def reap(self) -> None:
        """Notice exited processes and overdue stops; called by the reaper thread (and by tests)."""
        with self._lock:
            live = list(self._live)
        now = time.monotonic()
        for proc in live:
            code = proc.popen.poll()
            if code is not None:
                self._exited(proc, code)
            elif proc.phase is Phase.STOPPING and not proc.killed and proc.stop_deadline is not None:
                if now >= proc.stop_deadline:
                    proc.killed = True
                    log.warning("%s pid=%d ignored SIGTERM; sending SIGKILL", proc.spec.name, proc.pid)
                    _signal_tree(proc.pid, signal.SIGKILL)

    def _exited(self, proc: ManagedProcess, code: int) -> None:
        # Its last words first: a failure must quote what it printed before the exit, not what was read so far.
        deadline = time.monotonic() + _DRAIN_SECONDS
        for reader in proc.readers:
            if reader is not threading.current_thread():
                reader.join(max(0.0, deadline - time.monotonic()))
        with proc.lock:
            if proc.phase is Phase.EXITED:
                return
            was = proc.phase
            proc.phase = Phase.EXITED
            proc.exit_code = code
            if was is not Phase.STOPPING and proc.failure is None:
                last = proc.last_output()
                proc.failure = _describe_exit(code) + (f": {last}" if last else "")
        with self._lock:
            if proc in self._live:
                self._live.remove(proc)
        # Whatever the leader left behind in its group or session goes too: the memory must be free.
        _signal_tree(proc.pid, signal.SIGKILL)
        if was is Phase.STOPPING and proc.failure is None:
            log.info("%s pid=%d stopped (%s)", proc.spec.name, proc.pid, _describe_exit(code))
        else:
            log.warning("%s pid=%d %s", proc.spec.name, proc.pid, proc.failure)
        self._notify(proc)

    def _notify(self, proc: ManagedProcess) -> None:
        if self._listener is None:
            return
        try:
            self._listener(proc)
        except Exception:
            log.exception("process listener failed for %s", proc)

    def processes(self) -> list[ManagedProcess]:
        """The processes not yet reaped."""
        with self._lock:
            return list(self._live)

    def shutdown(self, timeout_seconds: float | None = None) -> None:
        """Stop every child (SIGTERM, then SIGKILL after its grace or `timeout_seconds`) and wait; idempotent."""
        self._closed.set()
        with self._lock:
            live = list(self._live)
        if live and not any(p.phase is Phase.STOPPING for p in live):
            log.info("stopping %d model process(es)", len(live))
        for proc in live:
            grace = proc.spec.stop_grace_seconds if timeout_seconds is None else timeout_seconds
            self.stop(proc, grace_seconds=grace)
        pending = list(live)
        while pending:
            now = time.monotonic()
            still = []
            for proc in pending:
                code = proc.popen.poll()
                if code is not None:
                    self._exited(proc, code)
                    continue
                if proc.stop_deadline is not None and now >= proc.stop_deadline and not proc.killed:
                    proc.killed = True
                    log.warning("%s pid=%d ignored SIGTERM; sending SIGKILL", proc.spec.name, proc.pid)
                    _signal_tree(proc.pid, signal.SIGKILL)
                still.append(proc)
            pending = still
            if pending:
                time.sleep(0.05)
        # Leaders are gone; wait (briefly) until nothing of theirs is left either, killing stragglers.
        straggler_deadline = time.monotonic() + 5
        while live and time.monotonic() < straggler_deadline:
            left = [pid for proc in live for pid in session_members(proc.pid)]
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self._spawn_queue.put(None)

    # -- observation ------------------------------------------------------------------------------

    def sample_memory(self, procs: Iterable[ManagedProcess]) -> dict[int, MemorySample]:
        """Observed memory per replica (keyed by pid): one /proc scan and at most one nvidia-smi call."""
        procs = list(procs)
        if not procs:
            return {}
        table = _proc_table()
        gpu = _nvidia_used_bytes()
        samples: dict[int, MemorySample] = {}
        for proc in procs:
            members = session_members(proc.pid, table)
            gpu_bytes = sum(gpu.get(pid, 0) for pid in members)
            if gpu_bytes:
                samples[proc.pid] = MemorySample(gpu_bytes, "nvidia-smi", tuple(members))
            else:
                rss = sum(table[pid].rss_pages for pid in members) * _PAGE_SIZE
                samples[proc.pid] = MemorySample(rss, "rss", tuple(members))
        return samples
