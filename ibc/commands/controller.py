"""`ibc controller`: reconcile InferenceModels into Deployments, scale idle models to zero, advise on memory.

Runs until SIGTERM/SIGINT. With --leader-elect, several replicas may run and one acts (a Lease);
without it, exactly one replica must run. Exit 0 on a clean stop, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Reconcile each InferenceModel into a Deployment and Service (or adopt its deploymentRef), scale "
        "models with no request for cooldownPeriod to zero, and keep status, conditions, Events and "
        "observed-memory advice up to date."
    )
    parser.epilog = (
        "Example: ibc controller --kubeconfig ~/.kube/config --leader-elect --observed-memory prometheus "
        "--prometheus-url http://prometheus.monitoring:9090"
    )
    parser.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: in-cluster config)")
    parser.add_argument("--namespace", metavar="NS", help="watch only this namespace (default: all)")
    parser.add_argument("--leader-elect", action="store_true", help="elect a leader among replicas on a Lease")
    parser.add_argument(
        "--lease-name", default="inference-budget-controller", metavar="N", help="Lease name (default %(default)s)"
    )
    parser.add_argument(
        "--lease-namespace", default="", metavar="NS", help="Lease namespace (default: the pod's own, else default)"
    )
    parser.add_argument(
        "--lease-duration-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="how long a silent leader keeps the Lease (default %(default)g)",
    )
    parser.add_argument(
        "--lease-renew-seconds",
        type=float,
        default=2.0,
        metavar="S",
        help="how often the leader renews (default %(default)g)",
    )
    parser.add_argument(
        "--metrics-bind",
        default="0.0.0.0:8080",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz and /models/{name}/metrics here ('' to disable; default %(default)s)",
    )
    parser.add_argument(
        "--observed-memory",
        choices=["none", "prometheus", "metrics-api"],
        default="none",
        help="where observed memory comes from (advice only; default %(default)s)",
    )
    parser.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="Prometheus base URL, e.g. http://prometheus:9090 (no default: needed with --observed-memory prometheus)",
    )
    parser.add_argument(
        "--prometheus-query",
        metavar="TEMPLATE",
        help="PromQL returning bytes used by one pod; {namespace}, {pod}, {model} are filled in "
        "(default: DCGM framebuffer used, MiB x 1048576)",
    )
    parser.add_argument(
        "--observe-interval-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="how often to measure memory (default %(default)g)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="re-check every model this often without events (default %(default)g)",
    )
    parser.add_argument(
        "--headroom-percent",
        type=float,
        default=4.0,
        metavar="P",
        help="margin above the observed peak in recommendations (default %(default)g)",
    )
    parser.add_argument(
        "--scheduler-name",
        default="inference-budget-scheduler",
        help="schedulerName given to model pods (default %(default)s)",
    )
    parser.add_argument(
        "--load-interval-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="how often the leader reads the /metrics of the pods of models with maxReplicas > 1 and steps "
        "spec.replicas by one through /scale (the load layer; 0 turns it off; default %(default)g)",
    )
    parser.add_argument(
        "--proxy-metrics-url",
        action="append",
        metavar="URL",
        help="a proxy replica's base URL (repeat for each): its /metrics counts requests in flight per model "
        "replica, the load signal for backends without vLLM metrics (with spec.load.concurrency; default: none)",
    )
    parser.add_argument("--workers", type=int, default=2, help="reconcile threads (default %(default)s)")


def _fail(message: str) -> int:
    print(f"ibc controller: {message}", file=sys.stderr)
    return 2


def settings_from_args(args: argparse.Namespace) -> Any:
    """Flags -> ControllerSettings; raises ValueError with a one-line message on bad input."""
    from controller.leader import LeaseTimings
    from controller.observe import DEFAULT_PROMETHEUS_QUERY, check_query_template
    from controller.settings import (
        ControllerSettings,
        LeaderSettings,
        LoadSettings,
        ObserveSettings,
        ReconcileSettings,
    )
    from serving.bind import parse_bind

    if args.metrics_bind:
        parse_bind(args.metrics_bind)
    if args.observed_memory == "prometheus" and not args.prometheus_url:
        raise ValueError("--observed-memory prometheus needs --prometheus-url")
    if args.prometheus_url and not args.prometheus_url.startswith(("http://", "https://")):
        raise ValueError(f"--prometheus-url {args.prometheus_url!r} must start with http:// or https://")
    query = args.prometheus_query or DEFAULT_PROMETHEUS_QUERY
    check_query_template(query)
    if not 0 <= args.headroom_percent <= 100:
        raise ValueError(f"--headroom-percent must be within 0..100, got {args.headroom_percent}")
    for flag in ("resync_seconds", "observe_interval_seconds"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0")
    for url in args.proxy_metrics_url or []:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--proxy-metrics-url {url!r} must start with http:// or https://")
    if not 0 <= args.load_interval_seconds <= 3600:
        raise ValueError(f"--load-interval-seconds must be within 0..3600, got {args.load_interval_seconds}")
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    renew = args.lease_renew_seconds
    duration = args.lease_duration_seconds
    try:
        timings = LeaseTimings(duration, max(renew * 1.5, duration * 0.7), renew)
    except ValueError as exc:
        raise ValueError(f"--lease-duration-seconds/--lease-renew-seconds: {exc}") from exc
    if not args.scheduler_name:
        raise ValueError("--scheduler-name must not be empty")
    return ControllerSettings(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace or None,
        metrics_bind=args.metrics_bind,
        workers=args.workers,
        reconcile=ReconcileSettings(
            scheduler_name=args.scheduler_name,
            headroom_percent=args.headroom_percent,
            resync_seconds=args.resync_seconds,
        ),
        observe=ObserveSettings(
            source=args.observed_memory,
            prometheus_url=args.prometheus_url or "",
            prometheus_query=query,
            interval_seconds=args.observe_interval_seconds,
        ),
        leader=LeaderSettings(
            enabled=args.leader_elect,
            lease_name=args.lease_name,
            lease_namespace=args.lease_namespace,
            timings=timings,
        ),
        load=LoadSettings(
            interval_seconds=args.load_interval_seconds, proxy_metrics_urls=tuple(args.proxy_metrics_url or [])
        ),
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        return _fail(str(exc))
    from controller.manager import Controller

    try:
        controller = Controller(settings)
    except Exception as exc:  # kubeconfig missing/unreadable, not in a cluster
        return _fail(f"cannot reach the cluster configuration: {exc}")

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        controller.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        return controller.run()
    except OSError as exc:  # e.g. the metrics port is taken
        return _fail(str(exc))
