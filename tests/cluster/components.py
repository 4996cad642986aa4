"""Start every ibc component as a real subprocess against the test control plane, from the shipped manifests.

Why this module exists: the end-to-end cluster test (test_seed_e2e.py) runs the extender, a second
kube-scheduler with deploy/scheduler's configuration, the admission webhook registered with
deploy/webhook's ValidatingWebhookConfiguration, the controller, the proxy and mock model servers all at
once. Each component's own cluster test starts it its own way; this module is the one place that knows
the flags and the local adaptations of the shipped manifests (URLs and CAs instead of Services), so a
change of a flag or a manifest breaks one helper, not several tests.

Processes are :class:`tests.cluster.harness.ManagedProcess` (log file, stopped by PID); a server is
*launched* first and *awaited* later, so several Python processes start in parallel.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.cluster.harness import ControlPlane, ManagedProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deploy" / "crd" / "inferencemodels.inference.eh-ops.io.yaml"
WEBHOOK_CONFIGURATION = REPO / "deploy" / "webhook" / "validatingwebhookconfiguration.yaml"
SCHEDULER_CONFIG = REPO / "deploy" / "scheduler" / "scheduler-config.yaml"
SCHEDULER_NAME = "inference-budget-scheduler"
GROUP, VERSION, PLURAL = "inference.eh-ops.io", "v1alpha1", "inferencemodels"


class ComponentError(RuntimeError):
    """A component exited or did not become ready; the message carries its log tail."""


@dataclass(eq=False)
class Server:
    """A launched component: its process, base URL, the CA its TLS certificate chains to, its ready probe."""

    name: str
    process: ManagedProcess
    url: str
    ready_path: str
    ready_text: str = ""
    ca: Path | None = None

    def client(self, timeout_seconds: float = 10.0) -> httpx.Client:
        """An httpx client for this server (verifying its certificate when it serves HTTPS)."""
        verify: Any = str(self.ca) if self.ca is not None else True
        return httpx.Client(base_url=self.url, verify=verify, timeout=timeout_seconds)

    def get(self, path: str, timeout_seconds: float = 10.0) -> httpx.Response:
        with self.client(timeout_seconds) as c:
            return c.get(path)

    def is_ready(self) -> bool:
        """True once the ready probe answers 200 (and contains `ready_text`); raises if the process died."""
        if not self.process.alive():
            raise ComponentError(f"{self.name} exited; last lines of {self.process.log_path}:\n{self.log_tail()}")
        try:
            resp = self.get(self.ready_path, timeout_seconds=3)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and self.ready_text in resp.text

    def wait_ready(self, timeout_seconds: float = 90.0) -> Server:
        try:
            wait_for(self.is_ready, timeout=timeout_seconds, interval=0.2, message=f"{self.name} {self.ready_path}")
        except TimeoutError as exc:
            raise ComponentError(f"{exc}\nlast lines of {self.process.log_path}:\n{self.log_tail()}") from exc
        return self

    def log_text(self) -> str:
        try:
            return self.process.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def stop(self) -> None:
        self.process.stop()


def child_env() -> dict[str, str]:
    """The environment of a component: unbuffered output, no inherited Prometheus multiprocess dir."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def ibc_argv(command: str, *args: str, log_level: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "ibc", "--log-level", log_level, command, *args]


def _launch(name: str, argv: list[str], log_dir: Path) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    return ManagedProcess(name, argv, log_dir / f"{name}.log").start(env=child_env())


# ----------------------------------------------------------------------------------------------- manifests


def install_crd(cp: ControlPlane) -> None:
    """Apply deploy/crd's InferenceModel CRD and wait until it is served."""
    if not CRD.is_file():
        raise ComponentError(f"{CRD} is missing")
    res = cp.kubectl("apply", "-f", str(CRD), timeout=60)
    if res.returncode != 0:
        raise ComponentError(f"kubectl apply {CRD.name} failed:\n{res.stderr}")

    def established() -> bool:
        # Right after a create, the CRD has no status.conditions yet and `kubectl wait` fails at once
        # ("<nil> is of the type <nil>"), not after its timeout: asked again until the deadline.
        res = cp.kubectl("wait", "--for=condition=Established", "--timeout=10s", f"crd/{PLURAL}.{GROUP}", timeout=30)
        if res.returncode != 0:
            raise ComponentError(res.stderr)
        return True

    try:
        wait_for(established, timeout=60, interval=0.5, message="the CRD established")
    except TimeoutError as exc:
        raise ComponentError(f"the CRD was not established: {exc.__cause__ or exc}") from exc


def scheduler_config(extender_url: str, ca: Path) -> dict[str, Any]:
    """deploy/scheduler's KubeSchedulerConfiguration with the extender at `extender_url`, trusted via `ca`.

    Leader election is dropped: the harness runs one instance without the ibc-system lease.
    """
    config_map = yaml.safe_load(SCHEDULER_CONFIG.read_text())
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["config.yaml"])
    config.pop("leaderElection", None)
    (extender,) = config["extenders"]
    extender["urlPrefix"] = extender_url
    extender["tlsConfig"] = {"caFile": str(ca)}
    return config


def webhook_configuration(name: str, url: str, ca_pem: bytes, namespaces: list[str]) -> dict[str, Any]:
    """deploy/webhook's ValidatingWebhookConfiguration, calling `url` (verified with `ca_pem`).

    Renamed to `name` and narrowed to `namespaces` (added to each webhook's namespaceSelector) so that it
    never judges another test's objects in the same control plane; rules and matchConditions are unchanged.
    """
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(WEBHOOK_CONFIGURATION.read_text()))
    config["metadata"]["name"] = name
    config["metadata"]["annotations"] = {}  # no cert-manager: the caBundle is set here
    for hook in config["webhooks"]:
        hook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(ca_pem).decode()}
        selector = hook.setdefault("namespaceSelector", {})
        selector.setdefault("matchExpressions", []).append(
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(namespaces)}
        )
    return config


def register_webhook(cp: ControlPlane, config: dict[str, Any]) -> None:
    res = cp.kubectl("apply", "-f", "-", input=json.dumps(config), timeout=60)
    if res.returncode != 0:
        raise ComponentError(f"registering the webhook failed:\n{res.stderr}")


def unregister_webhook(cp: ControlPlane, name: str) -> None:
    cp.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found", timeout=60)


# ----------------------------------------------------------------------------------------------- components


def serving_cert(cp: ControlPlane) -> tuple[Path, Path, Path]:
    """A serving certificate for 127.0.0.1/localhost from the cluster CA: (cert, key, ca)."""
    return cp.issue_serving_cert(dns_names=["localhost"], ip_addresses=["127.0.0.1"])


def launch_extender(cp: ControlPlane, log_dir: Path, *, threads: int = 8) -> Server:
    """`ibc extender` over HTTPS with the live cluster view; ready once its view has synced."""
    cert, key, ca = serving_cert(cp)
    port = free_port()
    argv = ibc_argv(
        "extender",
        "--bind", f"127.0.0.1:{port}",
        "--kubeconfig", str(cp.kubeconfig),
        "--tls-cert", str(cert),
        "--tls-key", str(key),
        "--threads", str(threads),
    )  # fmt: skip
    proc = _launch("extender", argv, log_dir)
    return Server("extender", proc, f"https://127.0.0.1:{port}", "/readyz", '"ready"', ca)


def launch_webhook(cp: ControlPlane, log_dir: Path, *, ledger_namespace: str, ledger_name: str) -> Server:
    """`ibc webhook` over HTTPS (one worker), its admission ledger in `ledger_namespace`/`ledger_name`."""
    cert, key, ca = serving_cert(cp)
    port = free_port()
    argv = ibc_argv(
        "webhook",
        "--bind", f"127.0.0.1:{port}",
        "--kubeconfig", str(cp.kubeconfig),
        "--tls-cert", str(cert),
        "--tls-key", str(key),
        "--threads", "8",
        "--ledger-namespace", ledger_namespace,
        "--ledger-name", ledger_name,
    )  # fmt: skip
    proc = _launch("webhook", argv, log_dir)
    return Server("webhook", proc, f"https://127.0.0.1:{port}", "/readyz", '"ready"', ca)


def launch_controller(
    cp: ControlPlane, log_dir: Path, *flags: str, namespace: str, resync_seconds: float = 2.0
) -> Server:
    """`ibc controller` for one namespace, leading at once (no election); ready once its cache synced."""
    port = free_port()
    argv = ibc_argv(
        "controller",
        "--kubeconfig", str(cp.kubeconfig),
        "--namespace", namespace,
        "--metrics-bind", f"127.0.0.1:{port}",
        "--resync-seconds", str(resync_seconds),
        "--scheduler-name", SCHEDULER_NAME,
        *flags,
    )  # fmt: skip
    proc = _launch("controller", argv, log_dir)
    return Server("controller", proc, f"http://127.0.0.1:{port}", "/readyz", "leader")


def launch_proxy(
    cp: ControlPlane,
    log_dir: Path,
    *flags: str,
    namespace: str,
    threads: int = 32,
    cold_start_timeout_seconds: float = 120,
) -> Server:
    """`ibc proxy` (one gthread worker, the Kubernetes scaler) for one namespace; ready once its cache synced."""
    port = free_port()
    argv = ibc_argv(
        "proxy",
        "--kubeconfig", str(cp.kubeconfig),
        "--namespace", namespace,
        "--bind", f"127.0.0.1:{port}",
        "--workers", "1",
        "--threads", str(threads),
        "--cold-start-timeout", str(cold_start_timeout_seconds),
        *flags,
    )  # fmt: skip
    proc = _launch("proxy", argv, log_dir)
    return Server("proxy", proc, f"http://127.0.0.1:{port}", "/readyz")


def launch_mock_backend(log_dir: Path, model: str, port: int, *flags: str, host: str = "127.0.0.1") -> Server:
    """`ibc mock-backend` serving `model` on `host`:`port` (where the model's pods "are")."""
    argv = ibc_argv("mock-backend", "--bind", f"{host}:{port}", "--model", model, *flags)
    name = f"mock-{model}" if host == "127.0.0.1" else f"mock-{model}-{host}"
    proc = _launch(name, argv, log_dir)
    return Server(name, proc, f"http://{host}:{port}", "/health")


def stop_all(servers: list[Server], stop_seconds: dict[str, float] | None = None) -> dict[str, str]:
    """Stop every server (last launched first), whatever fails; returns each one's log tail.

    How long each took to exit after SIGTERM goes into `stop_seconds` when given.
    """
    tails: dict[str, str] = {}
    for server in reversed(servers):
        tails[server.name] = server.log_tail(30)
        started = time.monotonic()
        with contextlib.suppress(Exception):
            server.stop()
        if stop_seconds is not None:
            stop_seconds[server.name] = round(time.monotonic() - started, 2)
    return tails
