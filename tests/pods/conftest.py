"""Fixtures of the `pods` profile: the chart on a real kubelet node (see node.py, docs/testing.md).

Why: the cluster tier's pods are simulated; here they are containers of the project's image, built from
its Dockerfile, run by containerd and runc under a kubelet joined to the harness's control plane. Every
test here is marked ``pods``. Before the first test this file makes sure the pieces exist (Debian
packages, node binaries, images: each a quick no-op when cached, built otherwise), outside the per-test
timeout. A missing piece (not root, no Go, a package that cannot be installed) skips the profile with
one line, or fails it when ``CI=true``. One real node per machine: the session waits for the lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import ControlPlane
from tests.pods import host, images, node

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHART = REPO / "deploy" / "helm" / "ibc"
RELEASE, RELEASE_NAMESPACE = "ibc", "ibc-system"
POOL = {"inference-pool": "gpu-nodes"}
CAPACITY = "128Gi"
#: The profile's controllers: the cluster tier's, plus Jobs (the chart's certificate bootstrap) and PDBs.
CONTROLLERS = harness.CONTROLLERS + ",job-controller,cronjob-controller,disruption-controller"
APISERVER_ARGS = (
    # No node-lifecycle controller runs: the not-ready taint put on at registration would never lift.
    "--disable-admission-plugins=TaintNodesByCondition",
    # The kubelet listens on 127.0.0.1; the node's name resolves there (its InternalIP is the bridge's).
    "--kubelet-preferred-address-types=Hostname,InternalIP",
    # Pods reach the apiserver through the `kubernetes` Service: its endpoint is the advertised address.
    "--endpoint-reconciler-type=lease",
)
LOCK_WAIT_SECONDS = float(os.environ.get("IBC_PODS_LOCK_WAIT", "1200"))

_state: dict[str, Any] = {"skip": None, "error": None, "timings": {}}


def _in_profile(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``pods`` (before ``-m`` deselection runs)."""
    harness.marks_directory(items, HERE, pytest.mark.pods)


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(HERE / name), *args], capture_output=True, text=True, check=False)


def _prepare() -> dict[str, Any]:
    """Every piece the profile needs, built when missing; raises RuntimeError naming what is missing."""
    timings: dict[str, float] = {}
    if os.geteuid() != 0:
        raise RuntimeError("the pods profile runs a kubelet and containerd: it needs root")
    t0 = time.monotonic()
    res = _script("node-deps.sh")
    timings["debian packages"] = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"Debian packages missing: {res.stderr.strip()[-500:]}")
    kube_bin = harness.ensure_binaries()
    t0 = time.monotonic()
    res = _script("build-node.sh")
    timings["node binaries"] = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"tests/pods/build-node.sh failed:\n{res.stderr.strip()[-2000:]}")
    node_bin = Path(res.stdout.strip().splitlines()[-1])
    helm = subprocess.run(
        ["bash", str(REPO / "deploy" / "tools" / "install.sh"), "--bin-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    helm_path = Path(helm.stdout.strip()) / "helm"
    if not helm_path.exists():
        raise RuntimeError(f"helm not found at {helm_path}: run `make tools`")
    image_timings: dict[str, float] = {}
    imgs = images.build_all(node_bin, kube_bin, image_timings)
    timings.update(image_timings)
    return {"kube_bin": kube_bin, "node_bin": node_bin, "helm": helm_path, "images": imgs, "timings": timings}


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(_in_profile(i) for i in session.items):
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        try:
            _state.update(_prepare())
        except (RuntimeError, images.ImageError, harness.BuildError, OSError) as exc:
            reason = f"pods profile skipped: {exc}".splitlines()[0]
            if harness.in_ci():
                raise pytest.UsageError(f"CI=true but {exc}") from exc
            _state["skip"] = reason


@pytest.fixture(scope="session", autouse=True)
def _pods_profile_enabled() -> None:
    if _state["skip"]:
        _state["skip_line"] = sys._getframe().f_lineno + 1
        pytest.skip(_state["skip"])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """One location for the profile-wide skip, so ``-ra`` folds it into one summary line."""
    report = yield
    if _state["skip"] and _in_profile(item) and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(Path(__file__)), _state.get("skip_line", 1), report.longrepr[2])
    return report


# --------------------------------------------------------------------------------------------------


@dataclass
class PodsCluster:
    """The control plane, the real node, the installed chart, and what it took."""

    cp: ControlPlane
    node: node.RealNode
    images: images.ImageSet
    helm: Path
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, input=input, timeout=timeout)

    def get_json(self, *args: str) -> Any:
        res = self.kubectl("get", *args, "-o", "json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def helm_cmd(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.cp.kubeconfig), "HELM_CACHE_HOME": str(self.cp.work_dir / "helm")}
        env["HELM_CONFIG_HOME"] = env["HELM_DATA_HOME"] = env["HELM_CACHE_HOME"]
        return subprocess.run(
            [str(self.helm), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    @property
    def project_repository(self) -> str:
        return self.images.project.name.rsplit(":", 1)[0]

    @property
    def project_tag(self) -> str:
        return self.images.project.name.rsplit(":", 1)[1]


@pytest.fixture(scope="package")  # torn down after the profile, not at the end of the whole session
def pods_cluster(request: pytest.FixtureRequest) -> Iterator[PodsCluster]:
    """The machine's one real node, joined to its own control plane; the chart is not installed yet."""
    keep = os.environ.get("IBC_CLUSTER_KEEP", "") not in ("", "0")
    timings: dict[str, float] = dict(_state["timings"])
    profile_t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(node.node_lock(LOCK_WAIT_SECONDS))
        except node.NodeBusy as exc:
            if harness.in_ci():
                raise
            pytest.skip(f"pods profile skipped: {exc}")
        timings["waiting for the node lock"] = time.monotonic() - profile_t0
        yield from _profile(request, timings, profile_t0, keep)


def _profile(
    request: pytest.FixtureRequest, timings: dict[str, float], profile_t0: float, keep: bool
) -> Iterator[PodsCluster]:
    """Start the node, yield the cluster, put the host back (the caller holds the node lock)."""
    node.clean_previous_run()
    snapshot = host.HostSnapshot.take(node.CGROUP_ROOT)
    work = Path(tempfile.mkdtemp(prefix="ibc-pods-"))
    cp: ControlPlane | None = None
    rn: node.RealNode | None = None
    left: list[str] = []
    try:
        node.create_bridge()
        t0 = time.monotonic()
        cp = ControlPlane.start_new(
            bin_dir=_state["kube_bin"],
            work_dir=work / "control-plane",
            keep_work_dir=True,
            address=node.GATEWAY,
            controllers=CONTROLLERS,
            apiserver_extra_args=APISERVER_ARGS,
            kubelet_client_cert=True,
        )
        timings["control plane"] = time.monotonic() - t0
        rn = node.RealNode(
            cp,
            _state["node_bin"],
            work / "node",
            snapshot,
            labels=POOL,
            annotations={"inference.eh-ops.io/memory-capacity": CAPACITY},
        )
        imgs: images.ImageSet = _state["images"]
        rn.start(imgs.all(), images.PAUSE_IMAGE)
        timings["containerd ready"] = rn.timings.containerd_ready
        timings["images imported"] = rn.timings.images_imported
        timings["node Ready (after kubelet start)"] = rn.timings.node_ready
        timings["kube-proxy ready"] = rn.timings.kube_proxy_ready
        cluster = PodsCluster(cp, rn, imgs, _state["helm"], timings)
        cluster.notes["sysctls the kubelet changed (restored)"] = rn.restored_sysctls
        yield cluster
        _state.setdefault("report", []).append(f"[pods] notes: {json.dumps(cluster.notes, default=str)}")
    finally:
        t0 = time.monotonic()
        if rn is not None:
            left = rn.stop()
        else:
            left = host.restore(snapshot, None, [str(work)], [node.BRIDGE])
        if cp is not None:
            cp.stop(remove_work_dir=False)
        failed = request.session.testsfailed > 0
        if not (failed or keep):
            shutil.rmtree(work, ignore_errors=True)
        timings["teardown"] = time.monotonic() - t0
        timings["profile (fixture) total"] = time.monotonic() - profile_t0
        lines = _state.setdefault("report", [])
        lines.append("[pods] " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        if failed or keep:
            lines.append(f"[pods] work dir kept: {work}")
        if left:
            lines.append(f"[pods] the host differs after teardown: {left}")
    assert left == [], f"teardown left the host changed: {left}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What each step took (and what the story measured), after the session's fixtures are gone."""
    for line in _state.get("report", []):
        terminalreporter.write_line(line)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"
