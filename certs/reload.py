"""Serve a renewed certificate on new connections without restarting the server.

A mounted Secret is updated in place by the kubelet (a `..data` symlink swap), cert-manager renews at
2/3 of the lifetime, and `certs.bootstrap` / `write_files` replace files by rename. A server that read
its pair once at start would keep presenting the old certificate until it expires. `CertReloader`
keeps the newest good `ssl.SSLContext`: at most once per `check_interval_ms` it stats the files (a few
syscalls) and, when their identity changed, builds a fresh context. `server_context()` is the one
context to hand to a listening socket: its SNI callback (called for every handshake, with or without
SNI) swaps the connection onto the newest context with `ssl_sock.context = ...`.

A pair that does not load (half-written, key and certificate from different generations, garbage) is
logged once and the previous context keeps serving; it is retried on every later check, so the
completed rotation is picked up as soon as it lands.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from budget.objects import rfc3339
from certs.errors import CertFileError

log = logging.getLogger(__name__)

# Once a second: renewal is not urgent (the old pair stays valid for weeks) and a stat per second per
# process costs nothing, while a check per handshake would put three syscalls on every connection.
DEFAULT_CHECK_INTERVAL_MS = 1000

_Signature = tuple[tuple[int, int, int, int], ...]
_NEVER_FAILED: object = object()


@dataclass(frozen=True)
class LoadedPair:
    """What the current context serves, for logs, metrics and tests."""

    serial: int
    not_after: datetime
    loaded_at: float


class CertReloader:
    """Holds the newest good server `SSLContext` for a certificate/key pair on disk.

    The first load happens in the constructor and raises CertFileError, so a server with a bad pair
    fails at start with a clear message instead of on the first handshake. Thread-safe: handshakes on
    many threads call `current()`; one of them does a due check, the others take the context at hand.
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        client_ca: str | os.PathLike[str] | None = None,
        check_interval_ms: int = DEFAULT_CHECK_INTERVAL_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if check_interval_ms < 0:
            raise ValueError(f"check_interval_ms must be >= 0, not {check_interval_ms}")
        self.cert_file = os.fspath(cert_file)
        self.key_file = os.fspath(key_file)
        self.client_ca = os.fspath(client_ca) if client_ca is not None else None
        self._interval = check_interval_ms / 1000.0
        self._clock = clock
        self._lock = threading.Lock()
        self.reloads = 0
        self.failures = 0
        self._failed: object = _NEVER_FAILED
        try:
            signature = self._signature()
        except OSError as exc:
            raise CertFileError(f"cannot read TLS files: {exc.strerror or exc}: {exc.filename}") from exc
        context, pair = self._build()
        self._context = context
        self._pair = pair
        self._signature_loaded = signature
        self._next_check = self._clock() + self._interval
        self._front, _ = self._build()
        self._front.sni_callback = self._on_handshake
        log.info(
            "serving certificate serial %x from %s, valid until %s",
            pair.serial,
            self.cert_file,
            rfc3339(pair.not_after),
        )

    @property
    def pair(self) -> LoadedPair:
        """The certificate the newest context serves."""
        return self._pair

    def current(self) -> ssl.SSLContext:
        """The newest good context; checks the files first if a check is due. Never raises."""
        now = self._clock()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + self._interval
                self._reload_if_changed()
            except Exception:  # a handshake must never fail because the check did
                log.exception("certificate reload check failed; keeping the current certificate")
            finally:
                self._lock.release()
        return self._context

    def check_now(self) -> bool:
        """Check the files at once (waiting for a check in progress); True if a new pair was loaded."""
        with self._lock:
            self._next_check = self._clock() + self._interval
            return self._reload_if_changed()

    def server_context(self) -> ssl.SSLContext:
        """The context for a listening socket (or a per-connection wrap): every handshake gets `current()`.

        The same object is returned on every call; its own certificate is only a fallback.
        """
        return self._front

    def _on_handshake(
        self, ssl_sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _initial: ssl.SSLContext
    ) -> None:
        try:
            ssl_sock.context = self.current()
        except Exception:
            log.exception("could not switch a connection to the current certificate")
        return None

    def _reload_if_changed(self) -> bool:
        try:
            signature = self._signature()
        except OSError as exc:
            self._fail(("stat", exc.filename, exc.errno), f"cannot stat {exc.filename}: {exc.strerror or exc}")
            return False
        if signature == self._signature_loaded:
            return False
        try:
            context, pair = self._build()
        except CertFileError as exc:
            self._fail(signature, str(exc))
            return False
        if self._signature() != signature:
            # Files moved again while we loaded: what we read may be a mix; take it next check.
            log.debug("TLS files changed during reload; retrying on the next check")
            return False
        previous = self._pair
        self._context = context
        self._pair = pair
        self._signature_loaded = signature
        self._failed = _NEVER_FAILED
        self.reloads += 1
        log.info(
            "reloaded serving certificate: serial %x -> %x, valid until %s",
            previous.serial,
            pair.serial,
            rfc3339(pair.not_after),
        )
        return True

    def _fail(self, key: object, message: str) -> None:
        """Count a failed reload; log it as an error once per distinct broken state, then at debug."""
        self.failures += 1
        if key == self._failed:
            log.debug("new TLS files still do not load: %s", message)
            return
        self._failed = key
        log.error("new TLS files do not load, still serving serial %x: %s", self._pair.serial, message)

    def _signature(self) -> _Signature:
        out = []
        for path in (self.cert_file, self.key_file, self.client_ca):
            if path is None:
                continue
            st = os.stat(path)  # follows the kubelet's ..data symlinks to the file actually served
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _build(self) -> tuple[ssl.SSLContext, LoadedPair]:
        # The caller compares the files' identity before and after, so these two reads see one version.
        try:
            with open(self.cert_file, "rb") as handle:
                cert_pem = handle.read()
            context = build_server_context(self.cert_file, self.key_file, client_ca=self.client_ca)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except OSError as exc:
            raise CertFileError(f"cannot read TLS files: {exc.strerror or exc}: {exc.filename}") from exc
        except ValueError as exc:
            raise CertFileError(f"{self.cert_file} is not a PEM certificate") from exc
        pair = LoadedPair(serial=cert.serial_number, not_after=cert.not_valid_after_utc, loaded_at=time.time())
        if pair.not_after <= datetime.now(UTC):
            log.warning(
                "serving certificate serial %x from %s expired at %s",
                pair.serial,
                self.cert_file,
                rfc3339(pair.not_after),
            )
        return context, pair


def build_server_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A TLS 1.2+ server context for one pair; with `client_ca`, clients must present a certificate it
    signed (CERT_REQUIRED). CertFileError (one line) if a file is missing or the pair does not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except ssl.SSLError as exc:
        raise CertFileError(
            f"{os.fspath(cert_file)} and {os.fspath(key_file)} do not load as a pair: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise CertFileError(f"cannot read TLS files: {exc.strerror or exc}: {exc.filename}") from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise CertFileError(
                f"client CA file {os.fspath(client_ca)} does not load: {getattr(exc, 'reason', None) or exc}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
