"""The load layer on the real control plane: the controller asks through /scale, the webhook decides.

Why here: only a real kube-apiserver sends the controller's `PATCH .../scale` through the real admission
webhook (over TLS, registered by its ValidatingWebhookConfiguration), and only `kubectl describe` shows
what an operator sees when the budget refuses. Running: the CRD, `ibc webhook`, `ibc controller`, a
second kube-scheduler for the model pods (no extender: the extender's own test covers placement), and
the pod simulator as the kubelet, on one 100Gi node.

The story: `side` (60Gi) runs. `warm` (30Gi, minReplicas 2, created with 0 replicas) is scaled up by the
controller one step at a time: 0 -> 1 fits, 1 -> 2 does not (60 + 2 x 30 > 100): the webhook denies it and
`kubectl describe inferencemodel warm` shows a WarmScaleBlocked Event, "warm wants 2, budget allows 1",
with the webhook's reason naming `side`. Once `side` is scaled to 0, the controller's next ask is admitted
and `warm` reaches its 2 replicas. Declared memory bound on the node never exceeds 100Gi (sampled).

The load story (test_load_...): every component runs, the extender too (the scheduler's second profile
places the model pods through it). `chat` (30Gi, minReplicas 1, maxReplicas 3) has one replica; each of
its pods is one mock backend (`--max-running 1`) on its own loopback address (the pod simulator hands
them out from the template's list), and clients of the official `openai` package keep them queueing
through `ibc proxy` (least-outstanding routing). The controller reads each pod's queue from its own
`/metrics` (vLLM's `vllm:num_requests_waiting`) and steps 1 -> 2 through /scale; 2 -> 3 is refused by
the webhook (35 + 3 x 30 > 100) and `kubectl describe` shows the LoadScaleBlocked Event naming `side`,
the status and the controller's gauges say wanted 3 / allowed 2, and so does the proxy's `/v1/models`.
Once `side` is scaled to 0 the next ask is admitted and the third replica serves; when the clients stop,
it steps back down to minReplicas. Run twice: with the replicas' vLLM gauges, and with mocks that serve no
`/metrics` (`--no-metrics`), where the controller reads the proxy's requests in flight per replica
(`--proxy-metrics-url`, `ibc_proxy_backend_in_flight`) beyond `spec.load.concurrency: 1`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from budget.quantity import parse_quantity
from tests.cluster import components as comp
from tests.cluster.harness import POD_IP_ANNOTATION, ControlPlane, PodSimulator, free_port, wait_for

GI = 2**30
CAPACITY = 100 * GI
LEDGER_NAMESPACE = "ibc-system"
LABEL = "inference.eh-ops.io/model"
MEMORY = "inference.eh-ops.io/memory"


def model(name: str, memory: str, node: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{comp.GROUP}/{comp.VERSION}",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {
            "modelName": name,
            "memory": memory,
            "cooldownPeriod": "0",
            "nodeSelector": {"kubernetes.io/hostname": node},  # the pool: this test's node only
            "template": {"spec": {"containers": [{"name": "server", "image": "registry.k8s.io/pause:3.10"}]}},
            **spec,
        },
    }


class Sampler:
    """Declared memory of the live model pods bound to the node, sampled until stopped; the largest seen."""

    def __init__(self, cp: ControlPlane, node: str) -> None:
        self.cp, self.node, self.peak, self.samples = cp, node, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            res = self.cp.kubectl("get", "pods", "-A", "--field-selector", f"spec.nodeName={self.node}", "-o", "json")
            if res.returncode != 0:
                continue
            held = sum(
                parse_quantity(p["metadata"]["annotations"][MEMORY])
                for p in json.loads(res.stdout)["items"]
                if MEMORY in (p["metadata"].get("annotations") or {}) and not p["metadata"].get("deletionTimestamp")
            )
            self.peak, self.samples = max(self.peak, held), self.samples + 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def scene(
    control_plane: ControlPlane,
    pod_simulator: PodSimulator,
    scheduler_factory: Callable[..., Any],
    node_factory: Callable[..., Any],
    namespace: str,
    tmp_path: Path,
) -> Iterator[tuple[str, str]]:
    cp = control_plane
    suffix = secrets.token_hex(3)
    node, webhook_name, ledger = f"warm-{suffix}", f"ibc-webhook-load-{suffix}", f"ibc-load-ledger-{suffix}"
    comp.install_crd(cp)
    cp.kubectl("create", "namespace", LEDGER_NAMESPACE)  # may exist already (another module made it)
    node_factory(node, capacity="100Gi")
    scheduler_factory(comp.SCHEDULER_NAME)
    servers = [
        comp.launch_webhook(cp, tmp_path, ledger_namespace=LEDGER_NAMESPACE, ledger_name=ledger),
        comp.launch_controller(cp, tmp_path, namespace=namespace),
    ]
    try:
        webhook, controller = servers
        webhook.wait_ready()
        assert webhook.ca is not None
        comp.register_webhook(
            cp,
            comp.webhook_configuration(webhook_name, f"{webhook.url}/validate", webhook.ca.read_bytes(), [namespace]),
        )
        controller.wait_ready()
        yield namespace, node
    finally:
        comp.unregister_webhook(cp, webhook_name)
        cp.kubectl("delete", "inferencemodels", "--all", "-n", namespace, "--wait=false")
        tails = comp.stop_all(servers)
        for name, tail in tails.items():
            print(f"--- {name} (last lines) ---\n{tail}")  # shown when the test fails
        cp.kubectl("delete", "configmap", ledger, "-n", LEDGER_NAMESPACE)


def test_min_replicas_are_started_through_the_webhook_and_a_refusal_shows_in_kubectl_describe(
    control_plane: ControlPlane, scene: tuple[str, str]
) -> None:
    cp = control_plane
    namespace, node = scene

    def kubectl(*args: str, input: str | None = None) -> str:
        res = cp.kubectl(*args, "-n", namespace, input=input, timeout=90)
        assert res.returncode == 0, res.stderr
        return str(res.stdout)

    def spec_replicas(name: str) -> int:
        return int(json.loads(kubectl("get", "inferencemodel", name, "-o", "json"))["spec"]["replicas"])

    def running(name: str) -> int:
        pods = json.loads(kubectl("get", "pods", "-l", f"{LABEL}={name}", "-o", "json"))["items"]
        return sum(
            1 for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        )

    with Sampler(cp, node) as sampler:
        kubectl("apply", "-f", "-", input=json.dumps(model("side", "60Gi", node, replicas=1)))
        wait_for(lambda: running("side") == 1, timeout=60, message="side running")

        kubectl(
            "apply", "-f", "-", input=json.dumps(model("warm", "30Gi", node, replicas=0, minReplicas=2, maxReplicas=2))
        )
        wait_for(lambda: spec_replicas("warm") == 1, timeout=60, message="warm scaled to 1 by the controller")

        def described() -> str | None:
            text = kubectl("describe", "inferencemodel", "warm")
            return text if "WarmScaleBlocked" in text else None

        text = wait_for(described, timeout=60, message="a WarmScaleBlocked Event in kubectl describe")
        assert "warm wants 2, budget allows 1" in text, text
        assert "side" in text.split("WarmScaleBlocked", 1)[1], text  # the webhook's reason names who blocks
        assert spec_replicas("warm") == 1
        wait_for(lambda: running("warm") == 1, timeout=60, message="warm's first replica running")

        kubectl("scale", "inferencemodel/side", "--replicas=0")  # a decrease: always admitted
        wait_for(lambda: spec_replicas("warm") == 2, timeout=60, message="warm scaled to 2 once side left")
        wait_for(lambda: running("warm") == 2, timeout=60, message="warm's two replicas running")
        assert "minReplicas 2: replicas 1 -> 2" in kubectl("describe", "inferencemodel", "warm")
    assert sampler.samples > 0
    assert 0 < sampler.peak <= CAPACITY, sampler.peak / GI


# ----------------------------------------------------------------------------------------------- load

CLIENTS = 8  # 4 per replica on 2 (1 running, 3 waiting: saturated at 2); on 3, one of them has room
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")  # one per replica of chat: its pods' IPs, its mocks' addresses
LOAD_SECONDS = 120.0  # the most the clients run


def served_model(name: str, memory: str, node: str, port: int, **spec: Any) -> dict[str, Any]:
    """A model whose pods the simulator reports at HOSTS (one each), where its mock backends listen on `port`."""
    body = model(name, memory, node, port=port, **spec)
    body["spec"]["template"] = {
        "metadata": {"annotations": {POD_IP_ANNOTATION: ",".join(HOSTS)}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "server", "image": "registry.k8s.io/pause:3.10", "ports": [{"containerPort": port}]}
            ],
        },
    }
    return body


class Clients:
    """`CLIENTS` threads asking `chat` through the proxy, one request after another, until stopped."""

    def __init__(self, proxy_url: str) -> None:
        self.proxy_url = proxy_url
        self.stop = threading.Event()
        self.answered = 0
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        ai = openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + LOAD_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                ai.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
                self.answered += 1
            except Exception as exc:  # every request must be answered: collected and asserted on
                self.errors.append(repr(exc))

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(90)


# Where the controller reads each replica's load: (the mocks' extra flags, spec.load's extra fields).
SIGNALS = {
    # vLLM's gauges at each pod's own /metrics (the mock serves them).
    "replica-metrics": ((), {}),
    # A backend without metrics: the proxy's requests in flight per replica (--proxy-metrics-url) beyond
    # spec.load.concurrency are its queue.
    "proxy-count": (("--no-metrics",), {"concurrency": 1}),
}


@pytest.fixture(params=SIGNALS)
def load_scene(
    request: pytest.FixtureRequest,
    control_plane: ControlPlane,
    pod_simulator: PodSimulator,
    scheduler_factory: Callable[..., Any],
    node_factory: Callable[..., Any],
    namespace: str,
    tmp_path: Path,
) -> Iterator[tuple[str, str, int, dict[str, comp.Server], str]]:
    cp = control_plane
    signal = str(request.param)
    suffix = secrets.token_hex(3)
    node, webhook_name, ledger = f"load-{suffix}", f"ibc-webhook-loadup-{suffix}", f"ibc-loadup-ledger-{suffix}"
    comp.install_crd(cp)
    cp.kubectl("create", "namespace", LEDGER_NAMESPACE)  # may exist already (another module made it)
    node_factory(node, capacity="100Gi")  # before the extender and the proxy list nodes
    port = free_port()
    servers: list[comp.Server] = []
    try:
        proxy = comp.launch_proxy(cp, tmp_path, "--routing", "least-outstanding", namespace=namespace)
        servers += [
            comp.launch_extender(cp, tmp_path),
            comp.launch_webhook(cp, tmp_path, ledger_namespace=LEDGER_NAMESPACE, ledger_name=ledger),
            comp.launch_controller(cp, tmp_path, "--proxy-metrics-url", proxy.url, namespace=namespace),
            proxy,
        ]
        flags = (*MOCK_FLAGS, *SIGNALS[signal][0])
        servers += [comp.launch_mock_backend(tmp_path, "chat", port, *flags, host=host) for host in HOSTS]
        byname = {s.name: s for s in servers}
        extender, webhook = byname["extender"], byname["webhook"]
        extender.wait_ready()
        assert extender.ca is not None
        scheduler_factory(comp.SCHEDULER_NAME, config=comp.scheduler_config(extender.url, extender.ca))
        webhook.wait_ready()
        assert webhook.ca is not None
        comp.register_webhook(
            cp,
            comp.webhook_configuration(webhook_name, f"{webhook.url}/validate", webhook.ca.read_bytes(), [namespace]),
        )
        for server in servers[2:]:
            server.wait_ready()
        yield namespace, node, port, byname, signal
    finally:
        comp.unregister_webhook(cp, webhook_name)
        cp.kubectl("delete", "inferencemodels", "--all", "-n", namespace, "--wait=false")
        tails = comp.stop_all(servers)
        for name, tail in tails.items():
            print(f"--- {name} (last lines) ---\n{tail}")  # shown when the test fails
        cp.kubectl("delete", "configmap", ledger, "-n", LEDGER_NAMESPACE)


MOCK_FLAGS = ("--latency", "1", "--tokens", "2", "--max-running", "1")


def served(mock: comp.Server) -> float:
    """Prompt tokens the mock was asked for (vllm:prefix_cache_queries_total): > 0 once it served."""
    for line in mock.get("/metrics").text.splitlines():
        if line.startswith("vllm:prefix_cache_queries_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def gauges(server: comp.Server, model_name: str) -> dict[str, float]:
    """ibc_model_replicas_{wanted,allowed} for one model from a /metrics page."""
    out = {}
    for line in server.get("/metrics").text.splitlines():
        for which in ("wanted", "allowed"):
            if line.startswith(f'ibc_model_replicas_{which}{{model="{model_name}",'):
                out[which] = float(line.rsplit(" ", 1)[1])
    return out


def test_load_steps_replicas_through_scale_and_the_webhook_and_a_refusal_shows_everywhere(
    control_plane: ControlPlane, load_scene: tuple[str, str, int, dict[str, comp.Server], str]
) -> None:
    cp = control_plane
    namespace, node, port, servers, signal = load_scene
    controller, proxy = servers["controller"], servers["proxy"]

    def kubectl(*args: str, input: str | None = None) -> str:
        res = cp.kubectl(*args, "-n", namespace, input=input, timeout=90)
        assert res.returncode == 0, res.stderr
        return str(res.stdout)

    def chat() -> dict[str, Any]:
        return dict(json.loads(kubectl("get", "inferencemodel", "chat", "-o", "json")))

    def running(name: str) -> int:
        pods = json.loads(kubectl("get", "pods", "-l", f"{LABEL}={name}", "-o", "json"))["items"]
        return sum(
            1 for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        )

    load = {"waitingSaturation": 2, "scaleUpStabilization": "1s", "scaleDownStabilization": "2s", **SIGNALS[signal][1]}
    with Sampler(cp, node) as sampler:
        kubectl("apply", "-f", "-", input=json.dumps(model("side", "35Gi", node, replicas=1)))
        wait_for(lambda: running("side") == 1, timeout=60, message="side running")
        body = served_model("chat", "30Gi", node, port, replicas=1, minReplicas=1, maxReplicas=3, load=load)
        kubectl("apply", "-f", "-", input=json.dumps(body))
        wait_for(lambda: running("chat") == 1, timeout=60, message="chat running")
        # No load yet: a second's look at an idle replica keeps it at 1 (the rule holds; not a step down).
        wait_for(lambda: chat()["status"].get("replicasWanted") == 1, timeout=30, message="status: wants 1")
        assert chat()["spec"]["replicas"] == 1

        clients = Clients(proxy.url)
        try:
            wait_for(lambda: chat()["spec"]["replicas"] == 2, timeout=60, message="chat stepped to 2 by the controller")
            wait_for(lambda: running("chat") == 2, timeout=60, message="chat's second replica running")

            def described() -> str | None:
                text = kubectl("describe", "inferencemodel", "chat")
                return text if "LoadScaleBlocked" in text else None

            text = wait_for(described, timeout=60, message="a LoadScaleBlocked Event in kubectl describe")
            print(text)  # what an operator sees (shown with -rP)
            assert "chat wants 3, budget allows 2" in text, text
            assert "side" in text.split("LoadScaleBlocked", 1)[1], text  # the webhook's reason names who blocks
            assert "replicas 1 -> 2" in text, text  # the step up is an Event too (LoadScaleUp)
            status = chat()["status"]
            assert (status["replicasWanted"], status["replicasAllowed"]) == (3, 2), status
            assert "chat wants 3, budget allows 2" in status["loadMessage"] and "side" in status["loadMessage"]
            assert gauges(controller, "chat") == {"wanted": 3.0, "allowed": 2.0}
            listed = {m["id"]: m for m in proxy.get("/v1/models").json()["data"]}["chat"]
            assert (listed["replicasWanted"], listed["replicasAllowed"], listed["maxReplicas"]) == (3, 2, 3), listed
            assert "side" in listed["loadMessage"], listed
            assert chat()["spec"]["replicas"] == 2

            kubectl("scale", "inferencemodel/side", "--replicas=0")  # a decrease: always admitted
            wait_for(lambda: chat()["spec"]["replicas"] == 3, timeout=60, message="chat stepped to 3 once side left")
            wait_for(lambda: running("chat") == 3, timeout=60, message="chat's three replicas running")
            if signal == "replica-metrics":  # (the other mocks serve no /metrics)
                mocks = [servers[f"mock-chat-{host}"] for host in HOSTS]
                wait_for(lambda: all(served(m) > 0 for m in mocks), timeout=30, message="each of 3 replicas served")
            wait_for(lambda: gauges(controller, "chat") == {"wanted": 3.0, "allowed": 3.0}, timeout=30,
                     message="gauges: wanted 3, allowed 3")  # fmt: skip
        finally:
            clients.finish()
        assert clients.errors == [], clients.errors[:3]
        assert clients.answered > 0

        wait_for(lambda: chat()["spec"]["replicas"] == 1, timeout=60, message="chat back to minReplicas once idle")
        wait_for(lambda: running("chat") == 1, timeout=60, message="chat's extra replicas gone")
        text = kubectl("describe", "inferencemodel", "chat")
        assert "replicas 3 -> 2" in text and "replicas 2 -> 1" in text, text
    assert sampler.samples > 0
    assert 0 < sampler.peak <= CAPACITY, sampler.peak / GI
