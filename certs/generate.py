"""Make the CA and the serving certificate the webhook and the extender present, and check existing ones.

kube-apiserver dials `https://<service>.<namespace>.svc:<port>` and verifies the chain against the
webhook's `caBundle`; Go's verifier ignores the Common Name, so the certificate must carry every name a
caller may use as a DNS SAN (and 127.0.0.1 as an IP SAN when a local control plane dials an address).

The CA lives long (ten years) and the serving certificate short (one year): renewing the leaf under the
same CA leaves `ca.crt`, the caBundle and kube-scheduler's `caFile` (read only at its start) untouched.
A new CA is made only when there is none to reuse, or when the old one nears its end; then clients
trust new + old until every server has switched (see certs.bootstrap).

Everything here is pure except `write_files`, which writes `ca.crt`, `tls.crt` and `tls.key` (0600)
atomically, so a server reloading from the directory never reads a half-written file. The CA key is
never written to that directory: a server needs only its own pair.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from budget.objects import rfc3339
from certs.errors import CertFileError, InvalidInput

log = logging.getLogger(__name__)

KeyType = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY_TYPES: tuple[KeyType, ...] = ("ecdsa", "rsa")

# A year: long enough that renewal is rare, short enough that a leaked key does not stay useful for long.
DEFAULT_DAYS = 365
# Ten years: the CA is what every client pins; changing it means a caBundle update and a scheduler restart.
DEFAULT_CA_DAYS = 3650
# Backdating covers clock skew between the machine that signs and the apiserver that verifies.
_BACKDATE = timedelta(minutes=5)
_MAX_DAYS = 36500
# X.509 limits a Common Name to 64 characters; SANs carry the real names, the CN is only for people.
_CN_MAX = 64
_ORGANIZATION = "inference-budget-controller"

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class TLSBundle:
    """The PEM blobs a server and its clients need, as stored in a `kubernetes.io/tls` Secret.

    `ca_pem` is what clients trust (`ca.crt`, the caBundle): one CA, or during a CA rotation the new CA
    followed by the previous one. `cert_pem`/`key_pem` are the serving pair (`tls.crt`, `tls.key`).
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    # The private key of the first CA in ca_pem, kept so a renewal can reuse the CA; None if unknown.
    ca_key_pem: bytes | None = field(default=None, repr=False)

    @cached_property
    def certificate(self) -> x509.Certificate:
        """The serving certificate (first certificate in `cert_pem`); CertFileError if unparsable."""
        return _load_certificates(self.cert_pem, CERT_FILE)[0]

    @cached_property
    def ca_certificates(self) -> tuple[x509.Certificate, ...]:
        """Every CA in `ca_pem`, newest first as written; CertFileError if unparsable."""
        return tuple(_load_certificates(self.ca_pem, CA_FILE))

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def dns_names(self) -> tuple[str, ...]:
        return tuple(_san(self.certificate).get_values_for_type(x509.DNSName))

    @property
    def ip_addresses(self) -> tuple[str, ...]:
        return tuple(str(ip) for ip in _san(self.certificate).get_values_for_type(x509.IPAddress))

    def issuer_ca(self) -> x509.Certificate | None:
        """The CA in `ca_pem` that signed the serving certificate, or None."""
        for ca in self.ca_certificates:
            if _issued_by(self.certificate, ca):
                return ca
        return None

    def reusable_ca(self) -> tuple[x509.Certificate, PrivateKey] | None:
        """The CA that signed the serving certificate with its private key, if `ca_key_pem` is that key."""
        if not self.ca_key_pem:
            return None
        try:
            ca = self.issuer_ca()
            key = _load_private_key(self.ca_key_pem)
        except CertFileError:
            return None
        if ca is None or ca != self.ca_certificates[0] or _public_der(key.public_key()) != _public_der(ca.public_key()):
            return None
        return ca, key


@dataclass(frozen=True)
class CertPaths:
    """Where `write_files` put the three PEM files."""

    directory: Path
    ca: Path
    cert: Path
    key: Path


def service_dns_names(service: str, namespace: str, extra_dns: Iterable[str] = ()) -> tuple[str, ...]:
    """The DNS SANs a Service is reached by in-cluster (`S`, `S.N`, `S.N.svc`, `S.N.svc.cluster.local`),
    then the validated extra names, without duplicates."""
    _check_label(service, "service")
    _check_label(namespace, "namespace")
    names = [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]
    for name in extra_dns:
        normalized = _check_dns_name(name)
        if normalized not in names:
            names.append(normalized)
    return tuple(names)


def parse_ip_addresses(values: Iterable[str]) -> tuple[str, ...]:
    """Validate IP addresses for IP SANs and return them in canonical text form, without duplicates."""
    out: list[str] = []
    for value in values:
        try:
            text = str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise InvalidInput(f"not an IP address: {value!r}") from None
        if text not in out:
            out.append(text)
    return tuple(out)


def generate_serving_certificate(
    service: str,
    namespace: str,
    *,
    extra_dns: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    ca_days: int | None = None,
    key_type: KeyType = "ecdsa",
    previous_ca_pem: bytes | None = None,
    now: datetime | None = None,
) -> TLSBundle:
    """Create a new CA and a serving certificate it signs, for Service `service` in `namespace`.

    The leaf is valid for `days`, the CA for `ca_days` (default: ten years, at least `days`).
    `previous_ca_pem`, if given, is appended to `ca_pem` so clients keep trusting the old chain during
    a CA rotation. The bundle carries the CA key (`ca_key_pem`) for later renewals. Raises InvalidInput
    for unusable names, addresses, validity or key type.
    """
    dns_names = service_dns_names(service, namespace, extra_dns)
    ips = parse_ip_addresses(ip_addresses)
    _check_days(days, "days")
    ca_days = max(days, DEFAULT_CA_DAYS) if ca_days is None else ca_days
    _check_days(ca_days, "ca_days")
    if ca_days < days:
        raise InvalidInput(f"the CA must outlive the certificate it signs: ca_days {ca_days} < days {days}")
    _check_key_type(key_type)
    now = _utc(now)

    ca_key = _new_key(key_type)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ibc CA for {service}.{namespace}"[:_CN_MAX]),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if previous_ca_pem:
        ca_pem += previous_ca_pem if previous_ca_pem.endswith(b"\n") else previous_ca_pem + b"\n"
    cert_pem, key_pem = _issue_leaf(ca_cert, ca_key, dns_names, ips, days, key_type, now)
    return TLSBundle(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, ca_key_pem=_private_pem(ca_key))


def renew_serving_certificate(
    bundle: TLSBundle,
    service: str,
    namespace: str,
    *,
    extra_dns: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    key_type: KeyType = "ecdsa",
    now: datetime | None = None,
) -> TLSBundle:
    """A new serving certificate and key signed by the CA of `bundle`; `ca_pem` stays as it is.

    InvalidInput if `bundle` has no usable CA key, or if the CA ends before the new certificate would
    (then make a new CA with generate_serving_certificate).
    """
    dns_names = service_dns_names(service, namespace, extra_dns)
    ips = parse_ip_addresses(ip_addresses)
    _check_days(days, "days")
    _check_key_type(key_type)
    now = _utc(now)
    reusable = bundle.reusable_ca()
    if reusable is None:
        raise InvalidInput("the bundle has no CA key matching the CA that signed its certificate")
    ca_cert, ca_key = reusable
    if ca_cert.not_valid_after_utc < now + timedelta(days=days):
        raise InvalidInput(f"the CA ends {rfc3339(ca_cert.not_valid_after_utc)}, before a {days}-day certificate")
    cert_pem, key_pem = _issue_leaf(ca_cert, ca_key, dns_names, ips, days, key_type, now)
    return TLSBundle(ca_pem=bundle.ca_pem, cert_pem=cert_pem, key_pem=key_pem, ca_key_pem=bundle.ca_key_pem)


def _issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    dns_names: Sequence[str],
    ips: Sequence[str],
    days: int,
    key_type: KeyType,
    now: datetime,
) -> tuple[bytes, bytes]:
    key = _new_key(key_type)
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, dns_names[2][:_CN_MAX]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM), _private_pem(key)


def rotation_reason(
    bundle: TLSBundle,
    *,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str] = (),
    renew_before: timedelta = timedelta(days=30),
    now: datetime | None = None,
) -> str | None:
    """Why `bundle` must be replaced (a short sentence for logs), or None if it can keep serving.

    Replaced when: a PEM does not parse, the key does not match the certificate, no CA in `ca_pem` signed
    it, it or its CA is not yet valid or ends within `renew_before`, or a wanted SAN is missing. Extra
    SANs are fine, so replicas configured with different extra names do not take turns rotating.
    """
    now = _utc(now)
    try:
        cert = bundle.certificate
        bundle.ca_certificates  # noqa: B018 - parse now, to report a broken ca.crt as such
    except CertFileError as exc:
        return str(exc)
    try:
        key = _load_private_key(bundle.key_pem)
    except CertFileError as exc:
        return str(exc)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        return "tls.key does not match tls.crt"
    ca = bundle.issuer_ca()
    if ca is None:
        return "tls.crt is not signed by a CA in ca.crt"
    for what, item in (("tls.crt", cert), ("its CA", ca)):
        if item.not_valid_before_utc > now + _BACKDATE:
            return f"{what} is not valid before {rfc3339(item.not_valid_before_utc)}"
        if item.not_valid_after_utc <= now + renew_before:
            state = "expired" if item.not_valid_after_utc <= now else "expires"
            return f"{what} {state} {rfc3339(item.not_valid_after_utc)} (renewal due {_days(renew_before)} before)"
    have_dns = {name.lower() for name in bundle.dns_names}
    have_ips = set(bundle.ip_addresses)
    missing = [n for n in dns_names if n.lower() not in have_dns]
    missing += [ip for ip in parse_ip_addresses(ip_addresses) if ip not in have_ips]
    if missing:
        return f"tls.crt lacks SANs {', '.join(missing)}"
    return None


def write_files(bundle: TLSBundle, directory: str | os.PathLike[str]) -> CertPaths:
    """Write `ca.crt`, `tls.crt` (0644) and `tls.key` (0600) into `directory`, each by temp file + rename.

    The key goes first: a reader that catches the new key with the old certificate sees a mismatched
    pair and keeps what it has (see certs.reload) rather than serving a wrong one. CertFileError on I/O.
    """
    target = Path(directory)
    try:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = CertPaths(target, target / CA_FILE, target / CERT_FILE, target / KEY_FILE)
        _atomic_write(paths.ca, bundle.ca_pem, 0o644)
        _atomic_write(paths.key, bundle.key_pem, 0o600)
        _atomic_write(paths.cert, bundle.cert_pem, 0o644)
        _fsync_directory(target)
    except OSError as exc:
        raise CertFileError(f"cannot write certificates to {target}: {exc.strerror or exc}") from exc
    log.info("wrote %s, %s, %s", paths.ca, paths.cert, paths.key)
    return paths


def read_files(directory: str | os.PathLike[str]) -> TLSBundle:
    """Read `ca.crt`, `tls.crt`, `tls.key` from `directory`; CertFileError if one is missing or unreadable."""
    target = Path(directory)
    try:
        return TLSBundle(
            ca_pem=(target / CA_FILE).read_bytes(),
            cert_pem=(target / CERT_FILE).read_bytes(),
            key_pem=(target / KEY_FILE).read_bytes(),
        )
    except OSError as exc:
        raise CertFileError(f"cannot read certificates from {target}: {exc.strerror or exc}") from exc


def describe(bundle: TLSBundle) -> str:
    """One line for people: serial, expiry and SANs of the serving certificate."""
    names = ", ".join([*bundle.dns_names, *bundle.ip_addresses])
    return f"serial {bundle.serial:x}, valid until {rfc3339(bundle.not_after)}, SANs {names}"


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_private_key(data: bytes, what: str = KEY_FILE) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertFileError(f"{what} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertFileError(f"{what} is neither an ECDSA nor an RSA key")
    return key


def _check_key_type(key_type: str) -> None:
    if key_type not in KEY_TYPES:
        raise InvalidInput(f"key type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")


def _load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CertFileError(f"{what} holds no PEM certificate")
    return certs


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_label(value: str, what: str) -> None:
    if not isinstance(value, str) or len(value) > 63 or not _LABEL.match(value):
        raise InvalidInput(f"{what} {value!r} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)")


def _check_dns_name(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    if len(name) > 253 or not _SUBDOMAIN.match(name) or any(len(part) > 63 for part in name.split(".")):
        raise InvalidInput(f"not a DNS name: {value!r}")
    return name


def _check_days(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_DAYS:
        raise InvalidInput(f"{what} must be a whole number of days from 1 to {_MAX_DAYS}, not {value!r}")


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise InvalidInput("now must be timezone-aware")
    return now.astimezone(UTC)


def _days(delta: timedelta) -> str:
    return f"{delta.days} days" if delta.days != 1 else "1 day"


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
