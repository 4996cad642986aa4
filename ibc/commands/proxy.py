"""`ibc proxy`: the OpenAI-compatible front door in a cluster (the request path with the Kubernetes scaler).

Each gunicorn worker builds its own app after the fork: its own watch cache of InferenceModels, model
pods and nodes, its own keep-alive pool to the backends. Workers are gevent's by default: a connection
is a greenlet, so one worker holds `--connections` streams and held requests (cold starts) at once,
bounded per model by `--queue-size` and together by `--max-held-mib`. With `--worker-class gthread` a
request holds a thread, and the worker keeps 16 threads for warm models (at most `threads - 16` held).
Beyond a bound a cold request gets 503 `queue_full`. See docs/proxy.md, "Concurrency".
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.runner import add_server_arguments, serve, server_options

log = logging.getLogger(__name__)

DEFAULT_BIND = "0.0.0.0:8080"
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 64
# Threads of a worker never given to held requests, so warm models are served during a cold-start burst.
RESERVED_THREADS = 16
# Client connections one gevent worker serves at once (each stream also holds an upstream socket):
# 10,000 covers the 5,000-stream target with room for keep-alive idlers; the fd limit is raised to match.
DEFAULT_CONNECTIONS = 10000
# Seconds for a request head to arrive (also the keep-alive idle limit): slowloris clients get 408 here.
DEFAULT_HEADER_TIMEOUT = 10
DEFAULT_BODY_TIMEOUT = 30.0
HELD_MEMORY_SHARE = 8  # held requests may use 1/8 of the memory available at start (or of the cgroup limit) ...
HELD_MEMORY_MAX_MIB = 4096  # ... and at most 4 GiB per worker
SYNC_TIMEOUT_SECONDS = 20.0


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "OpenAI-compatible proxy: routes each request by its `model` to a ready replica (streaming as it "
        "comes), scales a model from zero through its InferenceModel's /scale (the webhook decides), holds "
        "requests while it starts, and answers 429 at once, with the reason, when its memory does not fit."
    )
    parser.epilog = (
        "Example: ibc proxy --kubeconfig ~/.kube/config --bind 127.0.0.1:8080\n"
        "then: curl -s localhost:8080/v1/models; see docs/proxy.md"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_server_arguments(
        parser,
        default_bind=DEFAULT_BIND,
        default_workers=DEFAULT_WORKERS,
        default_threads=DEFAULT_THREADS,
    )
    group = parser.add_argument_group("proxy")
    group.add_argument(
        "--kubeconfig",
        metavar="FILE",
        default=os.environ.get("KUBECONFIG") or None,
        help="cluster to use (default $KUBECONFIG, else the in-cluster service account)",
    )
    group.add_argument("--namespace", metavar="NS", help="serve only the models of this namespace (default all)")
    add_request_path_arguments(group, cold_start_default=600.0)
    add_concurrency_arguments(group)


def add_request_path_arguments(
    group: argparse._ArgumentGroup | argparse.ArgumentParser, *, cold_start_default: float | None
) -> None:
    """The request path's flags, shared by `ibc proxy` and `ibc local` (one proxy, two scalers)."""
    group.add_argument(
        "--api-key-file", metavar="FILE", help="require `Authorization: Bearer <key>` with a key from this file"
    )
    group.add_argument(
        "--max-body-bytes", type=int, default=16 * 1024 * 1024, metavar="N", help="largest request body (16 MiB)"
    )
    group.add_argument(
        "--cold-start-timeout",
        type=_positive_float,
        default=cold_start_default,
        metavar="SECONDS",
        help="how long a request waits for its model to start "
        + ("(default 600, a vLLM cold start)" if cold_start_default else "(default: the longest startup_timeout)"),
    )
    group.add_argument(
        "--queue-size", type=int, default=4096, metavar="N", help="requests held per starting model (default 4096)"
    )
    group.add_argument(
        "--max-held-mib",
        type=int,
        metavar="MIB",
        help="memory all held requests of a worker may use (bodies + 64 KiB each; default "
        f"1/{HELD_MEMORY_SHARE} of the available memory or of the container's limit, at most {HELD_MEMORY_MAX_MIB})",
    )
    group.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=DEFAULT_BODY_TIMEOUT,
        metavar="SECONDS",
        help=f"whole request body must arrive within this, else 408 and the connection closes "
        f"(default {DEFAULT_BODY_TIMEOUT:g})",
    )
    group.add_argument(
        "--upstream-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="longest silence from a backend while it answers (default 600)",
    )
    group.add_argument(
        "--routing",
        choices=("prefix", "least-outstanding", "random"),
        default="prefix",
        help="which replica of a model gets a request: prefix (default: the replica that served the prompt's "
        "leading blocks last, so its prefix cache is reused), least-outstanding, random",
    )
    group.add_argument(
        "--prefix-imbalance",
        type=int,
        default=4,
        metavar="N",
        help="prefix routing yields to the least loaded replica when the prefix's replica has N more "
        "requests in flight (default 4)",
    )
    group.add_argument(
        "--prefix-max-in-flight",
        type=int,
        metavar="N",
        help="prefix routing treats a replica with N requests in flight as saturated (e.g. the backend's "
        "--max-num-seqs; default: no limit)",
    )


def add_concurrency_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """How the proxy holds connections (shared by `ibc proxy` and `ibc local`); see docs/proxy.md."""
    group.add_argument(
        "--worker-class",
        choices=("gevent", "gthread"),
        default="gevent",
        help="gevent (default): a greenlet per connection, thousands of streams per worker; "
        "gthread: a thread per request (--threads)",
    )
    group.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        metavar="N",
        help=f"client connections per gevent worker (default {DEFAULT_CONNECTIONS})",
    )
    group.add_argument(
        "--header-timeout",
        type=int,
        default=DEFAULT_HEADER_TIMEOUT,
        metavar="SECONDS",
        help="a request head must arrive within this (also the keep-alive idle limit), else 408 and the "
        f"connection closes (gevent; default {DEFAULT_HEADER_TIMEOUT})",
    )


def header_timeout_answer(seconds: int) -> Callable[[], tuple[str, bytes]]:
    """The 408 a request head that missed `--header-timeout` gets: OpenAI's envelope, as for a stalled body.
    Built in the worker (`serving.runner.serve` calls it there), after gevent patched it."""

    def answer() -> tuple[str, bytes]:
        from proxy.app import error_body

        body = error_body(408, f"request head not received within {seconds}s", "request_timeout")
        return "application/json", json.dumps(body).encode()

    return answer


def upstream_pool_size(args: argparse.Namespace) -> int:
    """Keep-alive connections per worker to the backends: one per request that can be in flight at once.
    Under gevent that is `--connections`, not the thread-era 256: with 1,000 streams, 744 of them
    connected and closed afresh each time (a sixth of the worker's CPU, profiled, and a TIME_WAIT each)."""
    from proxy.settings import ProxySettings

    return args.connections if args.worker_class == "gevent" else ProxySettings.max_connections


def held_limits(args: argparse.Namespace, threads: int) -> tuple[int | None, int | None]:
    """(max held requests, max held bytes) of one worker: threads bound gthread, memory bounds gevent."""
    held_bytes = args.max_held_mib << 20 if args.max_held_mib else default_held_bytes()
    if args.worker_class == "gthread":
        return max(1, threads - RESERVED_THREADS) if threads > RESERVED_THREADS else 1, held_bytes
    return None, held_bytes


MEMINFO = "/proc/meminfo"
# The container's memory limit: cgroup v2, then v1 (whose "no limit" is a number near 2**63).
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def default_held_bytes(meminfo: str = MEMINFO, cgroup_limits: tuple[str, ...] = CGROUP_LIMITS) -> int:
    """An eighth of the memory this process may use (at most 4 GiB): what held requests may use when no
    flag says. In a container that is its cgroup's limit, not the node's MemAvailable (/proc/meminfo is
    the node's: a 512 MiB pod on a 64 GiB node would otherwise allow 4 GiB of held requests, and be
    OOM-killed long before a cold request is told `queue_full`)."""
    candidates = [n for n in (_meminfo_available(meminfo), *map(_cgroup_limit, cgroup_limits)) if n]
    available = min(candidates) if candidates else 8 << 30
    return min(available // HELD_MEMORY_SHARE, HELD_MEMORY_MAX_MIB << 20)


def _meminfo_available(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 or None
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        limit = int(text)
    except (OSError, ValueError):  # absent, or "max" (cgroup v2: no limit)
        return None
    return limit if 0 < limit < 1 << 60 else None


def check_concurrency(args: argparse.Namespace) -> str | None:
    """Why the concurrency flags are unusable (one line), or None."""
    if args.connections < 1:
        return f"--connections must be >= 1, got {args.connections}"
    if args.header_timeout < 1:
        return f"--header-timeout must be >= 1, got {args.header_timeout}"
    if args.max_held_mib is not None and args.max_held_mib < 1:
        return f"--max-held-mib must be >= 1, got {args.max_held_mib}"
    return None


def _fail(message: str) -> int:
    print(f"ibc proxy: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from proxy.settings import ProxySettings, SettingsError, load_api_keys

    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        return _fail(f"--kubeconfig {args.kubeconfig}: no such file")
    if not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _fail("not running in a cluster: give --kubeconfig FILE (or set KUBECONFIG)")
    if args.threads < 1:
        return _fail(f"--threads must be >= 1, got {args.threads}")
    if problem := check_concurrency(args):
        return _fail(problem)
    max_held, max_held_bytes = held_limits(args, args.threads)
    try:
        keys = load_api_keys(args.api_key_file) if args.api_key_file else frozenset()
        settings = ProxySettings(
            api_key_digests=keys,
            max_body_bytes=args.max_body_bytes,
            cold_start_timeout_seconds=args.cold_start_timeout,
            queue_size=args.queue_size,
            read_timeout_seconds=args.upstream_timeout,
            max_held_requests=max_held,
            max_held_bytes=max_held_bytes,
            body_timeout_seconds=args.body_timeout,
            routing=args.routing,
            prefix_imbalance=args.prefix_imbalance,
            prefix_max_in_flight=args.prefix_max_in_flight,
            max_connections=upstream_pool_size(args),
        )
    except SettingsError as exc:
        return _fail(str(exc))
    kubeconfig, namespace = args.kubeconfig, args.namespace

    def factory() -> Any:
        from kubeview import load_api_client
        from proxy.app import create_app, proxy_of
        from proxy.kube_scaler import DEFAULT_REQUEST_TIMEOUT_SECONDS, KubeScaler
        from serving.stopping import on_stop_signals

        # A scale PATCH must end well before the held request that asked for it gives up.
        timeout = min(DEFAULT_REQUEST_TIMEOUT_SECONDS, settings.cold_start_timeout_seconds / 2)
        api = load_api_client(kubeconfig)
        scaler = KubeScaler(api, namespace=namespace, request_timeout_seconds=timeout).start()
        atexit.register(scaler.stop)  # the last lastRequestTime writes when the worker exits
        if not scaler.cache.wait_synced(SYNC_TIMEOUT_SECONDS):
            log.warning("watch cache not synced after %.0fs; /readyz answers 503 until it is", SYNC_TIMEOUT_SECONDS)
        app = create_app(settings, scaler)
        # SIGTERM: every held request gets its 503 now, not a dropped connection when the worker exits.
        on_stop_signals(proxy_of(app).shutdown)
        # A full garbage collection scans every object: with the kubernetes client loaded that is ~60k
        # objects and ~60 ms during which no request moves. Objects from imports and start-up live as
        # long as the worker: keep them out of every later collection.
        gc.collect()
        gc.freeze()
        return app

    return serve(
        factory,
        name="proxy",
        worker_class=args.worker_class,
        worker_connections=args.connections,
        header_timeout=args.header_timeout,
        header_timeout_answer=header_timeout_answer(args.header_timeout),
        **server_options(args),
    )
