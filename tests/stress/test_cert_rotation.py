"""Certificate rotation under load: every TLS handshake succeeds while the serving pair changes.

Why: cert-manager renews the webhook's and the extender's certificates at 2/3 of their lifetime, and the
kubelet swaps the mounted Secret in place; a server that fails handshakes for a moment fails
admissions (failurePolicy: Fail) or scheduling attempts. The real `ibc webhook` and `ibc extender`
processes (gunicorn, `certs.reload` behind `serving.runner`) serve while clients open a NEW connection for
every request (so every request is a full handshake, verified against the CA) and the pair is
rotated several times: through a kubelet-style `..data` symlink swap (both files change at once) and
through `certs.generate.write_files` (key first, then certificate: for a moment the two do not match,
and the old pair must keep serving).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from certs.generate import renew_serving_certificate
from tests.stress.scenarios import extender_objects, filter_args, scale_review, webhook_objects
from tests.stress.support import Service, TLSFiles, service, wait_until

ROTATIONS = 4
THREADS = 4


class SecretVolume:
    """A directory laid out as the kubelet mounts a Secret: files are symlinks through `..data`."""

    def __init__(self, directory: Path, tls: TLSFiles) -> None:
        self.directory = directory
        self.tls = tls
        self.generation = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._write()
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (directory / name).symlink_to(Path("..data") / name)

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    def _write(self) -> None:
        self.generation += 1
        target = self.directory / f"..gen-{self.generation}"
        target.mkdir()
        (target / "tls.crt").write_bytes(self.tls.bundle.cert_pem)
        (target / "tls.key").write_bytes(self.tls.bundle.key_pem)
        (target / "ca.crt").write_bytes(self.tls.bundle.ca_pem)
        link = self.directory / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.directory / "..data")  # the atomic swap the kubelet does

    def rotate(self) -> int:
        self.tls.bundle = renew_serving_certificate(
            self.tls.bundle, "ibc-stress", "ibc-system", ip_addresses=["127.0.0.1"]
        )
        self._write()
        return self.tls.bundle.serial


def handshake_and_ask(port: int, context: ssl.SSLContext, send: Callable[[http.client.HTTPSConnection], bool]):  # type: ignore[no-untyped-def]
    """One new connection: full handshake (verified), one request; returns (serial served, answer ok)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.connect()
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert der is not None
        serial = x509.load_der_x509_certificate(der).serial_number
        return serial, send(conn)
    finally:
        conn.close()


def rotate_under_load(
    svc: Service,
    context: ssl.SSLContext,
    rotate: Callable[[], int],
    send: Callable[[http.client.HTTPSConnection], bool],
) -> tuple[Counter[int], list[str], int]:
    """Load with a new connection per request while rotating ROTATIONS times; (serials seen, failures, last)."""
    stop = threading.Event()
    seen: Counter[int] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            try:
                serial, ok = handshake_and_ask(svc.port, context, send)
            except (OSError, ssl.SSLError, http.client.HTTPException, AssertionError) as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                seen[serial] += 1
                if not ok:
                    failures.append(f"wrong answer from serial {serial:x}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    last = 0
    try:
        time.sleep(0.5)
        for _ in range(ROTATIONS):
            last = rotate()

            def serving_new(serial: int = last) -> bool:
                return handshake_and_ask(svc.port, context, send)[0] == serial

            # The server checks its files once a second.
            wait_until(serving_new, 10, "the new certificate served", interval=0.1)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
    return seen, failures, last


def webhook_send(conn: http.client.HTTPSConnection) -> bool:
    conn.request(
        "POST",
        "/validate",
        body=json.dumps(scale_review("m01", 1, 0, "rotation")),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    return resp.status == 200 and body["response"]["uid"] == "rotation" and body["response"]["allowed"] is True


def extender_send(conn: http.client.HTTPSConnection) -> bool:
    conn.request(
        "POST", "/prioritize", body=json.dumps(filter_args("rotation")), headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    return resp.status == 200 and {h["Host"] for h in body} == {"stress-0", "stress-1"}


@pytest.mark.parametrize("component", ["webhook", "extender"])
def test_rotating_the_serving_certificate_under_load_fails_no_handshake(component: str, tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path / "issued")
    state = tmp_path / "state.yaml"
    if component == "webhook":
        state.write_text(yaml.safe_dump_all(webhook_objects()))
        args = ["webhook", "--cluster-state", str(state), "--threads", "8"]
        send = webhook_send
        # Secret volume layout: both files swap at once.
        volume = SecretVolume(tmp_path / "secret", tls)
        cert, key, rotate = volume.cert, volume.key, volume.rotate
    else:
        state.write_text(yaml.safe_dump_all(extender_objects()))
        args = ["extender", "--cluster-state", str(state), "--no-bind", "--threads", "8"]
        send = extender_send
        # Plain files replaced one after the other (key first): a moment of mismatch.
        cert, key, rotate = tls.paths.cert, tls.paths.key, tls.rotate
    svc = service(component, [*args, "--tls-cert", str(cert), "--tls-key", str(key)], tmp_path, ready_path="/readyz")
    svc.ca = tls.paths.ca
    context = ssl.create_default_context(cafile=str(tls.paths.ca))
    first = tls.bundle.serial
    svc.start()
    try:
        seen, failures, last = rotate_under_load(svc, context, rotate, send)
    finally:
        svc.stop()
    handshakes = sum(seen.values())
    print(
        f"{component}: {handshakes} handshakes, {len(failures)} failed, serials served: "
        f"{[f'{s:x}'[:8] + f'..x{n}' for s, n in seen.items()]}"
    )
    assert failures == [], failures[:5]
    # Traffic flowed on the first, the last and the certificates in between.
    assert first in seen and last in seen
    assert len(seen) == ROTATIONS + 1, seen
    assert handshakes >= 40, handshakes
