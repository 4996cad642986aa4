"""`ibc extender`: the kube-scheduler extender that places model pods by the inference memory budget.

A second kube-scheduler (deploy/scheduler/) calls `POST /filter`, `/prioritize` and `/bind` over HTTPS.
The reservation book that stops two pods from being promised the same memory lives in the serving
process, so the extender runs ONE gunicorn worker with N threads: several workers would each hold a
different book and could promise the same hole twice. `--workers` above 1 is refused unless
`--no-reservations` says that risk is accepted. Exit 0 after a clean shutdown, 1 if the server fails,
2 on bad input.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

from budget import BudgetError
from serving.runner import add_server_arguments, serve, server_options

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "kube-scheduler extender: filters and scores nodes for model pods by their inference memory budget, "
        "reserves the memory it promises, and binds pods. Serves POST /filter, /prioritize, /bind, "
        "GET /livez, /readyz (ready once the cluster view is synced) and /metrics."
    )
    parser.epilog = (
        "Examples:\n"
        "  ibc extender --bind 0.0.0.0:8443 --tls-cert /tls/tls.crt --tls-key /tls/tls.key     # in-cluster\n"
        "  ibc extender --bind 127.0.0.1:8443 --tls-cert c.pem --tls-key k.pem --kubeconfig kubeconfig\n"
        "  ibc extender --bind 127.0.0.1:8080 --cluster-state examples/seed-scenario.yaml --no-bind  # offline\n"
        "One worker holds the reservation book: scale with --threads, not --workers (see docs/extender.md)."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_server_arguments(parser, default_bind="0.0.0.0:8443", default_workers=1, default_threads=8)
    source = parser.add_argument_group("cluster view (one of; in-cluster config when neither is given)")
    exclusive = source.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--cluster-state",
        metavar="FILE",
        help="decide on a snapshot YAML, offline (binding is impossible: use --no-bind)",
    )
    exclusive.add_argument("--kubeconfig", metavar="FILE", help="list+watch the cluster of this kubeconfig")
    decide = parser.add_argument_group("decisions")
    binding = decide.add_mutually_exclusive_group()
    binding.add_argument(
        "--bind-pods",
        dest="bind_pods",
        action="store_true",
        default=True,
        help="answer bindVerb: re-check the fit, reserve, POST the Binding (default)",
    )
    binding.add_argument(
        "--no-bind",
        dest="bind_pods",
        action="store_false",
        help="refuse bind calls (the scheduler's default binder binds; drop bindVerb)",
    )
    decide.add_argument(
        "--reservation-ttl",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long memory promised at filter/bind time is held if the pod is never seen bound (default 30)",
    )
    decide.add_argument(
        "--no-reservations",
        dest="reservations",
        action="store_false",
        default=True,
        help="do not reserve at filter time (required for --workers > 1; pods scheduled "
        "back to back may then be promised the same memory)",
    )
    decide.add_argument(
        "--score",
        choices=("spread", "binpack"),
        default="spread",
        help="spread: prefer the node left emptiest (default); binpack: the fullest",
    )
    decide.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 * 2**20,
        metavar="BYTES",
        help="largest request body accepted (default 64 MiB; the Nodes form is large)",
    )


def _tune_runtime() -> None:
    """Keep filter latency low in a process that also binds and watches.

    The synced cache's objects (thousands of Node dicts) move out of the cyclic GC's reach: a filter
    call allocates a verdict per node, and the collections that triggers would otherwise keep
    re-scanning the whole cache (latency spikes at thousands of nodes). The cache's JSON has no
    reference cycles, so frozen objects are still freed by reference counting when dropped.
    """
    gc.collect()
    gc.freeze()
    # Filter calls are the scheduler's critical path; with bind calls and watch threads busy in the same
    # process, the default 5 ms GIL switch interval adds up to 5 ms of waiting to a 1-2 ms filter.
    sys.setswitchinterval(0.0005)


def _fail(message: str) -> int:
    print(f"ibc extender: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from extender import CacheSource, Settings

    if args.reservation_ttl <= 0:
        return _fail(f"--reservation-ttl must be > 0 seconds, got {args.reservation_ttl}")
    if args.max_request_bytes <= 0:
        return _fail(f"--max-request-bytes must be > 0, got {args.max_request_bytes}")
    try:
        settings = Settings(
            reservation_ttl_seconds=args.reservation_ttl,
            reservations=args.reservations,
            bind_pods=args.bind_pods,
            score_strategy=args.score,
            max_request_bytes=args.max_request_bytes,
        )
    except ValueError as exc:
        return _fail(str(exc))
    options = server_options(args)
    if options["workers"] > 1 and settings.reservations:
        return _fail(
            f"--workers {options['workers']} would give each worker its own reservation book, so pods "
            "filtered by different workers could be promised the same memory; run one worker and scale "
            "with --threads N, or add --no-reservations to accept that risk"
        )
    if not args.tls_cert:
        log.warning("serving plain HTTP: the scheduler config in deploy/scheduler uses enableHTTPS")

    if args.cluster_state:
        try:
            offline = CacheSource.from_snapshot(args.cluster_state)
        except BudgetError as exc:
            return _fail(str(exc))
        if settings.bind_pods:
            log.warning("offline mode (--cluster-state): bind calls will be answered with an error; use --no-bind")
        log.info("offline mode: deciding on %s", args.cluster_state)

        def offline_factory() -> Any:
            from extender import create_app

            _tune_runtime()
            return create_app(settings, offline)

        return serve(offline_factory, name="extender", **options)

    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        return _fail(f"--kubeconfig {args.kubeconfig}: no such file")
    if not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _fail("not running in a cluster: give --kubeconfig FILE (live) or --cluster-state FILE (offline)")

    def live_factory() -> Any:
        # Runs in the worker after the fork: the API client and watch threads are never shared.
        from extender import create_app
        from extender.kube import cluster_source

        source = cluster_source(args.kubeconfig)
        if not source.cache.wait_synced(timeout=10):
            log.warning("cluster view not synced after 10 s; /readyz stays 503 and filter answers an error")
        _tune_runtime()
        return create_app(settings, source)

    log.info(
        "live mode: 1 worker x %d threads, reservations %s (ttl %ss), bind %s, score %s",
        options["threads"],
        "on" if settings.reservations else "OFF",
        settings.reservation_ttl_seconds,
        "on" if settings.bind_pods else "off",
        settings.score_strategy,
    )
    return serve(live_factory, name="extender", **options)
