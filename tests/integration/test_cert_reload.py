"""A renewed certificate is served to new connections without a restart, and no request fails meanwhile.

Real servers on 127.0.0.1: the in-thread werkzeug server of `serving.runner.serve_in_thread`, and gunicorn via
`serving.runner.serve` in a subprocess with two workers. Clients open a fresh connection per request and trust
every CA of the test (as a caBundle does during a CA rotation), so a failure means the server broke,
not that the client was picky.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flask import Flask

from certs.generate import TLSBundle, generate_serving_certificate, write_files
from serving.runner import ThreadedServer, serve_in_thread
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

RELOAD_MS = 50
REPO = Path(__file__).resolve().parents[2]


def _bundle() -> TLSBundle:
    return generate_serving_certificate("probe", "default", ip_addresses=["127.0.0.1"])


def _app() -> Flask:
    app = Flask("tls-probe")

    @app.get("/ping")
    def ping() -> dict[str, object]:
        return {"pid": os.getpid(), "metrics_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR")}

    return app


def _client_context(*bundles: TLSBundle, client_pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata="".join(b.ca_pem.decode() for b in bundles))
    if client_pair is not None:
        context.load_cert_chain(*client_pair)
    return context


def _fetch_serial(port: int, context: ssl.SSLContext) -> int:
    """GET /ping on a new connection; the serving certificate's serial. Raises on any failure."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", "/ping", headers={"Connection": "close"})
        der = conn.sock.getpeercert(binary_form=True)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise AssertionError(f"HTTP {response.status}")
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        conn.close()


class ClientLoop:
    """Threads that request on fresh connections until stopped, recording every serial and failure."""

    def __init__(self, port: int, context: ssl.SSLContext, threads: int = 2) -> None:
        self.port = port
        self.context = context
        self.serials: list[list[int]] = [[] for _ in range(threads)]
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                self.serials[index].append(_fetch_serial(self.port, self.context))
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    @property
    def calls(self) -> int:
        return sum(len(s) for s in self.serials) + len(self.failures)

    def __enter__(self) -> ClientLoop:
        for thread in self._threads:
            thread.start()
        _wait_for(lambda: self.calls >= 10, "the client loop to get going")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    wait_until(condition, timeout, what, interval=0.02)


def _serves(port: int, context: ssl.SSLContext, serial: int) -> Callable[[], bool]:
    return lambda: _fetch_serial(port, context) == serial


def _assert_in_generation_order(serials: list[int], order: list[int]) -> None:
    """A connection never goes back to an older certificate once a newer one was served."""
    ranks = [order.index(s) for s in serials]
    assert ranks == sorted(ranks), "an older certificate was served after a newer one"


class KubeletVolume:
    """A directory laid out like a mounted Secret: files are symlinks through `..data`, swapped at once."""

    def __init__(self, root: Path, bundle: TLSBundle) -> None:
        self.root = root
        self.generation = 0
        self._write(bundle)
        for name in ("ca.crt", "tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", root / name)

    def _write(self, bundle: TLSBundle) -> None:
        self.generation += 1
        stamp = f"..2030_01_01_00_00_{self.generation:02d}"
        write_files(bundle, self.root / stamp)
        os.symlink(stamp, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")

    def update(self, bundle: TLSBundle) -> None:
        self._write(bundle)


@pytest.fixture
def threaded() -> Iterator[Callable[..., ThreadedServer]]:
    servers: list[ThreadedServer] = []

    def start(cert_dir: Path, **kwargs: object) -> ThreadedServer:
        server = serve_in_thread(
            _app(),
            "127.0.0.1:0",
            tls_cert=str(cert_dir / "tls.crt"),
            tls_key=str(cert_dir / "tls.key"),
            reload_interval_ms=RELOAD_MS,
            **kwargs,
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("layout", ["atomic-rename", "kubelet-symlink-swap"])
def test_in_thread_server_serves_each_new_pair_with_zero_failed_calls(tmp_path: Path, threaded, layout):
    generations = [_bundle(), _bundle(), _bundle()]
    cert_dir = tmp_path / "tls"
    volume = KubeletVolume(cert_dir.parent / "tls", generations[0]) if layout != "atomic-rename" else None
    if volume is None:
        write_files(generations[0], cert_dir)
    server = threaded(cert_dir)
    assert server.url == f"https://127.0.0.1:{server.port}"
    context = _client_context(*generations)
    assert _fetch_serial(server.port, context) == generations[0].serial

    with ClientLoop(server.port, context) as loop:
        for bundle in generations[1:]:
            before = loop.calls
            if volume is not None:
                volume.update(bundle)
            else:
                write_files(bundle, cert_dir)
            _wait_for(_serves(server.port, context, bundle.serial), f"serial {bundle.serial:x}")
            _wait_for(lambda before=before: loop.calls > before + 20, "more calls after the rotation")

    assert loop.failures == []
    assert server.reloader is not None and server.reloader.reloads == 2
    order = [b.serial for b in generations]
    for serials in loop.serials:
        _assert_in_generation_order(serials, order)
    assert {s for serials in loop.serials for s in serials} == set(order)


def test_a_half_written_rotation_keeps_serving_the_old_pair_until_it_completes(tmp_path: Path, threaded, caplog):
    old, new = _bundle(), _bundle()
    write_files(old, tmp_path)
    server = threaded(tmp_path)
    context = _client_context(old, new)

    with ClientLoop(server.port, context) as loop:
        (tmp_path / "tls.crt").write_bytes(new.cert_pem)  # the certificate lands, the key not yet
        time.sleep(RELOAD_MS * 6 / 1000)
        assert _fetch_serial(server.port, context) == old.serial
        (tmp_path / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncat")
        time.sleep(RELOAD_MS * 6 / 1000)
        assert _fetch_serial(server.port, context) == old.serial
        (tmp_path / "tls.key").write_bytes(new.key_pem)
        (tmp_path / "tls.crt").write_bytes(new.cert_pem)
        _wait_for(_serves(server.port, context, new.serial), "the completed pair")

    assert loop.failures == []
    assert server.reloader is not None and server.reloader.failures >= 2
    assert any("still serving serial" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def _client_certificate(tmp_path: Path) -> tuple[Path, tuple[Path, Path]]:
    """A client CA file and a client certificate/key it signed (clientAuth), for mutual TLS."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test client CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp_path / "client-ca.crt", tmp_path / "client.crt", tmp_path / "client.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_file, (cert_file, key_file)


def test_client_certificates_stay_required_across_a_rotation(tmp_path: Path, threaded):
    old, new = _bundle(), _bundle()
    write_files(old, tmp_path / "tls")
    client_ca, client_pair = _client_certificate(tmp_path)
    server = threaded(tmp_path / "tls", client_ca=str(client_ca))
    with_cert = _client_context(old, new, client_pair=client_pair)
    without_cert = _client_context(old, new)

    assert _fetch_serial(server.port, with_cert) == old.serial
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _fetch_serial(server.port, without_cert)

    write_files(new, tmp_path / "tls")
    _wait_for(_serves(server.port, with_cert, new.serial), "the new pair over mutual TLS")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _fetch_serial(server.port, without_cert)


# --- the same under gunicorn, through serving.runner.serve -----------------------------------------------------

_SERVER = textwrap.dedent(
    """
    import os, sys
    from flask import Flask
    from ibc.logs import configure
    from serving.runner import serve

    bind, cert_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    def make_app():
        if mode == "broken":
            raise RuntimeError("the app cannot be built")
        app = Flask("tls-probe")

        @app.get("/ping")
        def ping():
            return {"pid": os.getpid(), "metrics_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR")}

        return app

    configure("INFO")
    sys.exit(serve(make_app, bind=bind, workers=2, threads=4, name="probe", timeout=30,
                   tls_cert=os.path.join(cert_dir, "tls.crt"), tls_key=os.path.join(cert_dir, "tls.key"),
                   reload_interval_ms=100))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_gunicorn(tmp_path: Path, cert_dir: Path, mode: str = "ok") -> tuple[subprocess.Popen[bytes], int, Path]:
    port = _free_port()
    log_file = tmp_path / f"gunicorn-{mode}.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with open(log_file, "wb") as log_handle:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, f"127.0.0.1:{port}", str(cert_dir), mode],
            cwd=REPO,
            env=env,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
        )
    return process, port, log_file


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def test_gunicorn_workers_serve_each_new_pair_with_zero_failed_calls(tmp_path: Path):
    import json

    generations = [_bundle(), _bundle(), _bundle()]
    cert_dir = tmp_path / "tls"
    write_files(generations[0], cert_dir)
    context = _client_context(*generations)
    process, port, log_file = _start_gunicorn(tmp_path, cert_dir)
    try:

        def up() -> bool:
            assert process.poll() is None, log_file.read_text()
            try:
                return _fetch_serial(port, context) == generations[0].serial
            except OSError:
                return False

        _wait_for(up, "gunicorn to listen", timeout=30)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
        conn.request("GET", "/ping")
        metrics_dir = json.loads(conn.getresponse().read())["metrics_dir"]
        conn.close()
        assert metrics_dir and Path(metrics_dir).is_dir(), "two workers need a shared metrics directory"

        with ClientLoop(port, context, threads=3) as loop:
            for bundle in generations[1:]:
                write_files(bundle, cert_dir)
                _wait_for(_serves(port, context, bundle.serial), f"serial {bundle.serial:x}")
                time.sleep(0.3)  # every worker has passed its 100 ms check by now
                seen = {_fetch_serial(port, context) for _ in range(20)}
                assert seen == {bundle.serial}, "a worker still serves an old pair on new connections"
        assert loop.failures == []
        assert loop.calls > 50
        pids = {_pid(port, context) for _ in range(30)}
    finally:
        code = _stop(process)
    output = log_file.read_text()
    assert code == 0, output
    assert output.count("reloaded serving certificate") >= 2 * len(pids)
    assert not Path(metrics_dir).exists(), "the metrics directory serve() created is removed at exit"


def _pid(port: int, context: ssl.SSLContext) -> int:
    import json

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", "/ping", headers={"Connection": "close"})
        return int(json.loads(conn.getresponse().read())["pid"])
    finally:
        conn.close()


def test_gunicorn_stops_with_exit_1_when_the_app_cannot_be_built(tmp_path: Path):
    cert_dir = tmp_path / "tls"
    write_files(_bundle(), cert_dir)
    process, _port, log_file = _start_gunicorn(tmp_path, cert_dir, mode="broken")
    try:
        code = process.wait(timeout=30)
    finally:
        _stop(process)
    output = log_file.read_text()
    assert code == 1, output
    assert "the app cannot be built" in output
    assert "gunicorn stopped with exit code 3" in output
