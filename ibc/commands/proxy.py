"""`ibc proxy`: the OpenAI-compatible front door in a cluster (the request path with the Kubernetes scaler).

Each gunicorn worker builds its own app after the fork: its own watch cache of InferenceModels, model
pods and nodes, its own keep-alive pool to the backends. Held requests (cold starts) occupy a thread
each, so the worker keeps some threads for warm models: at most `threads - 16` requests (and at most
`--queue-size` per model) wait at once in one worker; beyond that a cold request gets 503 `queue_full`.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

from serving.runner import add_server_arguments, serve, server_options

log = logging.getLogger(__name__)

DEFAULT_BIND = "0.0.0.0:8080"
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 64
# Threads of a worker never given to held requests, so warm models are served during a cold-start burst.
RESERVED_THREADS = 16
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
        "--queue-size", type=int, default=256, metavar="N", help="requests held per starting model (default 256)"
    )
    group.add_argument(
        "--upstream-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="longest silence from a backend while it answers (default 600)",
    )


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
    try:
        keys = load_api_keys(args.api_key_file) if args.api_key_file else frozenset()
        settings = ProxySettings(
            api_key_digests=keys,
            max_body_bytes=args.max_body_bytes,
            cold_start_timeout_seconds=args.cold_start_timeout,
            queue_size=args.queue_size,
            read_timeout_seconds=args.upstream_timeout,
            max_held_requests=max(1, args.threads - RESERVED_THREADS) if args.threads > RESERVED_THREADS else 1,
        )
    except SettingsError as exc:
        return _fail(str(exc))
    kubeconfig, namespace = args.kubeconfig, args.namespace

    def factory() -> Any:
        from kubeview import load_api_client
        from proxy.app import create_app
        from proxy.kube_scaler import KubeScaler

        scaler = KubeScaler(load_api_client(kubeconfig), namespace=namespace).start()
        atexit.register(scaler.stop)  # the last lastRequestTime writes when the worker exits
        if not scaler.cache.wait_synced(SYNC_TIMEOUT_SECONDS):
            log.warning("watch cache not synced after %.0fs; /readyz answers 503 until it is", SYNC_TIMEOUT_SECONDS)
        app = create_app(settings, scaler)
        # A full garbage collection scans every object: with the kubernetes client loaded that is ~60k
        # objects and ~60 ms during which no request moves. Objects from imports and start-up live as
        # long as the worker: keep them out of every later collection.
        gc.collect()
        gc.freeze()
        return app

    return serve(factory, name="proxy", **server_options(args))
