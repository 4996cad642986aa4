"""The one way every `ibc` server runs its Flask app: gunicorn workers (gthread, or gevent for the
proxy), TLS that follows certificate rotation, Prometheus multiprocess mode, and an in-thread twin for tests.

Why one runner: the webhook, the extender, the proxy and the controller's endpoints must all get the
same things right, and each is easy to get wrong alone:

- the app is built in each worker after the fork (gunicorn's default, no `preload_app`), so Kubernetes
  clients, watch threads and httpx pools are never shared across processes;
- `gthread` workers by default; the proxy and local mode ask for `gevent` (one greenlet per connection,
  measured in docs/proxy.md), which holds thousands of streams per process where a thread each could
  not. Under gevent, gunicorn's keep-alive timeout bounds the wait for each request head: it is the
  header deadline (`header_timeout`), answered 408 with `Connection: close` (`serving.head_deadline`);
- gevent workers with a fixed port each listen on their own SO_REUSEPORT socket, so the kernel spreads
  connections over them;
- the soft open-files limit is raised to the hard one: every held stream is two descriptors;
- TLS through gunicorn's `ssl_context` hook, which gunicorn calls per connection, answered with the
  reloading context of `certs.reload`: a renewed Secret is served without a restart;
- with more than one worker, `PROMETHEUS_MULTIPROC_DIR` (a fresh temp dir unless set) exists before the
  fork, and `mark_process_dead` runs when a worker exits;
- gunicorn's logs go through the handlers `ibc.logs.configure` installed (one format, JSON if asked),
  and its per-user control socket is off, so several servers on one machine do not collide.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from gunicorn.errors import HaltServer
from gunicorn.glogging import Logger
from gunicorn.workers import gthread

from certs.errors import CertFileError
from certs.reload import DEFAULT_CHECK_INTERVAL_MS, CertReloader
from serving.bind import ServeError, format_bind, parse_bind, url_host
from serving.metrics import MULTIPROC_ENV
from serving.wsgi import honour_connection_close

if TYPE_CHECKING:
    from werkzeug.serving import BaseWSGIServer

log = logging.getLogger(__name__)

WSGIApp = Callable[..., Any]
WORKER_CLASSES = ("gthread", "gevent")
QUEUED_ENV = "ibc.queued_seconds"  # WSGI environ: how long the request waited for a worker thread


# After a TLS handshake, how long a thread waits for the request before giving the connection back to
# the poller. A client sends its request right after the handshake it dialled for; a Go client (the
# kube-apiserver) also dials ahead and parks handshaken connections idle for up to 90 s.
REQUEST_AFTER_HANDSHAKE_SECONDS = 0.05


class QueueStampingWorker(gthread.ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker with two changes a webhook needs to answer before the apiserver's timeout.

    - ``environ["ibc.queued_seconds"]``: how long the request waited in the thread pool's queue (the app
      cannot see that wait otherwise, and the apiserver's clock started before it);
    - a TLS connection whose handshake is done but whose request has not come is handed back to the
      poller instead of holding a thread in a blocking read: under a 60-way burst the apiserver's
      dialled-ahead connections held every thread and queued reviews for 35 s.
    """

    _local = threading.local()

    def enqueue_req(self, conn: Any) -> None:
        conn.ibc_enqueued_at = time.monotonic()
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        enqueued = getattr(conn, "ibc_enqueued_at", None)
        self._local.queued = 0.0 if enqueued is None else time.monotonic() - enqueued
        if self.cfg.is_ssl and not conn.initialized:
            try:
                if not conn.wait_for_data(gthread.DEFAULT_WORKER_DATA_TIMEOUT):
                    return gthread._DEFER
                conn.init()  # the handshake
                if not conn.is_http2 and not conn.sock.pending():
                    conn.data_ready = False
                    if not conn.wait_for_data(REQUEST_AFTER_HANDSHAKE_SECONDS):
                        return gthread._DEFER  # handshaken, no request yet: the poller wakes us
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self.log.debug("TLS connection failed: %s", exc)
                return False
        return super().handle(conn)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app, local = self.wsgi, self._local

        def stamped(environ: dict[str, Any], start_response: Any) -> Any:
            environ[QUEUED_ENV] = getattr(local, "queued", 0.0)
            return app(environ, start_response)

        self.wsgi = honour_connection_close(stamped)


def add_server_arguments(
    parser: argparse.ArgumentParser,
    *,
    default_bind: str,
    default_workers: int = 1,
    default_threads: int = 8,
    default_timeout: int = 30,
) -> None:
    """Add the flags every server command shares: --bind, --workers, --threads, --timeout, --tls-cert,
    --tls-key, --client-ca. `server_options(args)` turns them into keyword arguments for `serve`."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--bind", default=default_bind, metavar="HOST:PORT", help=f"address to listen on (default {default_bind})"
    )
    group.add_argument(
        "--workers",
        type=int,
        default=default_workers,
        metavar="N",
        help=f"gunicorn worker processes (default {default_workers})",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=default_threads,
        metavar="N",
        help=f"threads per worker, one request each (default {default_threads})",
    )
    group.add_argument(
        "--timeout",
        type=int,
        default=default_timeout,
        metavar="SECONDS",
        help=f"restart a worker silent for this long (default {default_timeout})",
    )
    group.add_argument(
        "--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM); reloaded when the file changes"
    )
    group.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM)")
    group.add_argument(
        "--client-ca", metavar="FILE", help="require client certificates signed by this CA (PEM); needs --tls-cert"
    )


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `serve` taken from the flags of `add_server_arguments`."""
    return {
        "bind": args.bind,
        "workers": args.workers,
        "threads": args.threads,
        "timeout": args.timeout,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "client_ca": args.client_ca,
    }


def check_tls_options(tls_cert: str | None, tls_key: str | None, client_ca: str | None) -> None:
    """ServeError unless TLS options are complete: cert and key together, client CA only with them."""
    if bool(tls_cert) != bool(tls_key):
        raise ServeError("--tls-cert and --tls-key go together: give both or neither")
    if client_ca and not tls_cert:
        raise ServeError("--client-ca needs --tls-cert and --tls-key")


def serve(
    app_factory: Callable[[], WSGIApp],
    *,
    bind: str,
    workers: int = 1,
    threads: int = 8,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    client_ca: str | None = None,
    name: str = "ibc",
    timeout: int = 30,
    graceful_timeout: int = 30,
    keepalive: int = 5,
    post_fork: Callable[[], None] | None = None,
    on_exit: Callable[[], None] | None = None,
    access_log: bool = False,
    reload_interval_ms: int = DEFAULT_CHECK_INTERVAL_MS,
    worker_class: str = "gthread",
    worker_connections: int = 1000,
    header_timeout: int | None = None,
    header_timeout_answer: Callable[[], tuple[str, bytes]] | None = None,
) -> int:
    """Run `app_factory()` under gunicorn until SIGTERM/SIGINT; return the exit code for `run(args)`.

    Returns 0 after a clean shutdown, 1 if gunicorn fails (e.g. the factory raises in a worker: no worker
    boots), 2 for bad input (bind, worker counts, TLS files), after printing one line to stderr.
    `post_fork()` runs in each worker right after the fork, before `app_factory()`; `on_exit()` runs in
    the master just before it exits. With `worker_class="gevent"`, each worker serves up to
    `worker_connections` connections at once and `header_timeout` (seconds) bounds the wait for each
    request head, including the idle time between keep-alive requests (default: `keepalive`); when it
    passes the client gets 408 with the body of `header_timeout_answer()` (content type, body; called in
    each worker like `app_factory`) and the connection closes.
    """
    try:
        host, port = parse_bind(bind)
        if workers < 1 or threads < 1 or timeout < 0:
            raise ServeError(f"workers ({workers}) and threads ({threads}) must be >= 1, timeout >= 0")
        if worker_class not in WORKER_CLASSES:
            raise ServeError(f"worker class must be one of {', '.join(WORKER_CLASSES)}, got {worker_class!r}")
        if worker_connections < 1 or (header_timeout is not None and header_timeout < 1):
            raise ServeError("worker connections and the header timeout must be >= 1")
        check_tls_options(tls_cert, tls_key, client_ca)
        reloader = None
        if tls_cert and tls_key:
            reloader = CertReloader(tls_cert, tls_key, client_ca=client_ca, check_interval_ms=reload_interval_ms)
    except (ServeError, CertFileError) as exc:
        print(f"ibc {name}: {exc}", file=sys.stderr)
        return 2

    owned_multiproc_dir = _prepare_multiprocess(workers, name)
    raise_open_files_limit()
    cooperative = worker_class == "gevent"
    shape = f"{worker_connections} connections" if cooperative else f"{threads} threads"
    options: dict[str, Any] = {
        "bind": [format_bind(host, port)],
        "workers": workers,
        "threads": threads,
        # gthread is served by QueueStampingWorker (queue time, idle TLS connections handed back), gevent
        # by HeadDeadlineWorker (a request head that misses its deadline is answered 408, not cut)
        "worker_class": _head_deadline_worker(header_timeout_answer) if cooperative else QueueStampingWorker,
        "worker_connections": worker_connections,
        "timeout": timeout,
        "graceful_timeout": graceful_timeout,
        "keepalive": header_timeout if cooperative and header_timeout else keepalive,
        # gevent workers do not take turns at a shared listening socket: the one awake accepts a whole
        # burst (measured: 2 workers served no more than 1). A socket per worker (SO_REUSEPORT) lets the
        # kernel spread connections; port 0 would give each worker a different port, so not then.
        "reuse_port": cooperative and workers > 1 and port != 0,
        "proc_name": f"ibc-{name}",
        "loglevel": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        "errorlog": "-",
        "accesslog": "-" if access_log else None,
        "logger_class": _RootHandlersLogger,
        "control_socket_disable": True,
        "preload_app": False,
        # gunicorn serves TLS when these are set; the context comes from the hook below.
        "certfile": tls_cert if reloader else None,
        "keyfile": tls_key if reloader else None,
        **({"ssl_context": lambda _cfg, _default: reloader.server_context()} if reloader else {}),
        "post_fork": lambda _server, _worker: post_fork() if post_fork else None,
        "child_exit": _mark_worker_dead,
        "on_exit": _exit_hook(on_exit, owned_multiproc_dir),
        "when_ready": lambda server: log.info(
            "%s listening on %s://%s (%d workers x %s, %s)",
            name,
            "https" if reloader else "http",
            _listening(server, host, port),
            workers,
            shape,
            worker_class,
        ),
    }
    master_pid = os.getpid()
    try:
        # Inside the try: gunicorn reports a bad setting with sys.exit(1) while loading its config.
        _GunicornApp(app_factory, options).run()
    except SystemExit as exc:
        if os.getpid() != master_pid:
            # A forked worker unwinding through this frame: its exit code (3 = failed to boot) is how
            # the master learns what happened, and the shared metrics directory is not its to remove.
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            log.error("%s: gunicorn stopped with exit code %s", name, code)
        return 0 if code == 0 else 1
    except HaltServer as exc:
        # A worker that fails to boot at once can be reaped (SIGCHLD) while the arbiter is already halting,
        # and then its HaltServer escapes gunicorn's own handler: the same outcome, said the same way.
        if os.getpid() != master_pid:
            raise
        log.error("%s: gunicorn stopped with exit code %s (%s)", name, exc.exit_status, exc.reason)
        return 1
    finally:
        if owned_multiproc_dir is not None and os.getpid() == master_pid:
            shutil.rmtree(owned_multiproc_dir, ignore_errors=True)
    return 0


def _head_deadline_worker(answer: Callable[[], tuple[str, bytes]] | None) -> type:
    """The gevent worker class, with its 408 body (imported here: only gevent servers load gevent)."""
    from serving.head_deadline import HeadDeadlineWorker

    if answer is None:
        return HeadDeadlineWorker
    return type("HeadDeadlineWorker", (HeadDeadlineWorker,), {"answer": staticmethod(answer)})


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _listening(server: Any, host: str, port: int) -> str:
    """The address actually bound: with port 0 the OS chose one, and the log line must say which."""
    try:
        bound = server.LISTENERS[0].getsockname()
        return format_bind(host, int(bound[1]))
    except (AttributeError, IndexError, OSError, TypeError, ValueError):
        return format_bind(host, port)


class _GunicornApp(BaseApplication):  # type: ignore[misc]
    """gunicorn's programmatic application: settings from a dict, the WSGI app from a factory called in
    each worker (no `preload_app`, so nothing built here crosses the fork)."""

    def __init__(self, app_factory: Callable[[], WSGIApp], options: dict[str, Any]) -> None:
        self._factory = app_factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self) -> WSGIApp:
        return self._factory()


class _RootHandlersLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, sending its records to the root handlers when `ibc.logs` installed some."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if not logging.getLogger().handlers:
            return
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                if getattr(handler, "_gunicorn", False):
                    logger.removeHandler(handler)
            logger.propagate = True


def _prepare_multiprocess(workers: int, name: str) -> str | None:
    """Point prometheus_client at a shared directory before the fork; return it if we created it."""
    if workers <= 1:
        return None
    created = None
    if not os.environ.get(MULTIPROC_ENV):
        created = tempfile.mkdtemp(prefix=f"ibc-{name}-metrics-")
        os.environ[MULTIPROC_ENV] = created
        log.debug("%s=%s for %d workers", MULTIPROC_ENV, created, workers)
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        # prometheus_client picks its value class at import; metrics created from now on (in each
        # worker's create_app) must write to the shared directory.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return created


def _mark_worker_dead(_server: Any, worker: Any) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _exit_hook(on_exit: Callable[[], None] | None, owned_dir: str | None) -> Callable[[Any], None]:
    def hook(_server: Any) -> None:
        try:
            if on_exit is not None:
                on_exit()
        finally:
            if owned_dir is not None:
                shutil.rmtree(owned_dir, ignore_errors=True)

    return hook


@dataclass
class ThreadedServer:
    """A server started by `serve_in_thread`: `url` to call it, `stop()` to end it."""

    url: str
    host: str
    port: int
    reloader: CertReloader | None
    _server: BaseWSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop accepting, close the socket and wait for the serving thread (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._server.server_close()

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def serve_in_thread(
    app: WSGIApp,
    bind: str = "127.0.0.1:0",
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    client_ca: str | None = None,
    reload_interval_ms: int = DEFAULT_CHECK_INTERVAL_MS,
    access_log: bool = True,
    name: str | None = None,
) -> ThreadedServer:
    """Serve `app` from a daemon thread with werkzeug (a thread per request) and the same reloading TLS
    context `serve` uses. For tests and tools, and for servers whose state lives in one process (the
    controller's metrics endpoint): not for a request path (the TLS handshake runs on the accepting
    thread). Port 0 picks a free port; the chosen one is in `.url`/`.port`. `access_log=False` drops the
    line per request (errors still reach the log). Raises ServeError or CertFileError on bad input."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            return None

    host, port = parse_bind(bind)
    check_tls_options(tls_cert, tls_key, client_ca)
    reloader = None
    if tls_cert and tls_key:
        reloader = CertReloader(tls_cert, tls_key, client_ca=client_ca, check_interval_ms=reload_interval_ms)
    server = make_server(
        host,
        port,
        app,
        threaded=True,
        request_handler=None if access_log else QuietHandler,
        ssl_context=reloader.server_context() if reloader else None,
    )
    bound_port = server.socket.getsockname()[1]
    scheme = "https" if reloader else "http"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=name or f"serve-{bound_port}", daemon=True
    )
    thread.start()
    url = f"{scheme}://{format_bind(url_host(host), bound_port)}"
    return ThreadedServer(url, host, bound_port, reloader, server, thread)
