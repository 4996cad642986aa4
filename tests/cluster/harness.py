"""A real Kubernetes control plane on 127.0.0.1 for the cluster test tier.

Why this module exists: the extender, admission webhook, controller and proxy must be checked against
the real kube-scheduler, kube-apiserver and kube-controller-manager, not against our reading of their
protocols. There is no container engine here, so this module runs the upstream binaries (built from
their Go modules by ``build-kube.sh``) as plain processes: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, with a throw-away PKI made with ``cryptography``. There are no kubelets: nodes are
API objects (``create_node``) and :class:`PodSimulator` plays the kubelet's part for pods bound to them.

Everything here is usable without pytest; ``conftest.py`` wraps it in fixtures.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import ipaddress
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-kube.sh"

#: Label put on every node made by :func:`create_node`; the pod simulator only acts on such nodes.
FAKE_NODE_LABEL = "ibc.test/fake-node"
#: Pod annotation: the simulator reports this IP instead of allocating one (e.g. a 127.x address
#: where a test server listens). Put it on the pod template.
POD_IP_ANNOTATION = "ibc.test/pod-ip"
#: Pod annotation: ``"false"`` makes the simulator report the pod Running but not Ready.
POD_READY_ANNOTATION = "ibc.test/ready"

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
#: kube-controller-manager --controllers: only what the tests need; no node-lifecycle (fake nodes stay Ready).
CONTROLLERS = ",".join(
    f"{c}-controller"
    for c in (
        "deployment",
        "replicaset",
        "serviceaccount",
        "serviceaccount-token",
        "garbage-collector",
        "namespace",
        "root-ca-certificate-publisher",
        "endpoints",
        "endpointslice",
    )
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# small helpers


def in_ci() -> bool:
    """True under CI (``CI=true``): a tier that cannot run must fail there, not skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def marks_directory(items: list[Any], directory: Path, marker: Any) -> None:
    """Add ``marker`` to every collected item under ``directory`` (a tier's conftest, before ``-m``)."""
    for item in items:
        if directory in Path(str(item.path)).resolve().parents:
            item.add_marker(marker)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value and return that value.

    Exceptions raised by ``condition`` count as "not yet"; the last one is chained to the
    ``TimeoutError`` raised after ``timeout`` seconds. ``message`` (or its result) names what was awaited.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}") from last_exc
        time.sleep(interval)


def _insecure_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


# --------------------------------------------------------------------------------------------------
# binaries


class BuildError(RuntimeError):
    """build-kube.sh failed, or Go is missing and the binaries are not cached."""


def binaries_cached() -> bool:
    """True when build-kube.sh reports binaries matching its pins (no Go needed to answer)."""
    return subprocess.run([str(BUILD_SCRIPT), "--check"], check=False).returncode == 0


def cached_bin_dir() -> Path:
    out = subprocess.run([str(BUILD_SCRIPT), "--bin-dir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def ensure_binaries(stream: Any = None) -> Path:
    """Run build-kube.sh (a ~1 s no-op when cached) and return the bin dir.

    Progress lines go to ``stream`` (default: this process's stderr). Raises :class:`BuildError`.
    """
    stream = stream if stream is not None else sys.stderr
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("[build-kube") or "error" in line.lower():
            print(line, end="", file=stream, flush=True)
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-40:])
        raise BuildError(f"tests/cluster/build-kube.sh exited {rc}:\n{tail}")
    bin_dir = Path(lines[-1].strip())
    log.info("kube binaries ready in %.1fs: %s", time.monotonic() - t0, bin_dir)
    return bin_dir


# --------------------------------------------------------------------------------------------------
# PKI


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class PKI:
    """A throw-away certificate authority; writes PEM files into ``directory``.

    Keys are ECDSA P-256 (fast to make; accepted by every component and by Python's ssl).
    """

    def __init__(self, directory: Path, common_name: str = "ibc-test-ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count(2)
        self._lock = threading.Lock()
        now = dt.datetime.now(dt.UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_cert_pem = _pem_cert(self.ca_cert)
        self.ca_key_pem = _pem_key(self.ca_key)
        self.ca_file = self._write("ca.crt", self.ca_cert_pem)
        self.ca_key_file = self._write("ca.key", self.ca_key_pem, private=True)

    def _write(self, name: str, data: bytes, private: bool = False) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        if private:
            path.chmod(0o600)
        return path

    def issue(
        self,
        stem: str,
        common_name: str,
        organizations: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        client: bool = False,
        server: bool = False,
        days: int = 7,
    ) -> tuple[Path, Path]:
        """Issue a leaf certificate; returns ``(cert_path, key_path)`` named ``<stem>.crt/.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        )
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            serial = next(self._serial)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return self._write(f"{stem}.crt", _pem_cert(cert)), self._write(f"{stem}.key", _pem_key(key), True)

    def service_account_keys(self) -> tuple[Path, Path]:
        """A signing key pair for service-account tokens: ``(private_key_path, public_key_path)``."""
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return self._write("sa.key", _pem_key(key), private=True), self._write("sa.pub", pub)


def write_kubeconfig(path: Path, server: str, ca_file: Path, cert_file: Path, key_file: Path, user: str) -> Path:
    """Write a kubeconfig with the CA and client credentials embedded (portable, no file refs)."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ibc-test", "cluster": {"server": server, "certificate-authority-data": b64(ca_file)}}],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert_file), "client-key-data": b64(key_file)},
            }
        ],
        "contexts": [{"name": "ibc-test", "context": {"cluster": "ibc-test", "user": user}}],
        "current-context": "ibc-test",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------------
# processes

_live_processes: set[ManagedProcess] = set()
_live_lock = threading.Lock()


def _stop_all_live() -> None:
    with _live_lock:
        procs = list(_live_processes)
    for p in reversed(procs):
        with contextlib.suppress(Exception):
            p.stop(grace=3.0)


atexit.register(_stop_all_live)


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Have the kernel SIGKILL the child if the test process dies without cleaning up (the apiserver
    hangs in graceful shutdown once etcd is gone, and nobody is left to wait for it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass(eq=False)
class ManagedProcess:
    """A child process writing to a log file, stopped by PID (SIGTERM, then SIGKILL)."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self, env: Mapping[str, str] | None = None) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        logf.write(f"# {' '.join(self.argv)}\n".encode())
        logf.flush()
        # PR_SET_PDEATHSIG follows the *thread* that forked: only use it from the main thread.
        preexec = _pdeathsig if threading.current_thread() is threading.main_thread() else None
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # Ctrl-C reaches pytest only; we stop children ourselves
                preexec_fn=preexec,
            )
        finally:
            logf.close()
        self.started_at = time.monotonic()
        with _live_lock:
            _live_processes.add(self)
        log.info("started %s pid=%d log=%s", self.name, self.popen.pid, self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def peak_rss_kib(self) -> int | None:
        """VmHWM (peak resident set) of the running process, in KiB."""
        if not self.alive():
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            rc = self.popen.returncode if self.popen else None
            raise RuntimeError(f"{self.name} exited (rc={rc}); log {self.log_path}; last lines:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        if self.popen is None:
            return
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", self.name, self.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout=10)
        finally:
            with _live_lock:
                _live_processes.discard(self)


# --------------------------------------------------------------------------------------------------
# the control plane


@dataclass(eq=False)
class SchedulerHandle:
    """An additional kube-scheduler started by :meth:`ControlPlane.start_scheduler`."""

    name: str
    scheduler_name: str
    config_path: Path
    process: ManagedProcess
    port: int
    _on_stop: Callable[[SchedulerHandle], None] | None = None

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def healthz_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/healthz"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.stop()
        if self._on_stop is not None:
            self._on_stop(self)
            self._on_stop = None


@dataclass(eq=False)
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on 127.0.0.1.

    Create with :meth:`start` (or use as a context manager); :meth:`stop` ends every process by PID.
    """

    bin_dir: Path
    work_dir: Path
    keep_work_dir: bool = False
    apiserver_extra_args: Sequence[str] = ()
    #: The apiserver's listen/advertise address. 127.0.0.1 unless pods on a real node must reach it
    #: (the pods profile puts it on its bridge's gateway address; see tests/pods/node.py).
    address: str = "127.0.0.1"
    #: kube-controller-manager --controllers.
    controllers: str = CONTROLLERS
    #: Give the apiserver a client certificate for kubelets (``kubectl logs/exec`` on a real node).
    kubelet_client_cert: bool = False
    #: kube-apiserver --authorization-mode. The Node authorizer watches DRA ResourceSlices (its graph
    #: includes them) and keeps /readyz failing while they cannot be listed: an apiserver without the
    #: DRA API (``--runtime-config=resource.k8s.io/v1=false``) runs with "RBAC" alone.
    authorization_mode: str = "Node,RBAC"
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    startup_seconds: dict[str, float] = field(default_factory=dict)
    extra_schedulers: list[SchedulerHandle] = field(default_factory=list)

    # ---- public attributes, filled by start()
    server: str = ""
    kubeconfig: Path = Path()
    ca_file: Path = Path()
    ca_cert_pem: bytes = b""
    ca_key_pem: bytes = b""
    admin_cert: Path = Path()
    admin_key: Path = Path()
    log_dir: Path = Path()
    kubeconfigs: dict[str, Path] = field(default_factory=dict)
    pki: PKI | None = None
    _serving_counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start_new(
        cls,
        bin_dir: Path | None = None,
        work_dir: Path | None = None,
        keep_work_dir: bool = False,
        **options: Any,
    ) -> ControlPlane:
        """Build-if-needed, then start a control plane in a fresh temp dir (or ``work_dir``).

        ``options`` set the other fields (``address``, ``controllers``, ``apiserver_extra_args``).
        """
        bin_dir = bin_dir or ensure_binaries()
        wd = work_dir or Path(tempfile.mkdtemp(prefix="ibc-cluster-"))
        cp = cls(bin_dir=bin_dir, work_dir=wd, keep_work_dir=keep_work_dir or work_dir is not None, **options)
        try:
            cp.start()
        except BaseException:
            cp.stop(remove_work_dir=False)
            raise
        return cp

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(remove_work_dir=exc[0] is None and not self.keep_work_dir)

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def start(self) -> None:
        t0 = time.monotonic()
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pki = self.pki = PKI(self.work_dir / "pki")
        self.ca_file = pki.ca_file
        self.ca_cert_pem, self.ca_key_pem = pki.ca_cert_pem, pki.ca_key_pem
        api_port, etcd_port, etcd_peer = free_port(), free_port(), free_port()
        self.server = f"https://{self.address}:{api_port}"
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        serving = pki.issue(
            "apiserver",
            "kube-apiserver",
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=sorted({"127.0.0.1", self.address, "10.96.0.1"}),
            server=True,
        )
        self.admin_cert, self.admin_key = pki.issue(
            "admin", "kubernetes-admin", organizations=["system:masters"], client=True
        )
        kubelet_flags: list[str] = []
        if self.kubelet_client_cert:  # what the apiserver presents to kubelets; they trust the same CA
            crt, key = pki.issue("kubelet-client", "kube-apiserver", organizations=["system:masters"], client=True)
            kubelet_flags = [f"--kubelet-client-certificate={crt}", f"--kubelet-client-key={key}"]
        kcm_cert = pki.issue("kube-controller-manager", "system:kube-controller-manager", client=True)
        sched_cert = pki.issue("kube-scheduler", "system:kube-scheduler", client=True)
        sa_key, sa_pub = pki.service_account_keys()
        kdir = self.work_dir / "kubeconfig"
        kdir.mkdir(exist_ok=True)
        self.kubeconfig = write_kubeconfig(
            kdir / "admin.kubeconfig", self.server, self.ca_file, self.admin_cert, self.admin_key, "admin"
        )
        self.kubeconfigs = {
            "admin": self.kubeconfig,
            "kube-controller-manager": write_kubeconfig(
                kdir / "kube-controller-manager.kubeconfig",
                self.server,
                self.ca_file,
                *kcm_cert,
                "system:kube-controller-manager",
            ),
            "kube-scheduler": write_kubeconfig(
                kdir / "kube-scheduler.kubeconfig",
                self.server,
                self.ca_file,
                *sched_cert,
                "system:kube-scheduler",
            ),
        }
        self.startup_seconds["pki"] = time.monotonic() - t0

        # etcd
        etcd = self._spawn(
            "etcd",
            [
                self._bin("etcd"),
                "--name=ibc",
                f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=ibc=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
            ],
        )
        self._await(etcd, "etcd health", lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"), 30)

        # kube-apiserver
        api = self._spawn(
            "kube-apiserver",
            [
                self._bin("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={self.address}",
                f"--secure-port={api_port}",
                f"--advertise-address={self.address}",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={self.ca_file}",
                *kubelet_flags,
                f"--authorization-mode={self.authorization_mode}",
                # the default plugin set already has MutatingAdmissionWebhook and ValidatingAdmissionWebhook
                "--enable-admission-plugins=NodeRestriction",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
                *self.apiserver_extra_args,
            ],
        )
        ctx = self.ssl_context()
        self._await(api, "kube-apiserver /readyz", lambda: _http_ok(f"{self.server}/readyz", ctx), 60)
        self._grant_extra_rbac()

        # kube-controller-manager and kube-scheduler, started together
        kcm_port, sched_port = free_port(), free_port()
        kcm_kc = self.kubeconfigs["kube-controller-manager"]
        kcm = self._spawn(
            "kube-controller-manager",
            [
                self._bin("kube-controller-manager"),
                f"--kubeconfig={kcm_kc}",
                f"--authentication-kubeconfig={kcm_kc}",
                f"--authorization-kubeconfig={kcm_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}",
                f"--cert-dir={self.work_dir / 'kcm-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--controllers={self.controllers}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={self.ca_file}",
                "--concurrent-deployment-syncs=5",
                "--concurrent-replicaset-syncs=5",
                "--v=1",
            ],
        )
        sched_kc = self.kubeconfigs["kube-scheduler"]
        sched = self._spawn(
            "kube-scheduler",
            [
                self._bin("kube-scheduler"),
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                f"--cert-dir={self.work_dir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        insecure = _insecure_ssl_context()
        self._await(
            kcm,
            "kube-controller-manager /healthz",
            lambda: _http_ok(f"https://127.0.0.1:{kcm_port}/healthz", insecure),
            60,
        )
        self._await(
            sched,
            "kube-scheduler /healthz",
            lambda: _http_ok(f"https://127.0.0.1:{sched_port}/healthz", insecure),
            60,
        )
        self._await(api, "default service account in namespace default", self._default_sa_exists, 30)
        self.startup_seconds["total"] = time.monotonic() - t0
        log.info(
            "control plane ready in %.1fs at %s (logs: %s)",
            self.startup_seconds["total"],
            self.server,
            self.log_dir,
        )

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        p = ManagedProcess(name, argv, self.log_dir / f"{name}.log").start()
        self.processes[name] = p
        return p

    def _await(self, proc: ManagedProcess, what: str, check: Callable[[], bool], timeout: float) -> None:
        def ready() -> bool:
            proc.check_alive()
            return check()

        t0 = time.monotonic()
        try:
            wait_for(ready, timeout=timeout, interval=0.1, message=what)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{self.describe_logs()}") from exc
        self.startup_seconds[what] = time.monotonic() - t0

    def _default_sa_exists(self) -> bool:
        res = self.kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name", timeout=10)
        return res.returncode == 0

    def _grant_extra_rbac(self) -> None:
        """RBAC the stock roles lack here: extra schedulers' leases, a controller-manager without SA credentials."""
        manifest = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "ibc-test:scheduler-leases"}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, update, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "ibc-test:scheduler-leases"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "ibc-test:scheduler-leases"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-scheduler"}
---
# --use-service-account-credentials=false: every controller runs as system:kube-controller-manager,
# whose built-in role does not cover what the per-controller service accounts are normally granted.
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "ibc-test:kube-controller-manager"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:kube-controller-manager"}
"""

        def apply() -> bool:
            return self.kubectl("apply", "-f", "-", input=manifest, timeout=20).returncode == 0

        wait_for(apply, timeout=30, interval=0.5, message="RBAC for extra schedulers")

    def stop(self, remove_work_dir: bool | None = None) -> None:
        """Stop extra schedulers, then scheduler, controller-manager, apiserver, etcd (by PID)."""
        for h in list(self.extra_schedulers):
            with contextlib.suppress(Exception):
                h.stop()
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            p = self.processes.get(name)
            if p is not None:
                with contextlib.suppress(Exception):
                    p.stop()
        if remove_work_dir is None:
            remove_work_dir = not self.keep_work_dir
        if remove_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------ diagnostics

    def peak_rss_mib(self) -> dict[str, float]:
        """VmHWM of each running process, MiB."""
        out: dict[str, float] = {}
        for name, p in self.processes.items():
            kib = p.peak_rss_kib()
            if kib is not None:
                out[name] = round(kib / 1024, 1)
        return out

    def describe_logs(self) -> str:
        lines = [f"control-plane logs in {self.log_dir}:"]
        for name, p in self.processes.items():
            state = "running" if p.alive() else f"exited rc={p.popen.returncode if p.popen else None}"
            lines.append(f"  {name} ({state}): {p.log_path}")
        for h in self.extra_schedulers:
            lines.append(f"  {h.name} (extra scheduler): {h.log_path}")
        return "\n".join(lines)

    def check_alive(self) -> None:
        for p in self.processes.values():
            p.check_alive()

    # ------------------------------------------------------------------ clients

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the apiserver and presents the admin client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return ctx

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching kubectl against this cluster (admin); text output captured."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        res = subprocess.run(
            [self._bin("kubectl"), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (as its periodic compaction would); returns it.

        A watch from an older resourceVersion then ends in 410 Gone: how the tests reach that path."""

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            req = urllib.request.Request(
                f"{self.etcd_url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
                return answer

        revision = int(post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
        post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for the admin kubeconfig (one per thread is safest).

        The test's own driver keeps urllib3's retries (a 429 while a CRD's storage re-initializes is waited
        out); the components under test use `kubeview.load_api_client`, which does not retry."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def issue_serving_cert(
        self, dns_names: Iterable[str] = (), ip_addresses: Iterable[str] = ("127.0.0.1",)
    ) -> tuple[Path, Path, Path]:
        """A serving certificate signed by the cluster CA: ``(cert_path, key_path, ca_path)``.

        The apiserver and the schedulers trust this CA, so a webhook/extender presenting this
        certificate verifies against ``caBundle = ca_cert_pem`` (base64) / ``caFile = ca_path``.
        """
        assert self.pki is not None
        dns, ips = list(dns_names), list(ip_addresses)
        cn = dns[0] if dns else (ips[0] if ips else "serving")
        cert, key = self.pki.issue(
            f"serving-{next(self._serving_counter)}", cn, dns_names=dns, ip_addresses=ips, server=True
        )
        return cert, key, self.ca_file

    def issue_client_cert(self, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate for ``user`` in ``groups``; pair it with :meth:`write_user_kubeconfig`."""
        assert self.pki is not None
        stem = "client-" + "".join(c if c.isalnum() else "-" for c in user) + f"-{secrets.token_hex(3)}"
        return self.pki.issue(stem, user, organizations=groups, client=True)

    def write_user_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig authenticating as ``user`` (RBAC applies; not system:masters unless asked)."""
        cert, key = self.issue_client_cert(user, groups)
        return write_kubeconfig(cert.with_suffix(".kubeconfig"), self.server, self.ca_file, cert, key, user)

    # ------------------------------------------------------------------ extra schedulers

    def start_scheduler(
        self,
        name: str,
        extenders: Sequence[Mapping[str, Any]] | None = None,
        config: Mapping[str, Any] | None = None,
        leader_election_resource: str | None = None,
        plugins: Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        verbosity: int = 2,
        wait_healthy: bool = True,
    ) -> SchedulerHandle:
        """Start an additional kube-scheduler whose profile is ``schedulerName: name``.

        Either pass ``extenders`` (the list that goes under ``extenders:``, e.g.
        ``[{"urlPrefix": "https://127.0.0.1:8443", "filterVerb": "filter", ...,
        "tlsConfig": {"caData": ...}}]``;
        ``tlsConfig.caData`` may be given as PEM bytes/str: it is base64-encoded for you), or a full
        ``KubeSchedulerConfiguration`` dict as ``config`` (then ``clientConnection.kubeconfig`` and
        ``leaderElection`` are filled in only if missing). Leader election is off unless
        ``leader_election_resource`` names a lease in kube-system. Returns a handle with ``.stop()``
        and ``.log_path``; the control plane stops it too on shutdown.
        """
        port = free_port()
        sched_kc = self.kubeconfigs["kube-scheduler"]
        if leader_election_resource:
            le: dict[str, Any] = {
                "leaderElect": True,
                "resourceName": leader_election_resource,
                "resourceNamespace": "kube-system",
                "leaseDuration": "4s",
                "renewDeadline": "3s",
                "retryPeriod": "1s",
            }
        else:
            le = {"leaderElect": False}
        if config is not None:
            cfg: dict[str, Any] = json.loads(json.dumps(config))
            cfg.setdefault("apiVersion", "kubescheduler.config.k8s.io/v1")
            cfg.setdefault("kind", "KubeSchedulerConfiguration")
            cfg.setdefault("clientConnection", {}).setdefault("kubeconfig", str(sched_kc))
            cfg.setdefault("leaderElection", le)
            profiles = cfg.get("profiles") or [{}]
            scheduler_name = profiles[0].get("schedulerName", name)
        else:
            scheduler_name = name
            profile: dict[str, Any] = {"schedulerName": name}
            if plugins:
                profile["plugins"] = dict(plugins)
            cfg = {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(sched_kc)},
                "leaderElection": le,
                "profiles": [profile],
            }
            if extenders:
                cfg["extenders"] = [_normalize_extender(e) for e in extenders]
        if "extenders" in cfg:
            cfg["extenders"] = [_normalize_extender(e) for e in cfg["extenders"]]
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        config_path = self.work_dir / f"scheduler-{safe}-{port}.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [
            self._bin("kube-scheduler"),
            f"--config={config_path}",
            f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.work_dir / f'scheduler-{safe}-{port}-certs'}",
            f"--v={verbosity}",
            *extra_args,
        ]
        proc = ManagedProcess(f"kube-scheduler[{name}]", argv, self.log_dir / f"kube-scheduler-{safe}-{port}.log")
        handle = SchedulerHandle(name, scheduler_name, config_path, proc, port, self._forget_scheduler)
        proc.start()
        self.extra_schedulers.append(handle)
        if wait_healthy:
            try:
                wait_for(
                    lambda: (proc.check_alive(), _http_ok(handle.healthz_url, _insecure_ssl_context()))[1],
                    timeout=60,
                    interval=0.1,
                    message=f"extra scheduler {name} /healthz",
                )
            except (TimeoutError, RuntimeError) as exc:
                handle.stop()
                raise RuntimeError(f"{exc}\nconfig {config_path}; log {proc.log_path}:\n{proc.log_tail()}") from exc
        return handle

    def _forget_scheduler(self, handle: SchedulerHandle) -> None:
        with contextlib.suppress(ValueError):
            self.extra_schedulers.remove(handle)


def _normalize_extender(ext: Mapping[str, Any]) -> dict[str, Any]:
    """Base64-encode PEM ``tlsConfig.*Data`` fields given as raw PEM (the config wants base64)."""
    e = json.loads(json.dumps(ext, default=lambda o: o.decode() if isinstance(o, bytes) else str(o)))
    tls = e.get("tlsConfig")
    if isinstance(tls, dict):
        for k in ("caData", "certData", "keyData"):
            v = tls.get(k)
            if isinstance(v, str) and v.lstrip().startswith("-----BEGIN"):
                tls[k] = base64.b64encode(v.encode()).decode()
    return e


# --------------------------------------------------------------------------------------------------
# fake nodes


def create_node(
    api: Any,
    name: str,
    capacity: str | None = None,
    gfd_memory_mib: int | None = None,
    gfd_count: int | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    cpu: str = "32",
    memory: str = "256Gi",
    pods: int = 110,
    extra_allocatable: Mapping[str, str] | None = None,
    address: str = "127.0.0.1",
) -> Any:
    """Create a Ready, untainted fake node and return it (a ``V1Node``).

    ``api`` is a ``kubernetes.client.ApiClient`` or ``CoreV1Api``. ``capacity`` (a quantity such as
    ``"80Gi"``) becomes the annotation ``inference.eh-ops.io/memory-capacity``; ``gfd_memory_mib`` /
    ``gfd_count`` become the NVIDIA GFD labels ``nvidia.com/gpu.memory`` / ``nvidia.com/gpu.count``
    (and ``gfd_count`` also allocatable ``nvidia.com/gpu``). The node carries ``ibc.test/fake-node``,
    which is what :class:`PodSimulator` looks for.
    """
    from kubernetes import client

    core = _core(api)
    all_labels = {
        FAKE_NODE_LABEL: "true",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    if gfd_memory_mib is not None:
        all_labels["nvidia.com/gpu.memory"] = str(gfd_memory_mib)
    if gfd_count is not None:
        all_labels["nvidia.com/gpu.count"] = str(gfd_count)
    all_labels.update(labels or {})
    all_annotations = dict(annotations or {})
    if capacity is not None:
        all_annotations["inference.eh-ops.io/memory-capacity"] = capacity
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "100Gi"}
    if gfd_count is not None:
        resources["nvidia.com/gpu"] = str(gfd_count)
    resources.update(extra_allocatable or {})

    core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(name=name, labels=all_labels, annotations=all_annotations or None),
            spec=client.V1NodeSpec(),
        )
    )
    now = _now()
    conditions = [
        {
            "type": t,
            "status": "False",
            "reason": f"KubeletHas{r}",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
            "message": "fake node",
        }
        for t, r in (
            ("MemoryPressure", "SufficientMemory"),
            ("DiskPressure", "NoDiskPressure"),
            ("PIDPressure", "SufficientPID"),
        )
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
            "message": "fake node is ready",
        }
    )
    core.patch_node_status(
        name,
        {
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": conditions,
                "addresses": [
                    {"type": "InternalIP", "address": address},
                    {"type": "Hostname", "address": name},
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.36.3-fake",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "fake://1",
                    "kernelVersion": "",
                    "osImage": "fake",
                    "machineID": name,
                    "systemUUID": name,
                    "bootID": name,
                },
            }
        },
    )
    # TaintNodesByCondition admission added node.kubernetes.io/not-ready:NoSchedule at create time.
    node = core.read_node(name)
    taints = [t for t in (node.spec.taints or []) if not t.key.startswith("node.kubernetes.io/")]
    return core.patch_node(
        name,
        [
            {
                "op": "replace",
                "path": "/spec/taints",
                "value": [{"key": t.key, "value": t.value, "effect": t.effect} for t in taints],
            }
        ],
    )


def delete_node(api: Any, name: str, wait: bool = True, timeout: float = 30) -> None:
    """Delete a node (pods bound to it stay until their controller/namespace removes them)."""
    from kubernetes.client.exceptions import ApiException

    core = _core(api)
    try:
        core.delete_node(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return
    if wait:

        def gone() -> bool:
            try:
                core.read_node(name)
            except ApiException as exc:
                return exc.status == 404
            return False

        wait_for(gone, timeout=timeout, message=f"node {name} deleted")


def delete_fake_nodes(api: Any) -> None:
    core = _core(api)
    for n in core.list_node(label_selector=f"{FAKE_NODE_LABEL}=true").items:
        delete_node(api, n.metadata.name, wait=False)


def _core(api: Any) -> Any:
    from kubernetes import client

    return api if isinstance(api, client.CoreV1Api) else client.CoreV1Api(api)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# kubelet stand-in


class PodSimulator:
    """Plays the kubelet for pods bound to fake nodes.

    Watches all pods; a pod bound (``spec.nodeName``) to a node labelled ``ibc.test/fake-node`` gets
    status Running + Ready (podIP from 10.244.0.0/16, startTime, containerStatuses), so Deployments
    become available. A pod with a deletionTimestamp on such a node is removed (grace period 0), as a
    kubelet would after its containers stopped. Annotations on the pod: ``ibc.test/pod-ip`` fixes the
    IP (a comma-separated list: the first address no live pod holds, one per replica);
    ``ibc.test/ready: "false"`` leaves it Running but not Ready. The watch resumes from the last
    resourceVersion (bookmarks included) and re-lists on 410 Gone or any error.

    NOTE: the simulated pod IPs (10.244.x.y) do not exist: never send traffic to them. Use the
    ``ibc.test/pod-ip`` annotation with a loopback address when a test must dial a pod.

    The watch is read as raw JSON (not ``kubernetes.watch.Watch``: with ``timeout_seconds`` set, that
    one ends silently on 410 and would leave us re-watching a compacted resourceVersion forever).
    """

    def __init__(self, api_client_factory: Callable[[], Any], watch_timeout: int = 60) -> None:
        self._factory = api_client_factory
        self._watch_timeout = watch_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None
        self._ip_lock = threading.Lock()
        self._ips: dict[str, str] = {}
        self._next_ip = itertools.count(2)
        self._fake_nodes: dict[str, bool] = {}
        self.pods_started = 0
        self.pods_removed = 0
        self.relists = 0
        self.errors: list[str] = []

    def start(self) -> PodSimulator:
        self._thread = threading.Thread(target=self._run, name="ibc-pod-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: interrupts the open watch and joins for at most ``timeout`` seconds."""
        self._stop.set()
        resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3: unblocks a pending read
                if shutdown is not None:
                    shutdown()
                resp.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> PodSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals

    def _pod_ip(self, md: dict[str, Any]) -> str:
        """The annotation's IP; from a comma-separated list, the first one no live pod holds (one loopback
        address per replica, where a test runs one backend each); else one from 10.244.0.0/16."""
        wanted = str((md.get("annotations") or {}).get(POD_IP_ANNOTATION) or "")
        pool = [a.strip() for a in wanted.split(",") if a.strip()]
        if len(pool) < 2:
            return wanted or self._alloc_ip(md["uid"])
        with self._ip_lock:
            if md["uid"] not in self._ips:
                held = set(self._ips.values())
                self._ips[md["uid"]] = next((a for a in pool if a not in held), pool[-1])
            return self._ips[md["uid"]]

    def _alloc_ip(self, uid: str) -> str:
        with self._ip_lock:
            if uid not in self._ips:
                n = next(self._next_ip)
                self._ips[uid] = f"10.244.{(n // 254) % 256}.{n % 254 + 1}"
            return self._ips[uid]

    def _is_fake_node(self, core: Any, node_name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        known = self._fake_nodes.get(node_name)
        if known is not None:
            return known
        try:
            node = core.read_node(node_name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        fake = (node.metadata.labels or {}).get(FAKE_NODE_LABEL) == "true"
        self._fake_nodes[node_name] = fake
        return fake

    def _run(self) -> None:
        from kubernetes import client

        api = self._factory()
        core = client.CoreV1Api(api)
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    resp = core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=30)
                    pods = json.loads(resp.data)
                    for pod in pods.get("items") or []:
                        self._handle(core, pod)
                    rv = pods["metadata"]["resourceVersion"]
                    self.relists += 1
                rv = self._watch(core, rv)
                self._fake_nodes.clear()  # nodes may be re-created under the same names
            except Exception as exc:
                if self._stop.is_set():
                    break
                self._note_error(f"watch: {exc!r}")
                rv = None
                self._stop.wait(0.5)
        with contextlib.suppress(Exception):
            api.close()

    def _watch(self, core: Any, rv: str) -> str | None:
        """One watch request; returns the resourceVersion to resume from, or None to re-list."""
        resp = core.list_pod_for_all_namespaces(
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _preload_content=False,
            _request_timeout=(10, self._watch_timeout + 30),
        )
        self._resp = resp
        try:
            for line in _iter_lines(resp):
                if self._stop.is_set():
                    return rv
                ev = json.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") != 410:
                        self._note_error(f"watch error event: {obj.get('code')} {obj.get('message')}")
                    return None  # 410 Gone (or other): list again
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if typ in ("ADDED", "MODIFIED"):
                    self._handle(core, obj)
                elif typ == "DELETED":
                    with self._ip_lock:
                        self._ips.pop((obj.get("metadata") or {}).get("uid", ""), None)
            return rv
        finally:
            self._resp = None
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _note_error(self, msg: str) -> None:
        log.debug("pod simulator: %s", msg)
        self.errors.append(msg)
        del self.errors[:-50]

    def _handle(self, core: Any, pod: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        md, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        node_name = spec.get("nodeName")
        if not node_name:
            return
        try:
            if not self._is_fake_node(core, node_name):
                return
            if md.get("deletionTimestamp"):
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(
                        md["name"], md["namespace"], grace_period_seconds=0, body=client_delete_options(md["uid"])
                    )
                    self.pods_removed += 1
                return
            want_ready = (md.get("annotations") or {}).get(POD_READY_ANNOTATION, "true") != "false"
            st = pod.get("status") or {}
            if st.get("phase") == "Running":
                ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
                if ready == want_ready:
                    return
            self._mark_running(core, pod, want_ready)
        except ApiException as exc:
            if exc.status not in (404, 409):
                self._note_error(f"pod {md.get('namespace')}/{md.get('name')}: {exc.status} {exc.reason}")

    def _mark_running(self, core: Any, pod: dict[str, Any], ready: bool) -> None:
        md, spec, st = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        now = _now()
        ip = self._pod_ip(md)
        started_at = st.get("startTime") or now
        flag = "True" if ready else "False"
        containers = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": f"fake://{c.get('image', '')}",
                "containerID": f"containerd://{secrets.token_hex(32)}",
                "ready": ready,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": started_at}},
            }
            for c in spec.get("containers") or []
        ]
        host_ip = "127.0.0.1"
        status = {
            "phase": "Running",
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": started_at,
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ],
            "containerStatuses": containers,
        }
        core.patch_namespaced_pod_status(md["name"], md["namespace"], {"status": status})
        self.pods_started += 1


def _iter_lines(resp: Any) -> Iterable[bytes]:
    """Newline-delimited records of a streamed (chunked) HTTP response."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def client_delete_options(uid: str) -> Any:
    from kubernetes import client

    return client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid))
