"""`ibc controller` against a real control plane: models become Deployments, idle ones scale to zero.

Why: only the real kube-apiserver, kube-controller-manager and kube-scheduler show what users see:
server-side apply merged with the API server's defaults, owner references garbage-collected, the
scale subresource's resourceVersion precondition, status written through the status subresource and
printed by `kubectl get inferencemodels`, Events in `kubectl events`, and a Lease handed over after
the leader is SIGKILLed. The controller runs as a real subprocess (`python -m ibc controller`).

Pods are placed by a second kube-scheduler WITHOUT an extender, profile `inference-budget-scheduler`
(the name model pods get): this tier tests the controller, not the budget's filter, and the
extender's own cluster test covers the scheduler path. The harness's pod simulator plays the kubelet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from controller.kube import Kube
from kubeview.api import DEPLOYMENTS, INFERENCE_MODELS, LEASES, SERVICES
from tests.cluster.harness import ControlPlane, ManagedProcess, PodSimulator, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crd" / "inferencemodels.inference.eh-ops.io.yaml"
DEPLOY = ROOT / "deploy" / "controller"
GROUP, PLURAL = "inference.eh-ops.io", "inferencemodels"
SCHEDULER = "inference-budget-scheduler"
LABEL = "inference.eh-ops.io/model"
GI = 2**30
PAUSE = {"name": "server", "image": "registry.k8s.io/pause:3.10"}


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> float:
    """Install the CRD; returns when it was established (time.monotonic())."""
    if not CRD.is_file():
        pytest.fail(f"{CRD} is missing (the CRD is another task's; this test installs it)")
    kubectl_ok(control_plane, "apply", "-f", str(CRD))
    kubectl_ok(control_plane, "wait", "--for=condition=Established", "--timeout=30s", f"crd/{PLURAL}.{GROUP}")
    return time.monotonic()


@pytest.fixture(scope="module")
def budget_scheduler(control_plane: ControlPlane, scheduler_factory: Callable[..., Any]) -> Any:
    """The second scheduler's profile, without an extender."""
    return scheduler_factory(SCHEDULER)


@pytest.fixture
def kube(k8s_client: Any) -> Kube:
    return Kube(k8s_client)


@pytest.fixture
def env(
    control_plane: ControlPlane,
    crd: float,
    budget_scheduler: Any,
    pod_simulator: PodSimulator,
    node_factory: Callable[..., Any],
    namespace: str,
    kube: Kube,
    tmp_path: Path,
) -> Iterator[Env]:
    node = f"ctl-{namespace[-6:]}"
    node_factory(node, capacity="128Gi")
    e = Env(control_plane, kube, namespace, tmp_path, node)
    try:
        yield e
    finally:
        for proc in e.controllers:
            if proc.alive():
                proc.stop()
            print(f"--- {proc.name} log tail ---\n{proc.log_tail(60)}")  # shown when the test fails
        # Models have no nodeSelector here, so a model left behind would count in every later test's pool
        # (the namespace's own deletion runs in the background and can outlast the next modules). A model
        # Deployment the controller does not own (an adopted one outlives its model) counts the same way.
        control_plane.kubectl("delete", "inferencemodels", "--all", "-n", namespace, "--wait=false")
        control_plane.kubectl("delete", "deployments", "--all", "-n", namespace, "--wait=false")

        def gone(path: str) -> bool:
            return not (e.kube.get(path) or {}).get("items")

        for path in (INFERENCE_MODELS.path(namespace), DEPLOYMENTS.path(namespace)):
            wait_for(lambda path=path: gone(path), timeout=60, message=f"{path} deleted")


class Env:
    """One test's namespace, fake node, controller processes and readers."""

    def __init__(self, cp: ControlPlane, kube: Kube, namespace: str, tmp: Path, node: str) -> None:
        self.cp, self.kube, self.ns, self.tmp, self.node = cp, kube, namespace, tmp, node
        self.controllers: list[ManagedProcess] = []

    def start_controller(
        self, name: str = "a", *extra: str, kubeconfig: Path | None = None, wait_leader: bool = True
    ) -> tuple[ManagedProcess, int]:
        port = free_port()
        argv = [
            sys.executable, "-m", "ibc", "--log-level", "INFO", "controller",
            "--kubeconfig", str(kubeconfig or self.cp.kubeconfig),
            "--namespace", self.ns,
            "--leader-elect", "--lease-namespace", self.ns, "--lease-name", "ibc-controller",
            "--metrics-bind", f"127.0.0.1:{port}",
            "--resync-seconds", "2",
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = ManagedProcess(f"controller-{name}", argv, self.tmp / f"controller-{name}.log").start(env=env)
        self.controllers.append(proc)
        if wait_leader:
            wait_for(
                lambda: (proc.check_alive(), "became leader" in proc.log_path.read_text())[1],
                timeout=30,
                message=f"controller {name} leads",
            )
        return proc, port

    def apply_model(self, name: str, **spec: Any) -> None:
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"modelName": name, "memory": "16Gi", "cooldownPeriod": "0", "template": pod_template()},
        }
        body["spec"].update(spec)
        body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
        kubectl_ok(self.cp, "apply", "-f", "-", input=json.dumps(body))

    def model(self, name: str) -> dict[str, Any]:
        obj = self.kube.get(INFERENCE_MODELS.path(self.ns, name))
        assert obj is not None, f"InferenceModel {name} is gone"
        return obj

    def status(self, name: str) -> dict[str, Any]:
        return self.model(name).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == kind:
                return dict(c)
        return {}

    def deployment(self, name: str) -> dict[str, Any] | None:
        return self.kube.get(DEPLOYMENTS.path(self.ns, name))

    def pods(self, name: str) -> list[dict[str, Any]]:
        body = self.kube.get(f"/api/v1/namespaces/{self.ns}/pods", {"labelSelector": f"{LABEL}={name}"})
        return (body or {}).get("items") or []

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        items = (self.kube.get(f"/apis/events.k8s.io/v1/namespaces/{self.ns}/events") or {}).get("items") or []
        mine = [e for e in items if e.get("reportingController") == "inference.eh-ops.io/controller"]
        return [e for e in mine if reason is None or e.get("reason") == reason]

    def wait_ready(self, name: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: self.status(name) if self.status(name).get("ready") is True else None,
            timeout=timeout,
            message=lambda: f"{name} ready; status: {json.dumps(self.status(name))}",
        )


def pod_template(**pod_spec: Any) -> dict[str, Any]:
    return {"metadata": {"labels": {"app": "llm"}}, "spec": {"containers": [dict(PAUSE)], **pod_spec}}


def kubectl_ok(cp: ControlPlane, *args: str, input: str | None = None) -> str:
    res = cp.kubectl(*args, input=input, timeout=60)
    assert res.returncode == 0, f"kubectl {' '.join(args)} failed:\n{res.stderr}"
    return res.stdout


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def reconciles(port: int) -> float:
    """The controller's count of finished reconciles (every result), from its /metrics."""
    text = http_get(port, "/metrics")[1]
    pattern = r'^inference_controller_reconcile_total\{result="\w+"\} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.M))


def wait_resyncs(port: int, models: int, rounds: int = 2) -> None:
    """Wait until the controller has reconciled every one of `models` at least `rounds` more times."""
    start = reconciles(port)
    wait_for(lambda: reconciles(port) >= start + rounds * models, timeout=30, message=f"{rounds} resyncs")


class Watcher:
    """Records every spec.replicas a watched object takes, to prove nothing flapped."""

    def __init__(self, kube: Kube, path: str) -> None:
        self.kube, self.path = kube, path
        self.values: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                body = self.kube.get(self.path) or {}
                for item in body.get("items") or []:
                    name = item["metadata"]["name"]
                    replicas = int((item.get("spec") or {}).get("replicas", 1))
                    seen = self.values.setdefault(name, [])
                    if not seen or seen[-1] != replicas:
                        seen.append(replicas)
            self._stop.wait(0.1)

    def stop(self) -> dict[str, list[int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.values


# ----------------------------------------------------------------------------------------------- tests


def test_model_becomes_a_deployment_whose_pods_run_and_kubectl_shows_ready(env: Env) -> None:
    proc, _ = env.start_controller()
    t0 = time.monotonic()
    env.apply_model("model-a", memory="16Gi", replicas=2, nodeSelector={"kubernetes.io/hostname": env.node})

    dep = wait_for(lambda: env.deployment("model-a"), timeout=30, message="Deployment model-a")
    model = env.model("model-a")
    assert dep["metadata"]["ownerReferences"] == [
        {
            "apiVersion": f"{GROUP}/v1alpha1",
            "kind": "InferenceModel",
            "name": "model-a",
            "uid": model["metadata"]["uid"],
            "controller": True,
        }
    ]
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"][LABEL] == "model-a"
    assert pod["metadata"]["annotations"]["inference.eh-ops.io/memory"] == "16Gi"
    assert pod["spec"]["schedulerName"] == SCHEDULER
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": env.node}
    assert dep["spec"]["replicas"] == 2

    status = env.wait_ready("model-a")
    ready_after = time.monotonic() - t0
    assert status["readyReplicas"] == 2 and status["replicas"] == 2
    assert status["selector"] == f"{LABEL}=model-a"
    assert status["observedGeneration"] == model["metadata"]["generation"]
    assert env.condition("model-a", "Scheduled")["reason"] == "AllScheduled"
    pods = env.pods("model-a")
    assert len(pods) == 2 and all(p["spec"]["nodeName"] == env.node for p in pods)
    assert env.kube.get(SERVICES.path(env.ns, "model-a")) is not None

    out = kubectl_ok(env.cp, "get", "inferencemodels", "-n", env.ns)
    header, row = out.splitlines()[0].split(), out.splitlines()[1].split()
    assert dict(zip(header, row, strict=False))["READY"] == "true", out
    scaled = env.events("ScaledUp")
    assert [e["note"] for e in scaled] == ["Deployment model-a: 0 -> 2 replicas"]
    assert scaled[0]["regarding"]["uid"] == model["metadata"]["uid"]
    print(f"[controller] model-a ready {ready_after:.2f}s after kubectl apply (2 replicas)")

    # the scale subresource reads status.selector/replicas: kubectl scale works on the model
    kubectl_ok(env.cp, "scale", "-n", env.ns, "inferencemodel/model-a", "--replicas=1")
    wait_for(lambda: len(env.pods("model-a")) == 1, timeout=30, message="scaled to 1 pod")
    wait_for(lambda: env.status("model-a").get("replicas") == 1, timeout=30, message="status replicas 1")
    assert any(e["note"] == "Deployment model-a: 2 -> 1 replicas" for e in env.events("ScaledDown"))

    proc.check_alive()


def test_idle_model_scales_to_zero_after_its_cooldown(env: Env) -> None:
    env.start_controller()
    env.apply_model("model-idle", cooldownPeriod="3s")
    env.wait_ready("model-idle")
    started = max(p["status"]["startTime"] for p in env.pods("model-idle"))
    t_ready = time.monotonic()

    wait_for(lambda: env.model("model-idle")["spec"]["replicas"] == 0, timeout=30, message="spec.replicas 0")
    idle_detected = time.monotonic() - t_ready
    wait_for(lambda: not env.pods("model-idle"), timeout=30, message="pods gone")
    wait_for(lambda: (env.deployment("model-idle") or {})["spec"]["replicas"] == 0, timeout=10, message="dep 0")
    wait_for(
        lambda: env.condition("model-idle", "Ready").get("reason") == "ScaledToZero",
        timeout=30,
        message="Ready=False ScaledToZero",
    )
    assert env.status("model-idle")["ready"] is False
    notes = [e["note"] for e in env.events("IdleScaleDown")]
    assert len(notes) == 1 and "(cooldownPeriod 3s): replicas 1 -> 0" in notes[0], notes
    # a delay queue, not a poll: the scale-down lands within a second of the cooldown's end
    assert idle_detected < 3 + 2, f"took {idle_detected:.2f}s after ready (pod started {started})"
    print(f"[controller] idle scale-to-zero {idle_detected:.2f}s after ready (cooldown 3s)")

    # a person scales it up again with an ancient lastRequestTime: the first pod still gets its cooldown
    old = "2020-01-01T00:00:00Z"
    kubectl_ok(
        env.cp, "patch", "-n", env.ns, "inferencemodel/model-idle", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"lastRequestTime": old}}),
    )  # fmt: skip
    kubectl_ok(env.cp, "scale", "-n", env.ns, "inferencemodel/model-idle", "--replicas=1")
    env.wait_ready("model-idle")
    t_ready = time.monotonic()
    wait_for(lambda: env.model("model-idle")["spec"]["replicas"] == 0, timeout=30, message="idle again")
    assert time.monotonic() - t_ready >= 1.0  # not torn down before its replica had a chance to serve
    assert env.status("model-idle")["lastRequestTime"] == old  # the proxy's field is never rewritten


def test_sigkilled_leader_is_replaced_and_the_new_one_converges_without_flapping(env: Env) -> None:
    models = [f"model-{i}" for i in range(3)]
    deployments = Watcher(env.kube, f"/apis/apps/v1/namespaces/{env.ns}/deployments").start()
    specs = Watcher(env.kube, f"/apis/{GROUP}/v1alpha1/namespaces/{env.ns}/{PLURAL}").start()
    a, _ = env.start_controller("a")
    for name in models:
        env.apply_model(name, replicas=1)
    # kill the leader mid-reconcile: as soon as its first write lands, before it finished the others
    wait_for(lambda: env.deployment(models[0]) is not None, timeout=30, interval=0.02, message="first write")
    os.kill(a.pid, signal.SIGKILL)
    a.popen.wait(timeout=10)  # type: ignore[union-attr]
    t_kill = time.monotonic()

    b, b_port = env.start_controller("b", wait_leader=False)
    wait_for(lambda: "became leader" in b.log_path.read_text(), timeout=30, message="b takes over")
    takeover = time.monotonic() - t_kill
    for name in models:
        env.wait_ready(name)
    converged = time.monotonic() - t_kill
    lease = env.kube.get(LEASES.path(env.ns, "ibc-controller"))
    assert lease is not None
    assert lease["spec"]["holderIdentity"].endswith(f"_{b.pid}")
    assert lease["spec"]["leaseTransitions"] >= 1
    # the dead leader's lease (10 s) must run out first: no two leaders
    assert 9.0 <= takeover <= 10 + 2 + 5, f"took over after {takeover:.1f}s"

    # converged: several resyncs (every 2 s) write nothing more
    before = {n: env.model(n)["metadata"]["resourceVersion"] for n in models}
    generations = {n: env.deployment(n)["metadata"]["generation"] for n in models}  # type: ignore[index]
    wait_resyncs(b_port, len(models))
    assert {n: env.model(n)["metadata"]["resourceVersion"] for n in models} == before
    assert {n: env.deployment(n)["metadata"]["generation"] for n in models} == generations  # type: ignore[index]
    history = deployments.stop()
    model_history = specs.stop()
    for name in models:
        assert history.get(name) == [1], f"Deployment {name} replicas went {history.get(name)}"
        assert model_history.get(name) == [1], f"InferenceModel {name} replicas went {model_history.get(name)}"
    assert len(env.events("ScaledUp")) <= len(models)  # the new leader did not redo what the old one did
    print(f"[controller] SIGKILL -> new leader {takeover:.1f}s (lease 10s), all {len(models)} ready {converged:.1f}s")
    b.check_alive()


def test_observed_memory_from_prometheus_reaches_status_metrics_and_advice(env: Env) -> None:
    prom = PrometheusStub(used_bytes=75 * GI)
    try:
        proc, port = env.start_controller(
            "a", "--observed-memory", "prometheus", "--prometheus-url", prom.url, "--observe-interval-seconds", "0.5"
        )
        env.apply_model("model-obs", memory="80Gi")
        env.wait_ready("model-obs")
        status = wait_for(
            lambda: env.status("model-obs") if env.status("model-obs").get("observedPeakMemory") else None,
            timeout=30,
            message="observedPeakMemory in status",
        )
        assert status["declaredMemory"] == "80Gi"
        assert status["observedPeakMemory"] == "75Gi"
        assert status["utilizationPercent"] == 93
        assert status["recommendation"] == "Consider reducing memory to 78Gi for better packing"
        assert status["lastObservation"].endswith("Z")
        pod = env.pods("model-obs")[0]["metadata"]["name"]
        assert f'namespace="{env.ns}",pod="{pod}"' in prom.queries[-1]  # the template was filled per pod

        code, text = http_get(port, "/metrics")
        assert code == 200
        labels = f'model="model-obs",namespace="{env.ns}"'
        assert f"inference_model_memory_declared_bytes{{{labels}}} 8.589934592e+10" in text
        assert f"inference_model_memory_observed_peak_bytes{{{labels}}} 8.05306368e+10" in text
        assert f"inference_model_memory_utilization_ratio{{{labels}}} 0.9375" in text
        code, text = http_get(port, f"/models/model-obs/metrics?namespace={env.ns}")
        body = json.loads(text)
        assert code == 200 and body["observedPeakMemory"] == "75Gi" and body["recommendedMemory"] == "78Gi"
        assert http_get(port, "/models/nope/metrics")[0] == 404
        wait_for(
            lambda: (
                "model-obs declared 80Gi but observed peak is 75Gi (6% overprovisioned)" in proc.log_path.read_text()
            ),
            timeout=10,
            message="log hint",
        )

        prom.used_bytes = 76 * GI  # a new peak is written
        wait_for(lambda: env.status("model-obs")["observedPeakMemory"] == "76Gi", timeout=15, message="76Gi")
        prom.used_bytes = 10 * GI  # a lower reading never lowers the peak
        asked = len(prom.queries)
        wait_for(lambda: len(prom.queries) >= asked + 2, timeout=15, message="two lower readings")
        wait_resyncs(port, 1)
        assert env.status("model-obs")["observedPeakMemory"] == "76Gi"

        proc.stop()  # a restarted controller keeps the peak (read back from status)
        asked = len(prom.queries)
        _, port2 = env.start_controller("b", "--observed-memory", "prometheus", "--prometheus-url", prom.url)
        body = json.loads(http_get(port2, f"/models/{env.ns}/model-obs/metrics")[1])
        assert body["observedPeakMemoryBytes"] == 76 * GI
        # its first reading (10Gi) comes at once when it leads; the next one only after 30 s
        wait_for(lambda: len(prom.queries) > asked, timeout=15, message="a reading by the new leader")
        wait_resyncs(port2, 1)
        assert env.status("model-obs")["observedPeakMemory"] == "76Gi"
        assert env.model("model-obs")["spec"]["memory"] == "80Gi"  # advice only, never applied
    finally:
        prom.stop()


def test_template_that_cannot_become_a_deployment_gets_a_condition_and_an_event(env: Env) -> None:
    proc, port = env.start_controller()
    env.apply_model("model-bad", template={"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}})
    env.apply_model(
        "model-rejected",
        template=pod_template(containers=[{**PAUSE, "resources": {"requests": {"cpu": "lots"}}}]),
    )
    env.apply_model("model-good")

    def reconciled(name: str, reason: str) -> dict[str, Any] | None:
        cond = env.condition(name, "Reconciled")
        return cond if cond.get("reason") == reason else None

    bad = wait_for(lambda: reconciled("model-bad", "InvalidTemplate"), timeout=30, message="model-bad condition")
    assert bad["status"] == "False"
    assert bad["message"] == "spec.template.spec.containers must list at least one container"
    assert env.condition("model-bad", "Ready")["reason"] == "InvalidTemplate"
    assert env.deployment("model-bad") is None
    event = wait_for(lambda: env.events("InvalidTemplate"), timeout=10, message="InvalidTemplate event")
    assert any(e["note"] == bad["message"] and e["type"] == "Warning" for e in event)

    rejected = wait_for(
        lambda: reconciled("model-rejected", "InvalidTemplate"), timeout=30, message="API server's own refusal"
    )
    assert "the API server rejected Deployment model-rejected" in rejected["message"]
    assert "quantities must match" in rejected["message"] or "cpu" in rejected["message"]

    env.wait_ready("model-good")  # the others are still served
    wait_resyncs(port, 3)  # resyncs re-find the bad template: no second Event
    assert len([e for e in env.events("InvalidTemplate") if e["regarding"]["name"] == "model-bad"]) == 1

    env.apply_model("model-bad")  # fixed
    env.wait_ready("model-bad")
    assert env.condition("model-bad", "Reconciled")["reason"] == "DeploymentApplied"
    proc.check_alive()


def test_pending_pods_surface_the_schedulers_reason(env: Env) -> None:
    _, port = env.start_controller()
    env.apply_model("model-nowhere", nodeSelector={"inference-pool": "does-not-exist"})

    def refused() -> dict[str, Any] | None:
        cond = env.condition("model-nowhere", "Scheduled")
        return cond if cond.get("status") == "False" else None

    cond = wait_for(refused, timeout=60, message="Scheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert "0/" in cond["message"] and "nodes are available" in cond["message"], cond
    assert env.condition("model-nowhere", "Ready")["reason"] == "Unschedulable"
    events = wait_for(lambda: env.events("PodUnschedulable"), timeout=10, message="PodUnschedulable event")
    assert "nodes are available" in events[0]["note"]
    wait_resyncs(port, 1, rounds=3)  # the scheduler retries, resyncs run: still one Event (a series at most)
    assert len(env.events("PodUnschedulable")) == 1


def test_least_privilege_rbac_is_enough_and_no_more(env: Env) -> None:
    if env.cp.kubectl("get", "namespace", "ibc-system").returncode != 0:
        kubectl_ok(env.cp, "create", "namespace", "ibc-system")
    rbac = [d for d in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()) if d]
    for doc in rbac:  # the lease Role is namespaced: give this test's namespace the same Role
        if doc["kind"] in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = env.ns
    kubectl_ok(
        env.cp, "apply", "-f", str(DEPLOY / "serviceaccount.yaml"), "-f", "-",
        input="\n---\n".join(json.dumps(d) for d in rbac),
    )  # fmt: skip
    user = "system:serviceaccount:ibc-system:ibc-controller"
    kubeconfig = env.cp.write_user_kubeconfig(user)
    env.start_controller("sa", kubeconfig=kubeconfig)
    env.apply_model("model-rbac", cooldownPeriod="2s")
    env.wait_ready("model-rbac")
    assert env.kube.get(SERVICES.path(env.ns, "model-rbac")) is not None
    wait_for(lambda: env.model("model-rbac")["spec"]["replicas"] == 0, timeout=30, message="idle via /scale")
    assert env.events("IdleScaleDown")

    def can(*args: str) -> bool:
        res = env.cp.kubectl("auth", "can-i", *args, f"--as={user}", "-n", env.ns)
        return res.stdout.strip() == "yes"

    assert can("patch", "inferencemodels.inference.eh-ops.io", "--subresource=scale")
    assert can("create", "deployments.apps")
    assert not can("patch", "inferencemodels.inference.eh-ops.io")  # specs change only through /scale
    assert not can("delete", "pods")
    assert not can("get", "secrets")
    assert not can("update", "nodes")


def test_adopted_deployment_follows_the_model_and_outlives_it(env: Env) -> None:
    env.start_controller()
    existing = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "vllm", "namespace": env.ns},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "vllm"}},
            "template": {"metadata": {"labels": {"app": "vllm"}}, "spec": {"containers": [dict(PAUSE)]}},
        },
    }
    kubectl_ok(env.cp, "apply", "-f", "-", input=json.dumps(existing))
    wait_for(lambda: env.deployment("vllm"), timeout=30, message="Deployment vllm")
    env.apply_model("model-ref", template=None, deploymentRef={"name": "vllm"}, replicas=1, memory="24Gi")

    def adopted() -> dict[str, Any] | None:
        dep = env.deployment("vllm") or {}
        return dep if (dep.get("spec") or {}).get("replicas") == 1 else None

    dep = wait_for(adopted, timeout=30, message="vllm follows the model's replicas")
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app": "vllm", LABEL: "model-ref"}
    assert pod["metadata"]["annotations"]["inference.eh-ops.io/memory"] == "24Gi"
    assert pod["spec"]["schedulerName"] == SCHEDULER
    assert not dep["metadata"].get("ownerReferences")  # someone else's: not garbage-collected with the model
    env.wait_ready("model-ref")
    wait_for(lambda: len(env.pods("model-ref")) == 1, timeout=30, message="one labelled pod")
    assert env.condition("model-ref", "Reconciled")["reason"] == "DeploymentAdopted"
    assert any(e["note"] == "Deployment vllm: 3 -> 1 replicas" for e in env.events("ScaledDown"))

    canary = owned_canary(env, "model-ref")
    kubectl_ok(env.cp, "delete", "inferencemodel", "-n", env.ns, "model-ref")
    # The garbage collector deleted what the model owned: it has processed the deletion, and left vllm.
    wait_for(lambda: env.kube.get(canary) is None, timeout=GC_TIMEOUT, message="the model's owned canary collected")
    assert env.deployment("vllm") is not None


# kube-controller-manager's garbage collector rediscovers API resources every 30 s; an owner of a kind it
# has not discovered yet is retried with a growing backoff. In a real cluster the CRD is old news.
GC_TIMEOUT = 120


def owned_canary(env: Env, model: str) -> str:
    """A ConfigMap owned by InferenceModel `model`: once it is gone, the garbage collector has processed
    the model's deletion. Returns its path."""
    uid = env.model(model)["metadata"]["uid"]
    owner = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "InferenceModel", "name": model, "uid": uid}
    body = {"metadata": {"name": f"canary-{model}", "ownerReferences": [owner]}}
    env.kube.create(f"/api/v1/namespaces/{env.ns}/configmaps", body)
    return f"/api/v1/namespaces/{env.ns}/configmaps/canary-{model}"


def test_deleting_the_model_garbage_collects_its_deployment_and_service(env: Env, crd: float) -> None:
    env.apply_model("gc-probe")  # no controller yet: only the canary depends on it
    canary = owned_canary(env, "gc-probe")
    kubectl_ok(env.cp, "delete", "inferencemodel", "-n", env.ns, "gc-probe")
    wait_for(lambda: env.kube.get(canary) is None, timeout=GC_TIMEOUT, message="the GC knows InferenceModels")
    env.start_controller()
    env.apply_model("model-gc")
    env.wait_ready("model-gc")
    kubectl_ok(env.cp, "delete", "inferencemodel", "-n", env.ns, "model-gc")
    wait_for(lambda: env.deployment("model-gc") is None, timeout=30, message="Deployment garbage-collected")
    wait_for(lambda: not env.pods("model-gc"), timeout=30, message="pods gone")
    wait_for(lambda: env.kube.get(SERVICES.path(env.ns, "model-gc")) is None, timeout=30, message="Service gone")


class PrometheusStub:
    """A tiny Prometheus HTTP API: /api/v1/query answers `used_bytes` for any query naming a pod."""

    def __init__(self, used_bytes: int) -> None:
        self.used_bytes = used_bytes
        self.queries: list[str] = []
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    @Request.application  # type: ignore[misc]
    def _app(self, request: Request) -> Response:
        if request.path != "/api/v1/query":
            return Response(json.dumps({"status": "error", "error": "not found"}), 404)
        query = request.args.get("query", "")
        self.queries.append(query)
        result = [{"metric": {}, "value": [time.time(), str(self.used_bytes)]}] if 'pod="' in query else []
        body = {"status": "success", "data": {"resultType": "vector", "result": result}}
        return Response(json.dumps(body), mimetype="application/json")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
