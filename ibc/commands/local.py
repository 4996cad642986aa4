"""`ibc local`: the whole product on one machine, with no cluster: the proxy, the budget, and models as processes.

Local mode is the proxy's request path (`proxy.app.create_app`) with the local scaler
(`local.scaler.LocalScaler`), which decides with the same budget function as the webhook and starts
each model's command as a process. It runs under `serving.runner.serve` with ONE gunicorn worker
(gevent by default: a greenlet per connection, as `ibc proxy`): the scaler's table of processes and its
lock must be shared by every request, which several worker processes could not do (and then two cold
requests could overcommit).

Shutdown leaves no child behind, in three layers: the worker stops every model process (SIGTERM, then
SIGKILL after its grace period) as soon as it is asked to stop and again at exit; each child is asked
to go by the kernel if the worker dies (PR_SET_PDEATHSIG); and the main process, which adopts orphans
(PR_SET_CHILD_SUBREAPER), sweeps whatever is left when it exits.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
from typing import Any

from ibc.commands.proxy import (
    add_concurrency_arguments,
    add_request_path_arguments,
    check_concurrency,
    header_timeout_answer,
    held_limits,
    upstream_pool_size,
)
from local.config import LocalConfig, LocalConfigError, load_config

log = logging.getLogger(__name__)

DEFAULT_BIND = "127.0.0.1:8080"
# With --worker-class gthread, each request held during a cold start occupies a thread.
DEFAULT_THREADS = 64
# Threads never given to held requests, so running models answer during a cold-start burst.
RESERVED_THREADS = 16
MIN_THREADS = RESERVED_THREADS + 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the OpenAI-compatible proxy with the memory budget on this machine, starting each model as a "
        "local process when a request needs it and it fits, stopping it after its cooldown, and answering "
        "429 with the reason when it does not fit. Ctrl-C (or SIGTERM) stops every model process."
    )
    parser.epilog = (
        "Example: ibc local --config examples/local.yaml\n"
        "then: curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}\'\n'
        "See docs/local-mode.md for the configuration file."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML with `nodes:` and `models:`")
    parser.add_argument(
        "--bind", default=DEFAULT_BIND, metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_BIND})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        metavar="N",
        help=f"with --worker-class gthread: request threads, one per request in flight or held "
        f"(default {DEFAULT_THREADS}, at least {MIN_THREADS})",
    )
    add_request_path_arguments(parser, cold_start_default=None)
    add_concurrency_arguments(parser)
    parser.add_argument("--check", action="store_true", help="validate the configuration, print it, and exit")


def _fail(message: str) -> int:
    print(f"ibc local: {message}", file=sys.stderr)
    return 2


def _summary(config: LocalConfig) -> str:
    from budget import format_bytes

    lines = [f"{config.source}: {len(config.nodes)} node(s), {len(config.models)} model(s)"]
    for n in config.nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        gpus = f" in GPUs {','.join(format_bytes(d) for d in n.devices)}" if n.devices else ""
        lines.append(f"  node  {n.name}: {format_bytes(n.memory_bytes)}{gpus}" + (f" [{labels}]" if labels else ""))
    for m in config.models:
        cooldown = f"cooldown {m.cooldown_seconds:g}s" if m.cooldown_seconds > 0 else "never idles out"
        split = f" over {m.devices} GPUs" if m.devices > 1 else ""
        lines.append(f"  model {m.name}: {format_bytes(m.memory_bytes)}{split}, {cooldown}: {' '.join(m.command)}")
    if config.ports is not None:
        lines.append(f"  ports {config.ports[0]}-{config.ports[1]} for model processes")
    lines.append(f"  logs  {config.logs or 'a fresh directory per run'}: <model>.log for each model's output")
    return "\n".join(lines)


def _bind_in_use(host: str, port: int) -> str | None:
    """Why the address cannot be listened on (a one-line reason), or None; gunicorn would retry for 5 s."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _warn_missing_executables(config: LocalConfig) -> None:
    for m in config.models:
        exe = m.command[0]
        if exe != "ibc" and shutil.which(exe) is None:
            log.warning("%s: %r is not on PATH (or not executable); requests for it will fail with 503", m.name, exe)


def run(args: argparse.Namespace) -> int:
    from local.runtime import become_subreaper, sweep_children
    from proxy.settings import ProxySettings, SettingsError, load_api_keys
    from serving.bind import ServeError, parse_bind
    from serving.runner import serve

    try:
        config = load_config(args.config)
        parse_bind(args.bind)
        if problem := check_concurrency(args):
            raise ServeError(problem)
        if args.worker_class == "gthread" and args.threads < MIN_THREADS:
            raise ServeError(
                f"--threads {args.threads}: at least {MIN_THREADS} ({RESERVED_THREADS} stay free for running models, "
                "the rest hold requests while a model starts)"
            )
        max_held, max_held_bytes = held_limits(args, args.threads)
        cold_start = args.cold_start_timeout
        if cold_start is None:
            cold_start = max(m.startup_timeout_seconds for m in config.models)
        settings = ProxySettings(
            cold_start_timeout_seconds=cold_start,
            queue_size=args.queue_size,
            read_timeout_seconds=args.upstream_timeout,
            max_body_bytes=args.max_body_bytes,
            # Like `ibc proxy`: under gthread some threads always stay free for running models.
            max_held_requests=max_held,
            max_held_bytes=max_held_bytes,
            body_timeout_seconds=args.body_timeout,
            routing=args.routing,
            prefix_imbalance=args.prefix_imbalance,
            prefix_max_in_flight=args.prefix_max_in_flight,
            max_connections=upstream_pool_size(args),
            api_key_digests=load_api_keys(args.api_key_file) if args.api_key_file else frozenset(),
        )
    except (LocalConfigError, ServeError, SettingsError) as exc:
        return _fail(str(exc))
    if args.check:
        print(_summary(config))
        return 0
    host, port = parse_bind(args.bind)
    if port and (reason := _bind_in_use(host, port)):
        print(f"ibc local: cannot listen on {args.bind}: {reason}", file=sys.stderr)
        return 1
    _warn_missing_executables(config)
    log_dir = config.logs or tempfile.mkdtemp(prefix="ibc-local-logs-")

    def factory() -> Any:
        from local.scaler import create_local_app
        from proxy.app import proxy_of
        from serving.stopping import on_stop_signals

        app, scaler = create_local_app(config, settings, log_dir=log_dir)
        atexit.register(scaler.close)
        # The moment a stop signal arrives: held requests get their 503 (not a dropped connection), and
        # the model processes start stopping, in parallel, while gunicorn drains the worker as usual.
        # (The last chained runs first.)
        on_stop_signals(lambda: threading.Thread(target=scaler.close, name="ibc-local-stop", daemon=True).start())
        on_stop_signals(proxy_of(app).shutdown)
        # As `ibc proxy` does: objects from imports and start-up live as long as the worker; keep them out
        # of every later full collection, which stops every stream while it runs.
        gc.collect()
        gc.freeze()
        return app

    main_pid = os.getpid()
    adopted = become_subreaper()
    grace = max(m.stop_grace_seconds for m in config.models)

    def last_sweep() -> None:
        if adopted:
            sweep_children(main_pid, grace_seconds=min(grace, 10.0))

    log.info("ibc local: %s", _summary(config).replace("\n", "\n  "))
    log.info("ibc local: each model's output goes to %s/<model>.log (the first lines also here)", log_dir)
    return serve(
        factory,
        bind=args.bind,
        workers=1,
        threads=args.threads,
        worker_class=args.worker_class,
        worker_connections=args.connections,
        header_timeout=args.header_timeout,
        header_timeout_answer=header_timeout_answer(args.header_timeout),
        name="local",
        # The worker stops its model processes while it drains: give it their grace period and a margin.
        graceful_timeout=math.ceil(grace) + 5,
        on_exit=last_sweep,
    )
