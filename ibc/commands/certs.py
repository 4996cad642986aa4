"""`ibc certs`: make the TLS certificates the webhook and extender serve, locally or in the cluster.

`generate` writes a CA and a serving pair to a directory (local runs, tests, or to load into a Secret
by hand). `bootstrap` is for clusters without cert-manager: it keeps the pair in a Secret, rotates it
before it expires and sets the caBundle of the ValidatingWebhookConfiguration (see certs.bootstrap).
"""

from __future__ import annotations

import argparse
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from certs.errors import BootstrapError, CertFileError, InvalidInput
from certs.generate import DEFAULT_DAYS, KEY_TYPES, describe, generate_serving_certificate, write_files

_EPILOG_GENERATE = """\
example:
  ibc certs generate --service ibc-webhook --namespace ibc-system --out ./tls --ip 127.0.0.1
  writes ./tls/ca.crt, ./tls/tls.crt and ./tls/tls.key (0600); serve them with
  `ibc webhook --tls-cert ./tls/tls.crt --tls-key ./tls/tls.key` and give ca.crt to the caller.
"""

_EPILOG_BOOTSTRAP = """\
Run it as an init container of the webhook (and, with --interval, as a sidecar so a renewal happens
without a restart: the server reloads the mounted Secret or the --out files by itself).
Needs RBAC: secrets get/create/update in the namespace; validatingwebhookconfigurations get/patch.
Exit status: 0 done, 1 the API server refused or failed a step, 2 bad flags.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate or bootstrap the TLS certificates of the webhook and the extender. "
        "Prefer cert-manager where it is installed (see docs/certificates.md)."
    )
    actions = parser.add_subparsers(dest="certs_action", metavar="<action>")

    gen = actions.add_parser(
        "generate",
        help="write a CA and a serving certificate to a directory",
        description="Create a CA and a serving certificate for a Service and write ca.crt, tls.crt, tls.key.",
        epilog=_EPILOG_GENERATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_identity_arguments(gen)
    gen.add_argument("--out", required=True, metavar="DIR", help="directory for ca.crt, tls.crt, tls.key")

    boot = actions.add_parser(
        "bootstrap",
        help="keep the pair in a Secret and the CA in the webhook's caBundle (no cert-manager)",
        description=(
            "Read the TLS Secret, create it if absent, rotate it when it expires within\n"
            "--renew-before-days or lacks a SAN, and set webhooks[*].clientConfig.caBundle\n"
            "of each --webhook-config to its ca.crt."
        ),
        epilog=_EPILOG_BOOTSTRAP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_identity_arguments(boot)
    boot.add_argument(
        "--secret",
        required=True,
        metavar="NAME",
        help="the kubernetes.io/tls Secret (in --namespace) holding tls.crt, tls.key, ca.crt",
    )
    boot.add_argument(
        "--webhook-config",
        action="append",
        default=[],
        metavar="NAME",
        help="ValidatingWebhookConfiguration whose caBundle to set (repeatable)",
    )
    boot.add_argument("--out", metavar="DIR", help="also write ca.crt, tls.crt, tls.key here for the server")
    boot.add_argument(
        "--renew-before-days",
        type=int,
        default=30,
        metavar="D",
        help="rotate when the certificate ends within D days (default 30)",
    )
    boot.add_argument(
        "--interval",
        type=float,
        default=0,
        metavar="SECONDS",
        help="keep running and check again every SECONDS (sidecar mode; default: once)",
    )
    boot.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: the in-cluster service account)")


def _add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, metavar="S", help="Service name the callers dial")
    parser.add_argument("--namespace", required=True, metavar="N", help="namespace of the Service")
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS SAN besides S, S.N, S.N.svc, S.N.svc.cluster.local (repeatable)",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="IP SAN, e.g. 127.0.0.1 for a local control plane (repeatable)",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        metavar="D",
        help=f"validity of the serving certificate in days (default {DEFAULT_DAYS}; "
        "the CA lasts ten years, or D days if longer)",
    )
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa", help="ECDSA P-256 (default) or RSA 2048")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "certs_action", None)
    if action == "generate":
        return _generate(args)
    if action == "bootstrap":
        return _bootstrap(args)
    print("ibc certs: choose an action: generate or bootstrap (see `ibc certs --help`)", file=sys.stderr)
    return 2


def _generate(args: argparse.Namespace) -> int:
    try:
        bundle = generate_serving_certificate(
            args.service,
            args.namespace,
            extra_dns=args.dns,
            ip_addresses=args.ip,
            days=args.days,
            key_type=args.key_type,
        )
    except InvalidInput as exc:
        return _fail("generate", exc, 2)
    try:
        paths = write_files(bundle, args.out)
    except CertFileError as exc:
        return _fail("generate", exc, 1)
    print(f"wrote {paths.ca}, {paths.cert}, {paths.key}: {describe(bundle)}")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from certs.bootstrap import BootstrapSettings, bootstrap, bootstrap_forever

    try:
        if args.renew_before_days < 0:
            raise InvalidInput(f"--renew-before-days must be >= 0, not {args.renew_before_days}")
        if args.interval < 0:
            raise InvalidInput(f"--interval must be >= 0, not {args.interval}")
        if args.days < 1:
            raise InvalidInput(f"--days must be >= 1, not {args.days}")
        settings = BootstrapSettings(
            service=args.service,
            namespace=args.namespace,
            secret_name=args.secret,
            webhook_configs=tuple(args.webhook_config),
            extra_dns=tuple(args.dns),
            ip_addresses=tuple(args.ip),
            days=args.days,
            renew_before=timedelta(days=args.renew_before_days),
            key_type=args.key_type,
            out_dir=Path(args.out) if args.out else None,
        )
    except InvalidInput as exc:
        return _fail("bootstrap", exc, 2)
    try:
        api_client = _api_client(args.kubeconfig)
    except InvalidInput as exc:
        return _fail("bootstrap", exc, 2)
    except BootstrapError as exc:
        return _fail("bootstrap", exc, 1)
    with api_client:
        if args.interval > 0:
            bootstrap_forever(api_client, settings, interval_seconds=args.interval, stop=threading.Event())
            return 0
        try:
            result = bootstrap(api_client, settings)
        except (BootstrapError, CertFileError) as exc:
            return _fail("bootstrap", exc, 1)
    print(result.summary(settings))
    return 0


def _api_client(kubeconfig: str | None) -> Any:
    """An ApiClient from `kubeconfig`, or from the pod's service account when None."""
    from kubernetes.config.config_exception import ConfigException

    from kubeview import load_api_client

    try:
        if kubeconfig and not Path(kubeconfig).is_file():
            raise InvalidInput(f"--kubeconfig {kubeconfig}: no such file")
        return load_api_client(kubeconfig)
    except ConfigException as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account (or pass --kubeconfig)"
        raise BootstrapError(f"cannot load {where}: {exc}") from exc


def _fail(action: str, exc: Exception, code: int) -> int:
    print(f"ibc certs {action}: {exc}", file=sys.stderr)
    return code
