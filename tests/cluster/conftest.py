"""Fixtures of the cluster test tier: a real control plane on 127.0.0.1 (see harness.py, docs/testing.md).

Why: every test under tests/cluster shares one etcd/kube-apiserver/kube-controller-manager/kube-scheduler
per session; this file builds the binaries before the first test (outside the per-test timeout), marks
every test here ``cluster``, and skips the whole tier with one line when Go and the cached binaries are
both missing (or fails it when ``CI=true``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import ControlPlane, PodSimulator, SchedulerHandle

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ENABLE_HINT = "install Go 1.26 (go on PATH) or prebuild with tests/cluster/build-kube.sh; see docs/testing.md"

# Outcome of the pre-test build step (pytest_collection_finish): None = not attempted.
_state: dict[str, Any] = {"bin_dir": None, "skip": None, "error": None}


def _in_tier(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


_ci = harness.in_ci


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``cluster`` (before ``-m`` deselection runs)."""
    harness.marks_directory(items, HERE, pytest.mark.cluster)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build (or find cached) binaries once, before any test, so a cold build escapes the test timeout."""
    if not any(_in_tier(i) for i in session.items):
        return
    if os.environ.get("IBC_KUBE_BIN_DIR"):
        _state["bin_dir"] = Path(os.environ["IBC_KUBE_BIN_DIR"])
        return
    if shutil.which("go") is None and not harness.binaries_cached():
        reason = f"cluster tier skipped: 'go' not found and no cached Kubernetes binaries; to enable, {ENABLE_HINT}"
        if _ci():
            raise pytest.UsageError(f"CI=true but {reason}")
        _state["skip"] = reason
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        try:
            _state["bin_dir"] = harness.ensure_binaries(stream=sys.stderr)
        except harness.BuildError as exc:
            _state["error"] = str(exc)
            if _ci():
                raise pytest.UsageError(f"cluster tier: building Kubernetes failed: {exc}") from exc


@pytest.fixture(scope="session", autouse=True)
def _cluster_tier_enabled() -> None:
    """One shared skip for the whole tier (reported as a single line, see pytest_runtest_makereport)."""
    if _state["skip"]:
        _state["skip_line"] = sys._getframe().f_lineno + 1
        pytest.skip(_state["skip"])
    if _state["error"]:
        pytest.fail(f"building Kubernetes for the cluster tier failed:\n{_state['error']}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Give the tier-wide skip one location so ``-ra`` folds it into ONE summary line."""
    report = yield
    if _state["skip"] and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(Path(__file__)), _state.get("skip_line", 1), report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, shared by the session.

    Set IBC_CLUSTER_KEEP=1 to keep the work dir (certs, kubeconfigs, logs) after the session.
    """
    bin_dir = _state["bin_dir"] or harness.ensure_binaries()
    keep = os.environ.get("IBC_CLUSTER_KEEP", "") not in ("", "0")
    cp = ControlPlane.start_new(bin_dir=bin_dir, keep_work_dir=keep)
    rss_before = cp.peak_rss_mib()
    log.info("control plane up in %.1fs; RSS %s", cp.startup_seconds["total"], rss_before)
    try:
        yield cp
    finally:
        failed = request.session.testsfailed > 0
        rss = cp.peak_rss_mib()
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in cp.startup_seconds.items())
        msg = f"[cluster] startup: {timings}; peak RSS MiB: {rss}"
        if failed or keep:
            msg += "\n" + cp.describe_logs()
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(msg)
        cp.stop(remove_work_dir=not (failed or keep))


@pytest.fixture(scope="session")
def k8s_client(control_plane: ControlPlane) -> Iterator[Any]:
    """A session-wide ``kubernetes.client.ApiClient`` (admin)."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def pod_simulator(control_plane: ControlPlane) -> Iterator[PodSimulator]:
    """The kubelet stand-in: pods bound to fake nodes become Running/Ready; terminating ones vanish."""
    sim = PodSimulator(control_plane.api_client).start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def node_factory(k8s_client: Any) -> Iterator[Callable[..., Any]]:
    """``node_factory(name, **create_node_kwargs) -> V1Node``; the nodes are deleted after the test.

    Nodes are cluster-wide and every scheduler sees them: prefer unique names and delete them (this
    fixture does) so tests do not see each other's nodes.
    """
    created: list[str] = []

    def make(name: str, **kwargs: Any) -> Any:
        node = harness.create_node(k8s_client, name, **kwargs)
        created.append(name)
        return node

    yield make
    for name in created:
        with contextlib.suppress(Exception):
            harness.delete_node(k8s_client, name, wait=False)


@pytest.fixture
def namespace(k8s_client: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (name derived from the test), deleted after the test (not awaited)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s_client)
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "t"
    name = f"{base}-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            core.delete_namespace(name)


@pytest.fixture(scope="module")
def scheduler_factory(control_plane: ControlPlane) -> Iterator[Callable[..., SchedulerHandle]]:
    """``scheduler_factory(name, extenders=[...] | config={...}, ...) -> SchedulerHandle``.

    Same arguments as :meth:`ControlPlane.start_scheduler`; every scheduler started through it is
    stopped at the end of the test module.
    """
    started: list[SchedulerHandle] = []

    def start(name: str, **kwargs: Any) -> SchedulerHandle:
        handle = control_plane.start_scheduler(name, **kwargs)
        started.append(handle)
        return handle

    yield start
    for h in started:
        with contextlib.suppress(Exception):
            h.stop()
