"""Keep the serving certificate in a Secret and its CA in the webhook's caBundle, without cert-manager.

On clusters that have cert-manager, use it (deploy/cert-manager/, docs/certificates.md). Elsewhere every
webhook or extender replica runs this before serving (init container) and, optionally, periodically
(`ibc certs bootstrap --interval`):

1. Read Secret `namespace/secret_name` (`kubernetes.io/tls`: `tls.crt`, `tls.key`, `ca.crt`, and
   `ca.key`, the key of the first CA in `ca.crt`).
2. Absent: generate a CA and serving pair and create it. 409 means another replica created it first:
   read and use theirs, so every replica serves the same pair.
3. Present but broken, expiring within `renew_before` or missing a wanted SAN: replace the pair. If the
   stored CA key is there and the CA outlives a new certificate by `renew_before`, *renew*: a new leaf
   under the same CA, so `ca.crt` and every client's trust stay as they are. Otherwise *rotate*: a new
   CA; the caBundle is first widened to trust it (the old leaf is still served until the kubelet
   refreshes the mounted Secret), and the Secret's `ca.crt` becomes new CA + old CA. The write carries
   the resourceVersion read in step 1: a 409 means a peer replaced it first, and its pair is used.
4. Set `webhooks[*].clientConfig.caBundle` of each named ValidatingWebhookConfiguration to the Secret's
   `ca.crt`, with a JSON patch, only where it differs.
5. Optionally write `ca.crt`, `tls.crt`, `tls.key` (never `ca.key`) to a directory for a server.

Why `ca.key` sits in the Secret: whoever can read the Secret already holds the serving key, and the CA
is trusted only by this webhook's caBundle and the scheduler's extender config, so it grants nothing
more; without it every renewal would change the CA, and kube-scheduler, which reads its extender
`caFile` only at start, would stop trusting the extender once a year.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.errors import BootstrapError, CertFileError, InvalidInput
from certs.generate import (
    DEFAULT_DAYS,
    CertPaths,
    KeyType,
    TLSBundle,
    describe,
    generate_serving_certificate,
    parse_ip_addresses,
    renew_serving_certificate,
    rotation_reason,
    service_dns_names,
    write_files,
)
from kubeview.api import SECRETS, VALIDATING_WEBHOOK_CONFIGURATIONS, ApiError, Kube

log = logging.getLogger(__name__)

SECRET_TYPE = "kubernetes.io/tls"
# Labels make the Secret findable (`kubectl get secret -l app.kubernetes.io/managed-by=ibc`).
_LABELS = {"app.kubernetes.io/managed-by": "ibc", "app.kubernetes.io/component": "tls"}
_CERT_MANAGER_ANNOTATION = "cert-manager.io/certificate-name"
# A few seconds per call: the bootstrap runs in an init container, where a hung call blocks the pod.
_REQUEST_TIMEOUT_SECONDS = 15
_PATCH_ATTEMPTS = 3

SecretAction = Literal["created", "adopted", "unchanged", "renewed", "rotated", "rotated-by-peer"]


@dataclass(frozen=True)
class BootstrapSettings:
    """What to certify, where to keep it and whom to tell."""

    service: str
    namespace: str
    secret_name: str
    webhook_configs: tuple[str, ...] = ()
    extra_dns: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    # A year, renewed 30 days before it ends (cert-manager's default renews at 2/3 of the lifetime;
    # a month is ample time for every replica to pass a periodic bootstrap and a kubelet sync).
    days: int = DEFAULT_DAYS
    renew_before: timedelta = timedelta(days=30)
    key_type: KeyType = "ecdsa"
    out_dir: Path | None = None

    def __post_init__(self) -> None:
        service_dns_names(self.service, self.namespace, self.extra_dns)  # raises InvalidInput
        parse_ip_addresses(self.ip_addresses)
        if not self.secret_name:
            raise InvalidInput("secret name must not be empty")
        if any(not name for name in self.webhook_configs):
            raise InvalidInput("webhook configuration names must not be empty")
        if self.renew_before >= timedelta(days=self.days):
            raise InvalidInput(
                f"renew_before ({self.renew_before.days} days) must be shorter than the validity "
                f"({self.days} days), or every run would rotate"
            )


@dataclass(frozen=True)
class BootstrapResult:
    """What the bootstrap did; `bundle` is the pair every replica now serves."""

    secret_action: SecretAction
    reason: str | None
    bundle: TLSBundle
    patched_webhook_configs: tuple[str, ...] = ()
    paths: CertPaths | None = None
    warnings: tuple[str, ...] = field(default=())

    def summary(self, settings: BootstrapSettings) -> str:
        """One line for people."""
        what = f"secret {settings.namespace}/{settings.secret_name}: {self.secret_action}"
        if self.reason:
            what += f" ({self.reason})"
        what += f"; {describe(self.bundle)}"
        if self.patched_webhook_configs:
            what += f"; caBundle updated in {', '.join(self.patched_webhook_configs)}"
        if self.paths is not None:
            what += f"; files in {self.paths.directory}"
        return what


@dataclass(frozen=True)
class _StoredSecret:
    bundle: TLSBundle
    resource_version: str
    annotations: dict[str, str]


def bootstrap(api_client: Any, settings: BootstrapSettings, *, now: datetime | None = None) -> BootstrapResult:
    """Run steps 1-5 of the module docstring once. BootstrapError (one line) when the API refuses a
    step; CertFileError when the files cannot be written."""
    core = admission = Kube(api_client, timeout_seconds=_REQUEST_TIMEOUT_SECONDS)
    wanted_dns = service_dns_names(settings.service, settings.namespace, settings.extra_dns)
    wanted_ips = parse_ip_addresses(settings.ip_addresses)
    warnings: list[str] = []

    stored = _read_secret(core, settings)
    action: SecretAction
    if stored is None:
        reason: str | None = "absent"
        fresh = _generate(settings, previous_ca_pem=None, now=now)
        created = _create_secret(core, settings, fresh)
        if created is None:
            action, stored = "adopted", _require_secret(core, settings)
            reason = "created by another replica"
        else:
            action, stored = "created", created
    else:
        _refuse_cert_manager(stored, settings)
        reason = rotation_reason(
            stored.bundle, dns_names=wanted_dns, ip_addresses=wanted_ips, renew_before=settings.renew_before, now=now
        )
        if reason is None:
            action = "unchanged"
        else:
            renewing = _can_renew(stored.bundle, settings, now)
            log.info(
                "%s %s/%s: %s",
                "renewing" if renewing else "rotating the CA of",
                settings.namespace,
                settings.secret_name,
                reason,
            )
            if renewing:
                fresh = renew_serving_certificate(
                    stored.bundle,
                    settings.service,
                    settings.namespace,
                    extra_dns=settings.extra_dns,
                    ip_addresses=settings.ip_addresses,
                    days=settings.days,
                    key_type=settings.key_type,
                    now=now,
                )
            else:
                fresh = _generate(settings, previous_ca_pem=_previous_ca_pem(stored.bundle, now), now=now)
                # Trust the new CA before any server can present a certificate it signed.
                _publish_ca_bundle(admission, settings.webhook_configs, fresh.ca_pem, must_contain_only=False)
            replaced = _replace_secret(core, settings, stored, fresh)
            if replaced is None:
                action, stored = "rotated-by-peer", _require_secret(core, settings)
            else:
                action, stored = ("renewed" if renewing else "rotated"), replaced

    after = rotation_reason(
        stored.bundle, dns_names=wanted_dns, ip_addresses=wanted_ips, renew_before=timedelta(0), now=now
    )
    if after is not None:
        # Only a peer with other settings can get us here; serving its pair beats fighting over it.
        message = f"the stored pair still needs attention after {action}: {after}"
        log.warning(message)
        warnings.append(message)

    patched = _publish_ca_bundle(admission, settings.webhook_configs, stored.bundle.ca_pem, must_contain_only=True)
    paths = write_files(stored.bundle, settings.out_dir) if settings.out_dir is not None else None
    result = BootstrapResult(action, reason, stored.bundle, tuple(patched), paths, tuple(warnings))
    # A periodic run that changed nothing is not news.
    quiet = action == "unchanged" and not patched
    log.log(logging.DEBUG if quiet else logging.INFO, "%s", result.summary(settings))
    return result


def bootstrap_forever(
    api_client: Any,
    settings: BootstrapSettings,
    *,
    interval_seconds: float,
    stop: threading.Event | None = None,
) -> None:
    """Run `bootstrap` now and every `interval_seconds` until `stop` is set, logging failures and
    carrying on (sidecar mode: a failed run is retried, the pair in place keeps serving)."""
    stop = stop or threading.Event()
    while True:
        try:
            bootstrap(api_client, settings)
        except (BootstrapError, CertFileError) as exc:
            log.error("certificate bootstrap failed, retrying in %ss: %s", interval_seconds, exc)
        if stop.wait(interval_seconds):
            return


def _generate(settings: BootstrapSettings, *, previous_ca_pem: bytes | None, now: datetime | None) -> TLSBundle:
    return generate_serving_certificate(
        settings.service,
        settings.namespace,
        extra_dns=settings.extra_dns,
        ip_addresses=settings.ip_addresses,
        days=settings.days,
        key_type=settings.key_type,
        previous_ca_pem=previous_ca_pem,
        now=now,
    )


def _can_renew(bundle: TLSBundle, settings: BootstrapSettings, now: datetime | None) -> bool:
    """Whether a new leaf can be signed by the stored CA and still end before the CA's renewal window."""
    reusable = bundle.reusable_ca()
    if reusable is None:
        return False
    ca, _key = reusable
    moment = now if now is not None else datetime.now(ca.not_valid_after_utc.tzinfo)
    if ca.not_valid_before_utc > moment:
        return False
    return ca.not_valid_after_utc > moment + timedelta(days=settings.days) + settings.renew_before


def _previous_ca_pem(bundle: TLSBundle, now: datetime | None) -> bytes | None:
    """The CA that signed the pair being replaced, if it is still worth trusting for the switch-over."""
    try:
        ca = bundle.issuer_ca()
    except CertFileError:
        return None
    if ca is None:
        return None
    moment = now if now is not None else datetime.now(ca.not_valid_after_utc.tzinfo)
    if ca.not_valid_after_utc <= moment:
        return None
    return ca.public_bytes(serialization.Encoding.PEM)


def _secret_path(settings: BootstrapSettings, name: bool = True) -> str:
    return SECRETS.path(settings.namespace, settings.secret_name if name else None)


def _read_secret(kube: Kube, settings: BootstrapSettings) -> _StoredSecret | None:
    what = f"read Secret {settings.namespace}/{settings.secret_name}"
    try:
        secret = kube.get(_secret_path(settings))
    except ApiError as exc:
        raise _api_error(what, exc) from exc
    if secret is None:
        return None
    data = secret.get("data") or {}
    try:
        bundle = TLSBundle(
            ca_pem=_b64(data.get("ca.crt")),
            cert_pem=_b64(data.get("tls.crt")),
            key_pem=_b64(data.get("tls.key")),
            ca_key_pem=_b64(data.get("ca.key")) or None,
        )
    except (binascii.Error, ValueError):
        bundle = TLSBundle(b"", b"", b"")  # rotation_reason reports it as unparsable
    meta = secret.get("metadata") or {}
    return _StoredSecret(bundle, _resource_version(secret), dict(meta.get("annotations") or {}))


def _require_secret(kube: Kube, settings: BootstrapSettings) -> _StoredSecret:
    stored = _read_secret(kube, settings)
    if stored is None:
        raise BootstrapError(
            f"Secret {settings.namespace}/{settings.secret_name} was reported to exist (409) but is gone"
        )
    return stored


def _secret_body(
    settings: BootstrapSettings,
    bundle: TLSBundle,
    resource_version: str | None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": settings.secret_name, "namespace": settings.namespace, "labels": dict(_LABELS)}
    if annotations:
        metadata["annotations"] = annotations
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": SECRETS.api_version, "kind": SECRETS.kind, "metadata": metadata, "type": SECRET_TYPE,
            "data": _secret_data(bundle)}  # fmt: skip


def _secret_data(bundle: TLSBundle) -> dict[str, str]:
    data = {"ca.crt": bundle.ca_pem, "tls.crt": bundle.cert_pem, "tls.key": bundle.key_pem}
    if bundle.ca_key_pem:
        data["ca.key"] = bundle.ca_key_pem
    return {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}


def _create_secret(kube: Kube, settings: BootstrapSettings, bundle: TLSBundle) -> _StoredSecret | None:
    """Create the Secret; None if another replica created it first (409)."""
    try:
        created = kube.create(_secret_path(settings, name=False), _secret_body(settings, bundle, None))
    except ApiError as exc:
        if exc.status == 409:
            log.info("Secret %s/%s was created by another replica; using it", settings.namespace, settings.secret_name)
            return None
        raise _api_error(f"create Secret {settings.namespace}/{settings.secret_name}", exc) from exc
    return _StoredSecret(bundle, _resource_version(created), {})


def _replace_secret(
    kube: Kube, settings: BootstrapSettings, stored: _StoredSecret, bundle: TLSBundle
) -> _StoredSecret | None:
    """Replace the Secret if it is still the version we read; None if a peer changed it first (409)."""
    body = _secret_body(settings, bundle, stored.resource_version, stored.annotations)
    try:
        replaced = kube.replace(_secret_path(settings), body)
    except ApiError as exc:
        if exc.status == 409:
            log.info(
                "Secret %s/%s was rotated by another replica; using its pair", settings.namespace, settings.secret_name
            )
            return None
        raise _api_error(f"update Secret {settings.namespace}/{settings.secret_name}", exc) from exc
    return _StoredSecret(bundle, _resource_version(replaced), stored.annotations)


def _refuse_cert_manager(stored: _StoredSecret, settings: BootstrapSettings) -> None:
    certificate = stored.annotations.get(_CERT_MANAGER_ANNOTATION)
    if certificate:
        raise BootstrapError(
            f"Secret {settings.namespace}/{settings.secret_name} is issued by cert-manager (Certificate "
            f"{certificate}); let cert-manager renew it and inject the CA instead of `ibc certs bootstrap`"
        )


def _publish_ca_bundle(kube: Kube, names: Sequence[str], ca_pem: bytes, *, must_contain_only: bool) -> list[str]:
    """Make every webhook of each named configuration trust `ca_pem`; return the names patched.

    With `must_contain_only` the caBundle becomes exactly `ca_pem`; without, the CAs already trusted
    are kept after it (the widening step before a rotation).
    """
    patched = []
    for name in names:
        for attempt in range(1, _PATCH_ATTEMPTS + 1):
            config = _read_webhook_config(kube, name)
            ops = _ca_bundle_patch(config, ca_pem, must_contain_only=must_contain_only)
            if not ops:
                break
            try:
                kube.json_patch(VALIDATING_WEBHOOK_CONFIGURATIONS.path(name=name), ops)
            except ApiError as exc:
                # A failed `test` op (the webhook list changed under us) or a write conflict: read again.
                if exc.status in (409, 422, 500) and attempt < _PATCH_ATTEMPTS:
                    log.info("caBundle patch of %s raced another change (%s); retrying", name, exc.status)
                    continue
                raise _api_error(f"patch caBundle of ValidatingWebhookConfiguration {name}", exc) from exc
            patched.append(name)
            log.info("caBundle of ValidatingWebhookConfiguration %s set (%d webhooks)", name, len(ops) - 1)
            break
    return patched


def _read_webhook_config(kube: Kube, name: str) -> dict[str, Any]:
    try:
        return kube.request("GET", VALIDATING_WEBHOOK_CONFIGURATIONS.path(name=name))
    except ApiError as exc:
        raise _api_error(f"read ValidatingWebhookConfiguration {name}", exc) from exc


def _ca_bundle_patch(config: dict[str, Any], ca_pem: bytes, *, must_contain_only: bool) -> list[dict[str, Any]]:
    """JSON-patch operations setting each webhook's caBundle where it differs, guarded by a `test` of the
    resourceVersion read: a concurrent change makes the apiserver refuse (422) instead of us overwriting
    it with a bundle computed from an old state. Empty when nothing differs."""
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(config.get("webhooks") or []):
        current = _b64(((webhook or {}).get("clientConfig") or {}).get("caBundle") or "")
        desired = ca_pem if must_contain_only else _widen(ca_pem, current)
        if current == desired:
            continue
        ops.append(
            {
                "op": "add",
                "path": f"/webhooks/{index}/clientConfig/caBundle",
                "value": base64.b64encode(desired).decode("ascii"),
            }
        )
    if ops:
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": _resource_version(config)})
    return ops


def _widen(ca_pem: bytes, current: bytes) -> bytes:
    """`ca_pem` followed by the certificates of `current` it does not already hold."""
    try:
        have = x509.load_pem_x509_certificates(ca_pem) if ca_pem else []
        extra = x509.load_pem_x509_certificates(current) if current.strip() else []
    except ValueError:
        return ca_pem
    out = ca_pem if ca_pem.endswith(b"\n") else ca_pem + b"\n"
    for cert in extra:
        if cert not in have:
            out += cert.public_bytes(serialization.Encoding.PEM)
            have.append(cert)
    return out


def _resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _b64(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return base64.b64decode(value, validate=True)


def _api_error(what: str, exc: ApiError) -> BootstrapError:
    if exc.status == 0:
        return BootstrapError(f"cannot {what}: API server unreachable: {exc.message}")
    return BootstrapError(f"cannot {what}: HTTP {exc.status} {exc.reason}: {exc.message}")
