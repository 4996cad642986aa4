"""`ibc webhook`: the validating admission webhook for InferenceModels and model Deployments.

The kube-apiserver calls it over HTTPS before storing a create, update or `/scale` of a model workload;
it answers with the budget's decision and explanation. Live (`--kubeconfig` or in-cluster) it watches
the cluster and commits admitted demand to a shared ConfigMap ledger, so any number of workers and
replicas stay race-free. Offline (`--cluster-state FILE`) it decides on a snapshot with an in-process
lock: one worker only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from budget import BudgetError
from budget.snapshot import load_snapshot
from serving.runner import add_server_arguments, serve, server_options

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "ibc-system"
# Apply order: a Pod's memory may fall back to its model's, so models go before pods.
KIND_ORDER = {"ResourceSlice": 0, "Node": 0, "InferenceModel": 1, "Deployment": 2, "Pod": 3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Validating admission webhook: refuses creates, updates and scale-ups of InferenceModels and model "
        "Deployments that do not fit the memory budget, with the same explanation as the proxy's 429. "
        "Serves POST /validate (AdmissionReview v1), GET /livez, /readyz and /metrics."
    )
    parser.epilog = (
        "Examples:\n"
        "  ibc webhook --bind 0.0.0.0:8443 --tls-cert /tls/tls.crt --tls-key /tls/tls.key   # in-cluster\n"
        "  ibc webhook --bind 127.0.0.1:8443 --tls-cert c.pem --tls-key k.pem --kubeconfig ~/.kube/config\n"
        "  ibc webhook --bind 127.0.0.1:8443 --cluster-state examples/seed-scenario.yaml    # offline"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_server_arguments(parser, default_bind="0.0.0.0:8443", default_workers=1, default_threads=8)
    source = parser.add_argument_group("cluster view (one of; in-cluster config when neither is given)")
    exclusive = source.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--cluster-state",
        metavar="FILE",
        help="decide on a snapshot YAML, offline, with an in-process lock (one worker)",
    )
    exclusive.add_argument("--kubeconfig", metavar="FILE", help="watch the cluster of this kubeconfig")
    ledger = parser.add_argument_group("admission")
    ledger.add_argument(
        "--ledger-namespace",
        metavar="NS",
        help="namespace of the ledger ConfigMap (default: $POD_NAMESPACE, the service "
        f"account's namespace, else {DEFAULT_NAMESPACE})",
    )
    ledger.add_argument(
        "--ledger-name",
        default="ibc-admission-ledger",
        metavar="NAME",
        help="name of the ledger ConfigMap (default ibc-admission-ledger)",
    )
    ledger.add_argument(
        "--ledger-ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long an admitted scale-up is reserved if it never shows up (default 60)",
    )
    ledger.add_argument(
        "--deny-code",
        type=int,
        choices=(403, 429),
        default=403,
        help="HTTP status of a denial: 403 Forbidden (default) or 429 TooManyRequests",
    )
    ledger.add_argument(
        "--warn-over-percent",
        type=float,
        default=20.0,
        metavar="PERCENT",
        help="warn when declared memory exceeds the observed peak by more (default 20)",
    )


def _fail(message: str) -> int:
    print(f"ibc webhook: {message}", file=sys.stderr)
    return 2


def default_namespace() -> str:
    """The webhook's own namespace: $POD_NAMESPACE, else the mounted service account's, else ibc-system."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or DEFAULT_NAMESPACE
    except OSError:
        return DEFAULT_NAMESPACE


def snapshot_cache(objects: tuple[dict[str, Any], ...]) -> Any:
    """A ClusterCache filled from snapshot objects (no API client, nothing to sync)."""
    from kubeview import ClusterCache

    cache = ClusterCache(None)  # type: ignore[arg-type]  # never started: no client needed
    for obj in sorted(objects, key=lambda o: KIND_ORDER.get(str(o.get("kind")), 9)):
        kind = obj.get("kind")
        if kind in KIND_ORDER:
            cache.apply(str(kind), "ADDED", dict(obj))
    return cache


def run(args: argparse.Namespace) -> int:
    from webhook import WebhookSettings

    try:
        settings = WebhookSettings(
            deny_code=args.deny_code,
            ledger_namespace=args.ledger_namespace or default_namespace(),
            ledger_name=args.ledger_name,
            ledger_ttl_seconds=args.ledger_ttl,
            warn_over_ratio=args.warn_over_percent / 100,
            require_synced=not args.cluster_state,
        )
    except ValueError as exc:
        return _fail(str(exc))
    options = server_options(args)
    if not args.tls_cert:
        log.warning("serving plain HTTP: the kube-apiserver only calls webhooks over HTTPS (--tls-cert/--tls-key)")

    if args.cluster_state:
        try:
            snapshot = load_snapshot(args.cluster_state)
        except BudgetError as exc:
            return _fail(str(exc))
        if options["workers"] > 1:
            return _fail(
                f"--workers {options['workers']} with --cluster-state: offline admissions are serialized by an "
                "in-process lock, which several workers would not share; run one worker and scale with --threads"
            )
        log.info("offline mode: %s; admissions serialized by an in-process lock (one process)", args.cluster_state)

        def offline_factory() -> Any:
            from webhook import LocalLedger, create_app

            ledger = LocalLedger(ttl_seconds=settings.ledger_ttl_seconds)
            return create_app(settings, snapshot_cache(snapshot.objects), ledger)

        return serve(offline_factory, name="webhook", **options)

    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        return _fail(f"--kubeconfig {args.kubeconfig}: no such file")
    if not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return _fail("not running in a cluster: give --kubeconfig FILE (live) or --cluster-state FILE (offline)")
    log.info(
        "live mode: ledger ConfigMap %s/%s (optimistic concurrency, shared by every worker and replica)",
        settings.ledger_namespace,
        settings.ledger_name,
    )

    def live_factory() -> Any:
        # Runs in each worker after the fork: clients and watch threads are never shared.
        from kubeview import load_api_client
        from webhook import create_app
        from webhook.kube import ApiLookup, ConfigMapLedger, webhook_cache

        api = load_api_client(args.kubeconfig)
        cache = webhook_cache(api).start()
        if not cache.wait_synced(timeout=10):
            log.warning("cluster view not synced after 10 s; denying scale-ups with 'retry' until it is")
        ledger = ConfigMapLedger(
            api,
            settings.ledger_namespace,
            settings.ledger_name,
            ttl_seconds=settings.ledger_ttl_seconds,
            prune_grace_seconds=settings.ledger_prune_grace_seconds,
            max_attempts=settings.ledger_max_attempts,
            deadline_seconds=settings.ledger_deadline_seconds,
        )
        return create_app(settings, cache, ledger, lookup=ApiLookup(cache, api))

    return serve(live_factory, name="webhook", **options)
