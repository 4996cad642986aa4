"""The Helm chart installed on a real node, then the seed story told by containers of the project image.

Why: the cluster tier proves each decision against the real apiserver and scheduler, with simulated
pods. Only here does the image built from the Dockerfile run: under the chart's restricted security
context (uid 65532, read-only root), with its probes, RBAC from inside pods, the webhook reached by the
apiserver through its Service and certificate, the extender called by the chart's second scheduler, the
controller and the proxy, and model pods (``ibc mock-backend`` in the same image) reached at their pod IPs.

The story (tests run in file order on module state; run the module whole):
1-2. ``helm install``: every Deployment Available, no CrashLoopBackOff, uid 65532 on a read-only root.
3. model-a (80Gi) runs in a container placed by the chart's scheduler through the extender and is
   served through the proxy's Service, the proxy dialling the model pod's IP.
4. model-b (60Gi) gets the immediate 429 with the seed's numbers (60Gi requested, 48Gi available,
   blocked by model-a); ``kubectl scale`` is refused by the webhook in its pod with the same words.
5. A real Prometheus scrapes every component and, through the kubelet's resource metrics, the model
   pods; the controller's observed-memory source reads model-a's memory from it into the model's status.
6. model-a idles out: the controller scales it to zero and its container is gone from containerd.
7. 50 concurrent requests for model-b, sent at zero, are held through its cold start (a real container
   start and a readiness probe that passes once the mock has "loaded") and all served.
8. Every panel of the chart's Grafana dashboard, evaluated against that Prometheus, finds its series
   (or, for counts of what never happened here, at least its metric families are scraped).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import yaml

from tests.cluster.harness import free_port, wait_for
from tests.cluster.test_seed_e2e import IDLE, chat, tokens
from tests.pods.conftest import CHART, RELEASE, RELEASE_NAMESPACE, PodsCluster
from tests.pods.node import GATEWAY
from tests.pods.prometheus import POD_MEMORY_QUERY, Prometheus

# The first test's setup installs the chart and waits for it (minutes on a loaded 2-core machine).
pytestmark = pytest.mark.timeout(900)

MODELS_NAMESPACE = "models"
SCHEDULER_NAME = "inference-budget-scheduler"
MODEL_PORT = 8000
COOLDOWN_A_SECONDS = 45
LOAD_SECONDS = 3.0  # model-b's mock answers 503 on /health this long after it starts ("loading weights")
BURST = 50
DEPLOYMENTS = ("controller", "extender", "proxy", "scheduler", "webhook")


@dataclass
class Story:
    cluster: PodsCluster
    proxy_url: str
    prometheus: Prometheus
    notes: dict[str, Any] = field(default_factory=dict)

    def kubectl(self, *args: str, input: str | None = None) -> Any:
        return self.cluster.kubectl(*args, input=input)

    def model(self, name: str) -> dict[str, Any]:
        return dict(self.cluster.get_json("inferencemodel", name, "-n", MODELS_NAMESPACE))

    def pods(self, model: str) -> list[dict[str, Any]]:
        items = self.cluster.get_json("pods", "-n", MODELS_NAMESPACE, "-l", f"inference.eh-ops.io/model={model}")[
            "items"
        ]
        return list(items)

    def openai(self, timeout_seconds: float = 150) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key="unused", max_retries=0, timeout=timeout_seconds)


def model_manifest(name: str, memory: str, replicas: int, cooldown: str, image: str, *flags: str) -> dict[str, Any]:
    """An InferenceModel whose pods are the project image running ``ibc mock-backend``."""
    return {
        "apiVersion": "inference.eh-ops.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name, "namespace": MODELS_NAMESPACE},
        "spec": {
            "modelName": name,
            "memory": memory,
            "replicas": replicas,
            "cooldownPeriod": cooldown,
            "port": MODEL_PORT,
            "nodeSelector": {"inference-pool": "gpu-nodes"},
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "server",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": ["mock-backend", "--bind", f"0.0.0.0:{MODEL_PORT}", "--model", name, *flags],
                            "ports": [{"name": "http", "containerPort": MODEL_PORT}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": MODEL_PORT},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                }
            },
        },
    }


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def _deployments_available(cluster: PodsCluster) -> dict[str, str]:
    """Deployment -> "available/desired"; raises if a container of the release crash-loops."""
    for pod in cluster.get_json("pods", "-n", RELEASE_NAMESPACE)["items"]:
        for cs in pod.get("status", {}).get("containerStatuses", []) + pod.get("status", {}).get(
            "initContainerStatuses", []
        ):
            if cs.get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff":
                raise AssertionError(f"{pod['metadata']['name']}/{cs['name']} is in CrashLoopBackOff")
    out = {}
    for d in cluster.get_json("deployments", "-n", RELEASE_NAMESPACE)["items"]:
        st = d.get("status", {})
        out[d["metadata"]["name"]] = f"{st.get('availableReplicas', 0)}/{d['spec']['replicas']}"
    return out


@pytest.fixture(scope="module")
def story(pods_cluster: PodsCluster) -> Iterator[Story]:
    cluster = pods_cluster
    prometheus = Prometheus(cluster.cp, cluster.cp.work_dir.parent / "prometheus", GATEWAY, free_port())
    # The controller reads its pods' memory from that Prometheus (advice only), every few seconds.
    values = cluster.cp.work_dir / "values-pods.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "controller": {
                    "observedMemory": "prometheus",
                    "prometheusUrl": prometheus.url,
                    "extraArgs": [f"--prometheus-query={POD_MEMORY_QUERY}", "--observe-interval-seconds=3"],
                }
            }
        )
    )
    t0 = time.monotonic()
    res = cluster.helm_cmd(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--set",
        f"image.repository={cluster.project_repository}",
        "--set",
        f"image.tag={cluster.project_tag}",
        "--values",
        str(values),
    )
    assert res.returncode == 0, f"helm install failed:\n{res.stdout}\n{res.stderr}"
    cluster.timings["helm install"] = time.monotonic() - t0

    def first_running() -> bool:
        pods = cluster.get_json("pods", "-n", RELEASE_NAMESPACE)["items"]
        return any(p.get("status", {}).get("phase") == "Running" for p in pods)

    wait_for(first_running, timeout=180, interval=0.2, message="a pod of the release Running")
    cluster.timings["first pod Running (after helm install)"] = time.monotonic() - t0

    def all_available() -> bool:
        state = _deployments_available(cluster)
        return len(state) == len(DEPLOYMENTS) and all(a == b for a, b in (v.split("/") for v in state.values()))

    wait_for(
        all_available,
        timeout=420,
        interval=1.0,
        message=lambda: f"every Deployment Available: {_deployments_available(cluster)}\n{_pod_summary(cluster)}",
    )
    cluster.timings["every Deployment Available (after helm install)"] = time.monotonic() - t0
    proxy_ip = cluster.get_json("service", f"{RELEASE}-proxy", "-n", RELEASE_NAMESPACE)["spec"]["clusterIP"]
    cas = {}
    prometheus.work_dir.mkdir(parents=True, exist_ok=True)
    for component in ("webhook", "extender"):  # their serving certificates chain to these (ibc certs bootstrap)
        secret = cluster.get_json("secret", f"{RELEASE}-{component}-tls", "-n", RELEASE_NAMESPACE)
        cas[component] = prometheus.work_dir / f"{component}-ca.crt"
        cas[component].write_bytes(base64.b64decode(secret["data"]["ca.crt"]))
    kubelet = f"127.0.0.1:{cluster.node.kubelet_port}"
    prometheus.discover(RELEASE_NAMESPACE)
    prometheus.start(prometheus.config(RELEASE, RELEASE_NAMESPACE, cas, kubelet))
    story = Story(cluster, f"http://{proxy_ip}:80", prometheus)
    try:
        yield story
    finally:
        prometheus.stop()
        cluster.notes.update(story.notes)


def _pod_summary(cluster: PodsCluster) -> str:
    res = cluster.kubectl("get", "pods", "-A", "-o", "wide")
    return res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------- 1. the chart


def test_1_the_chart_runs_as_installed_with_the_built_image(story: Story) -> None:
    cluster = story.cluster
    state = _deployments_available(cluster)
    assert sorted(state) == sorted(f"{RELEASE}-{d}" for d in DEPLOYMENTS), state
    assert all(a == b and a != "0" for a, b in (v.split("/") for v in state.values())), state
    pods = cluster.get_json("pods", "-n", RELEASE_NAMESPACE)["items"]
    node_name = cluster.node.name
    restarts = {}
    for pod in pods:
        st = pod["status"]
        if st["phase"] == "Succeeded":  # the certificate bootstrap Job's pod
            continue
        assert pod["spec"]["nodeName"] == node_name
        assert st["phase"] == "Running", (pod["metadata"]["name"], st["phase"])
        for cs in st["containerStatuses"]:
            assert cs["containerID"].startswith("containerd://"), cs
            restarts[f"{pod['metadata']['name']}/{cs['name']}"] = cs["restartCount"]
            if cs["name"] != "kube-scheduler":
                assert cs["image"].endswith(cluster.images.project.name.split("/", 1)[1]), cs["image"]
    cluster.notes["restarts"] = {k: v for k, v in restarts.items() if v}
    assert all(v == 0 for v in restarts.values()), restarts
    # The certificate bootstrap Job ran to completion in the image, and its CA reached the webhook config.
    jobs = cluster.get_json("jobs", "-n", RELEASE_NAMESPACE)["items"]
    assert jobs and all(j["status"].get("succeeded") == 1 for j in jobs), [j["status"] for j in jobs]
    hook = cluster.get_json("validatingwebhookconfiguration", f"{RELEASE}-webhook")
    assert all(w["clientConfig"].get("caBundle") for w in hook["webhooks"]), "caBundle not patched"
    assert all(w["clientConfig"]["service"]["name"] == f"{RELEASE}-webhook" for w in hook["webhooks"])


def test_2_the_root_filesystem_is_read_only_and_the_user_is_65532(story: Story) -> None:
    cluster = story.cluster
    (pod,) = cluster.get_json(
        "pods",
        "-n",
        RELEASE_NAMESPACE,
        "-l",
        "app.kubernetes.io/component=proxy",
        "--field-selector=status.phase=Running",
    )["items"][:1]
    script = (
        "import os, tempfile\n"
        "print(os.getuid(), os.getgid())\n"
        "try:\n    open('/opt/ibc/probe', 'w')\nexcept OSError as e:\n    print('root:', e.strerror)\n"
        "with tempfile.NamedTemporaryFile(dir='/tmp') as f:\n    print('tmp: writable')\n"
    )
    res = cluster.kubectl(
        "exec", "-n", RELEASE_NAMESPACE, pod["metadata"]["name"], "-c", "proxy", "--", "python", "-c", script
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["65532 65532", "root: Read-only file system", "tmp: writable"], res.stdout


# ----------------------------------------------------------------------------------------------- 2-5. the story


@pytest.fixture(scope="module")
def models(story: Story) -> Story:
    image = story.cluster.images.project.name
    res = story.kubectl("create", "namespace", MODELS_NAMESPACE)
    assert res.returncode == 0, res.stderr
    docs = [
        model_manifest("model-a", "80Gi", 1, f"{COOLDOWN_A_SECONDS}s", image),
        model_manifest("model-b", "60Gi", 0, "10m", image, "--startup-delay", str(LOAD_SECONDS)),
    ]
    res = story.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    assert res.returncode == 0, res.stderr
    return story


def test_3_model_a_runs_in_a_container_and_is_served_through_the_proxy_at_its_pod_ip(models: Story) -> None:
    story = models
    t0 = time.monotonic()
    wait_for(
        lambda: any(pod_ready(p) for p in story.pods("model-a")),
        timeout=180,
        interval=0.3,
        message=lambda: f"model-a's pod Ready: {_pod_summary(story.cluster)}",
    )
    story.notes["model-a Ready after apply"] = round(time.monotonic() - t0, 1)
    (pod,) = story.pods("model-a")
    assert pod["spec"]["schedulerName"] == SCHEDULER_NAME
    assert pod["spec"]["nodeName"] == story.cluster.node.name
    assert pod["status"]["podIP"].startswith("10.250."), pod["status"]["podIP"]
    events = story.cluster.get_json(
        "events", "-n", MODELS_NAMESPACE, "--field-selector", f"involvedObject.name={pod['metadata']['name']}"
    )
    scheduled = [e for e in events["items"] if e["reason"] == "Scheduled"]
    assert (
        scheduled and (scheduled[0].get("reportingComponent") or scheduled[0]["source"]["component"]) == SCHEDULER_NAME
    )
    # The extender bound it (bindVerb): its metric, read from inside the cluster network.
    wait_for(
        lambda: story.model("model-a").get("status", {}).get("ready") is True,
        timeout=60,
        interval=0.3,
        message="model-a's status ready",
    )
    ai = story.openai()
    answer = wait_for(
        lambda: chat(ai, "model-a"), timeout=30, interval=0.5, message="model-a answers through the proxy"
    )
    assert answer == tokens(3)
    assert chat(ai, "model-a", stream=True, max_tokens=4) == tokens(4)


def test_4_model_b_gets_the_seed_429_and_kubectl_scale_is_refused_by_the_webhook_pod(models: Story) -> None:
    story = models
    ai = story.openai()
    busy_at = time.time()
    assert chat(ai, "model-a") == tokens(3)

    def recorded() -> bool:
        last = story.model("model-a").get("status", {}).get("lastRequestTime") or ""
        return bool(last) and time.mktime(time.strptime(last, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone >= int(busy_at)

    wait_for(recorded, timeout=30, interval=0.3, message="the proxy recorded model-a's request")
    started = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as caught:
        chat(ai, "model-b")
    story.notes["429 seconds"] = round(time.perf_counter() - started, 3)
    body = caught.value.response.json()
    assert body["error"]["code"] == "insufficient_memory"  # OpenAI's envelope (#15)
    assert {k: body["requested"][k] for k in ("model", "memory")} == {"model": "model-b", "memory": "60Gi"}
    assert body["available"] == "48Gi"
    assert [(b["model"], b["memory"]) for b in body["blocking"]] == [("model-a", "80Gi")]
    assert body["message"].startswith(
        "model-b needs 60Gi in pool inference-pool=gpu-nodes; 48Gi available; blocked by model-a (80Gi, idle "
    )
    assert story.model("model-b")["spec"]["replicas"] == 0

    refused = story.kubectl("scale", "inferencemodel/model-b", "-n", MODELS_NAMESPACE, "--replicas=1")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert 'admission webhook "' in refused.stderr and "denied the request: insufficient_memory: " in refused.stderr, (
        refused.stderr
    )
    webhook_message = refused.stderr.split("denied the request: insufficient_memory: ", 1)[1].strip()
    webhook_message = re.sub(r"; retry after [0-9]+s$", "", webhook_message)
    assert IDLE.sub("idle Ns", webhook_message) == IDLE.sub("idle Ns", body["message"]), (webhook_message, body)
    assert story.model("model-b")["spec"]["replicas"] == 0


def test_5_prometheus_scrapes_every_component_and_the_controller_observes_model_a(models: Story) -> None:
    prom = models.prometheus
    want = {"ibc-http": 4, "ibc-webhook": 2, "ibc-extender": 1, "kubelet-resource": 1}  # proxies + controllers

    def all_up() -> bool:
        up: dict[str, int] = {}
        for t in prom.api("targets")["activeTargets"]:
            if t["health"] == "up":
                up[t["labels"]["job"]] = up.get(t["labels"]["job"], 0) + 1
        return up == want

    wait_for(all_up, timeout=60, interval=1, message=lambda: f"every target up: {prom.targets()}")
    (pod,) = models.pods("model-a")
    promql = POD_MEMORY_QUERY.replace("{namespace}", MODELS_NAMESPACE).replace("{pod}", pod["metadata"]["name"])
    series = prom.query(promql)
    assert len(series) == 1 and float(series[0]["value"][1]) > 1e6, series
    # The chart's scheduler called the extender, which bound model-a's pod itself (bindVerb).
    bound = prom.query('sum(ibc_extender_decisions_total{verb="bind",result="bound"})')
    assert bound and float(bound[0]["value"][1]) >= 1, bound
    # The controller (in its pod) asked that Prometheus for model-a's pod and wrote the advice to status.

    def observed() -> dict[str, Any] | None:
        status = models.model("model-a").get("status", {})
        return status if status.get("observedPeakMemory") else None

    status = wait_for(observed, timeout=30, interval=0.5, message="model-a's observed peak in its status")
    models.notes["model-a observed peak"] = status["observedPeakMemory"]
    assert status["declaredMemory"] == "80Gi"


def test_6_model_a_idles_out_and_its_container_is_removed(models: Story) -> None:
    story = models
    (pod,) = story.pods("model-a")
    container_id = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    assert container_id in story.cluster.node.ctr("containers", "list", "--quiet").stdout.split()
    wait_for(
        lambda: story.model("model-a")["spec"].get("replicas") == 0 and not story.pods("model-a"),
        timeout=COOLDOWN_A_SECONDS + 90,
        interval=0.5,
        message=lambda: f"model-a scaled to zero: {story.model('model-a')['spec']}",
    )
    wait_for(
        lambda: container_id not in story.cluster.node.ctr("containers", "list", "--quiet").stdout.split(),
        timeout=30,
        interval=0.3,
        message="model-a's container removed from containerd",
    )


def test_7_fifty_concurrent_requests_are_held_through_model_b_s_cold_start(models: Story) -> None:
    story = models
    wait_for(
        lambda: {m["id"]: m["state"] for m in _proxy_models(story)}.get("model-a") == "stopped",
        timeout=30,
        interval=0.3,
        message="the proxy sees model-a stopped",
    )
    ai = story.openai(timeout_seconds=180)
    barrier = threading.Barrier(BURST)
    sent: dict[int, float] = {}
    results: dict[int, tuple[str, float]] = {}
    failures: dict[int, str] = {}

    def one(i: int) -> None:
        barrier.wait(timeout=60)
        sent[i] = time.monotonic()
        try:
            results[i] = (chat(ai, "model-b", stream=i % 3 == 0, max_tokens=4), time.monotonic())
        except Exception as exc:
            failures[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(i,), name=f"client-{i}") for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "some clients never got an answer"
    assert failures == {}, f"{len(failures)} of {BURST} requests lost: {failures}"
    assert all(text == tokens(4) for text, _ in results.values())
    (pod,) = story.pods("model-b")
    assert pod["spec"]["nodeName"] == story.cluster.node.name and pod["spec"]["schedulerName"] == SCHEDULER_NAME
    started_at = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    created = _ts(pod["metadata"]["creationTimestamp"])
    started = _ts(started_at)
    ready = _ts(next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "Ready"))
    first_sent = min(sent.values())
    latencies = sorted(done - sent[i] for i, (_, done) in results.items())
    story.notes.update(
        {
            "model-b pod created -> container started (s)": started - created,
            "model-b container started -> Ready (s)": ready - started,
            "burst first served (s)": round(latencies[0], 2),
            "burst last served (s)": round(latencies[-1], 2),
        }
    )
    # Every request was sent before the pod was Ready: all were held, then served.
    assert max(sent.values()) - first_sent < 5
    assert ready - started >= LOAD_SECONDS - 1, (started_at, ready)
    assert min(done for _, done in results.values()) - first_sent >= LOAD_SECONDS


def _proxy_models(story: Story) -> list[dict[str, Any]]:
    import httpx

    return list(httpx.get(f"{story.proxy_url}/v1/models", timeout=10).json()["data"])


def _ts(value: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((panel["title"], target["expr"]))
    return out


#: Panels counting what the story never makes happen: their queries must be valid, and an empty answer
#: is the right one (a labelled counter that never counted is not even exposed yet).
NOTHING_HAPPENED = {
    "Backend errors": "no model server failed",
    "Ledger conflicts and bad requests": "no admission ledger conflict, no malformed review",
    "Writes, leadership, observation errors": "observation errors: Prometheus always answered",
    "Nodes refused, by reason": "the one node never refused a pod",
}


def test_8_every_dashboard_panel_finds_its_series_in_prometheus(models: Story) -> None:
    prom = models.prometheus
    expressions = [
        (title, expr.replace("$__rate_interval", "2m").replace("$model", ".*").replace("$namespace", ".*"))
        for title, expr in _dashboard_expressions()
    ]
    assert len(expressions) >= 20, expressions
    empty: dict[str, list[str]] = {}

    def every_panel_answers() -> bool:
        empty.clear()
        for title, promql in expressions:
            if not prom.query(promql):  # raises on an invalid expression
                empty.setdefault(title, []).append(promql)
        return not set(empty) - set(NOTHING_HAPPENED)

    # The last scrapes of the burst's counters may be a scrape interval behind.
    wait_for(every_panel_answers, timeout=30, interval=2, message=lambda: f"series for every panel; empty: {empty}")
    models.notes["dashboard panels with no series (nothing of the kind happened)"] = sorted(empty)
