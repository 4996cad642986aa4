"""The seed scenario end to end, with every real component at once (issue 7).

Why: each component has its own cluster test; only this one shows what a user of the product sees when
they all work together. Running here: the CRD from deploy/crd, `ibc extender` over HTTPS behind a second
kube-scheduler running deploy/scheduler's configuration, `ibc webhook` over TLS registered with
deploy/webhook's ValidatingWebhookConfiguration, `ibc controller` turning InferenceModels into Deployments
whose pods use the budget-aware scheduler, `ibc proxy` with the Kubernetes scaler, and `ibc mock-backend`
processes playing the model servers (the pod simulator reports the pods at 127.0.0.1, and each mock
listens on its model's spec.port). Clients are the official `openai` package and kubectl.

The story, on one 128Gi node `shadow` (pool inference-pool=gpu-nodes):
1. model-a (80Gi) runs, placed by our scheduler through the extender, and serves.
2. model-b (60Gi) gets an immediate, explained 429 while model-a idles (48Gi free); `kubectl scale` of
   model-b is refused by the webhook with the same explanation.
3. model-c (16Gi) fits beside model-a and is served after its cold start; it then idles out.
4. model-a idles out (cooldownPeriod) and the controller scales it to zero; then 50 concurrent requests
   for model-b, sent while it is at zero, are held through its cold start (scale-up, scheduling, binding,
   and a pod that loads for a while before it is Ready) and all served.
5. A scale-down frees the webhook's budget at once (not after the admission ledger entry's TTL).
6. A background thread sampled, from the API server and from the extender, the memory held on `shadow`
   during the whole module: never above 128Gi.

The tests are steps of one story and run in file order on module-scoped state (run the module whole).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from budget import parse_duration, parse_quantity
from budget.objects import ANNOTATION_MEMORY, LABEL_MODEL, parse_time
from tests.cluster import components as comp
from tests.cluster.harness import (
    POD_IP_ANNOTATION,
    POD_READY_ANNOTATION,
    ControlPlane,
    PodSimulator,
    SchedulerHandle,
    create_node,
    delete_node,
    free_port,
    wait_for,
)

GI = 2**30
CAPACITY = "128Gi"
POOL = {"inference-pool": "gpu-nodes"}
POOL_TEXT = "inference-pool=gpu-nodes"
LEDGER_NAMESPACE = "ibc-system"
PAUSE = "registry.k8s.io/pause:3.10"
BURST = 50
LOAD_SECONDS = 2.5  # how long model-b's pod "loads weights" (Running, not Ready) before it is Ready


@dataclass(frozen=True)
class ModelSpec:
    name: str
    memory: str
    replicas: int
    cooldown: str
    mock_flags: tuple[str, ...] = ()
    loads: bool = False  # its pods come up Running but not Ready: the test plays the model loading
    policy: dict[str, Any] = field(default_factory=dict)  # more spec fields (eviction, priority, pinned)


MODELS = (
    ModelSpec("model-a", "80Gi", 1, "20s"),
    ModelSpec("model-b", "60Gi", 0, "10m", ("--token-delay", "0.02"), loads=True),
    ModelSpec("model-c", "16Gi", 0, "10s"),
)
COOLDOWN_A_SECONDS = parse_duration("20s")


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    at: float  # time.monotonic()
    bound_bytes: int  # declared memory of live pods bound to the node, from the API server
    pods: tuple[str, ...]


class MemorySampler:
    """Samples, in a background thread, the memory held on one node: pods from the API, the extender's book."""

    def __init__(self, cp: ControlPlane, node: str, extender: comp.Server, interval_seconds: float = 0.1) -> None:
        self.cp, self.node, self.extender, self.interval = cp, node, extender, interval_seconds
        self.samples: list[Sample] = []
        self.extender_free: list[tuple[float, int]] = []  # (monotonic, freeBytes) as the extender sees it
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        api = self.cp.api_client()
        core = client.CoreV1Api(api)
        ext = self.extender.client(timeout_seconds=5)
        try:
            while not self._stop.is_set():
                try:
                    self.samples.append(self._sample(core))
                    node = ext.get("/debug/view").json()["nodes"].get(self.node)
                    if node is not None and node.get("freeBytes") is not None:
                        self.extender_free.append((time.monotonic(), int(node["freeBytes"])))
                except Exception as exc:  # keep sampling; the test asserts how many samples there were
                    self.errors.append(repr(exc))
                self._stop.wait(self.interval)
        finally:
            ext.close()
            api.close()

    def _sample(self, core: client.CoreV1Api) -> Sample:
        pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}", _request_timeout=10)
        total, names = 0, []
        for pod in pods.items:
            if pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
                continue  # terminated: holds no memory
            memory = (pod.metadata.annotations or {}).get(ANNOTATION_MEMORY)
            if memory is not None:
                total += parse_quantity(memory)
                names.append(pod.metadata.name)
        return Sample(time.monotonic(), total, tuple(sorted(names)))

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]


# ----------------------------------------------------------------------------------------------- the scene


@dataclass
class Seed:
    """The running product: components, the node, the models' namespace, and readers."""

    cp: ControlPlane
    namespace: str
    node: str
    extender: comp.Server
    webhook: comp.Server
    controller: comp.Server
    proxy: comp.Server
    scheduler: SchedulerHandle
    sampler: MemorySampler
    ports: dict[str, int]
    api: Any
    notes: dict[str, Any] = field(default_factory=dict)
    more_proxies: tuple[comp.Server, ...] = ()  # other replicas of the proxy, on the same cluster

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def model(self, name: str) -> dict[str, Any]:
        obj = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            comp.GROUP, comp.VERSION, self.namespace, comp.PLURAL, name
        )
        return dict(obj)

    def pods(self, name: str) -> list[client.V1Pod]:
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL_MODEL}={name}").items)

    def ready(self, pod: client.V1Pod) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))

    def bound_on_node(self) -> dict[str, int]:
        """Model -> declared bytes of the live pods bound to the node now."""
        out: dict[str, int] = {}
        for pod in self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}").items:
            labels, annotations = pod.metadata.labels or {}, pod.metadata.annotations or {}
            if pod.metadata.deletion_timestamp is None and ANNOTATION_MEMORY in annotations:
                model = labels.get(LABEL_MODEL, "?")
                out[model] = out.get(model, 0) + parse_quantity(annotations[ANNOTATION_MEMORY])
        return out

    def openai(self, timeout_seconds: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy.url}/v1", api_key="unused", max_retries=0, timeout=timeout_seconds)

    def extender_binds(self) -> float:
        """Pods the extender bound (its bindVerb answered "bound")."""
        total = 0.0
        for line in self.extender.get("/metrics").text.splitlines():
            if line.startswith("ibc_extender_decisions_total{") and 'verb="bind"' in line and 'result="bound"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def proxy_states(self) -> dict[str, str]:
        return {m["id"]: m["state"] for m in self.proxy.get("/v1/models").json()["data"]}

    def kubectl(self, *args: str, input: str | None = None) -> Any:
        return self.cp.kubectl(*args, "-n", self.namespace, input=input, timeout=90)


def inference_model(spec: ModelSpec, port: int) -> dict[str, Any]:
    annotations = {POD_IP_ANNOTATION: "127.0.0.1"}
    if spec.loads:
        annotations[POD_READY_ANNOTATION] = "false"
    return {
        "apiVersion": f"{comp.GROUP}/{comp.VERSION}",
        "kind": "InferenceModel",
        "metadata": {"name": spec.name},
        "spec": {
            "modelName": spec.name,
            "memory": spec.memory,
            "replicas": spec.replicas,
            "cooldownPeriod": spec.cooldown,
            "port": port,
            "nodeSelector": dict(POOL),
            **spec.policy,
            "template": {
                # The pod simulator reports this IP: the model's mock backend listens there on spec.port.
                "metadata": {"annotations": annotations},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {"name": "server", "image": PAUSE, "ports": [{"name": "http", "containerPort": port}]}
                    ],
                },
            },
        },
    }


@contextlib.contextmanager
def running_seed(
    cp: ControlPlane,
    k8s_client: Any,
    scheduler_factory: Callable[..., SchedulerHandle],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    *,
    name: str = "seed-e2e",
    models: tuple[ModelSpec, ...] = MODELS,
    proxies: int = 1,
) -> Iterator[Seed]:
    """The product running on one 128Gi node with `models`, `proxies` replicas of the proxy (the first is
    `seed.proxy`), and the memory sampler; everything is stopped and deleted on exit."""
    t0 = time.monotonic()
    suffix = secrets.token_hex(3)
    namespace, node = f"{name}-{suffix}", f"shadow-{suffix}"
    webhook_name, ledger_name = f"ibc-webhook-{name}-{suffix}", f"ibc-{name}-ledger-{suffix}"
    logs = tmp_path_factory.mktemp(name)
    core = client.CoreV1Api(k8s_client)
    servers: list[comp.Server] = []
    sampler: MemorySampler | None = None
    try:
        comp.install_crd(cp)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        with contextlib.suppress(ApiException):  # 409: another module made it
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=LEDGER_NAMESPACE)))
        # The node exists before the extender and the proxy list nodes, so their first view has it.
        create_node(k8s_client, node, capacity=CAPACITY, labels=POOL)

        ports = {m.name: free_port() for m in models}
        extender = comp.launch_extender(cp, logs)
        webhook = comp.launch_webhook(cp, logs, ledger_namespace=LEDGER_NAMESPACE, ledger_name=ledger_name)
        controller = comp.launch_controller(cp, logs, namespace=namespace)
        # The proxy holds at most threads - 16 requests during cold starts (16 are kept for ready models).
        replicas = [comp.launch_proxy(cp, logs, namespace=namespace, threads=BURST + 16 + 14) for _ in range(proxies)]
        mocks = [comp.launch_mock_backend(logs, m.name, ports[m.name], *m.mock_flags) for m in models]
        servers += [extender, webhook, controller, *replicas, *mocks]

        extender.wait_ready()
        scheduler = scheduler_factory(comp.SCHEDULER_NAME, config=comp.scheduler_config(extender.url, extender.ca))
        webhook.wait_ready()
        assert webhook.ca is not None
        comp.register_webhook(
            cp,
            comp.webhook_configuration(webhook_name, f"{webhook.url}/validate", webhook.ca.read_bytes(), [namespace]),
        )
        for server in (controller, *replicas, *mocks):
            server.wait_ready()

        # Created through the webhook (model-a's 80Gi is admitted; the others ask for nothing yet).
        docs = "\n---\n".join(yaml.safe_dump(inference_model(m, ports[m.name])) for m in models)
        res = cp.kubectl("apply", "-n", namespace, "-f", "-", input=docs, timeout=90)
        assert res.returncode == 0, f"applying the models failed:\n{res.stderr}"

        sampler = MemorySampler(cp, node, extender).start()
        proxy, *others = replicas
        scene = Seed(cp, namespace, node, extender, webhook, controller, proxy, scheduler, sampler, ports, k8s_client)
        scene.more_proxies = tuple(others)
        scene.notes["setup_seconds"] = round(time.monotonic() - t0, 1)
        yield scene
    finally:
        if sampler is not None:
            sampler.stop()
        comp.unregister_webhook(cp, webhook_name)
        stop_seconds: dict[str, float] = {}
        tails = comp.stop_all(servers, stop_seconds)
        print(f"[{name}] seconds to stop after SIGTERM: {stop_seconds}")
        with contextlib.suppress(Exception):
            core.delete_namespaced_config_map(ledger_name, LEDGER_NAMESPACE)
        with contextlib.suppress(Exception):
            core.delete_namespace(namespace)
            # Pods on the fake node vanish only while the node exists (the simulator plays its kubelet).
            wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=30, message="pods deleted")
        with contextlib.suppress(Exception):
            delete_node(k8s_client, node, wait=False)
        if request.session.testsfailed:
            reporter = request.config.pluginmanager.getplugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"[{name}] component logs in {logs}")
                for server_name, tail in tails.items():
                    reporter.write_line(f"--- {server_name} (last lines) ---\n{tail}")


@pytest.fixture(scope="module")
def seed_scenes(
    control_plane: ControlPlane,
    k8s_client: Any,
    pod_simulator: PodSimulator,
    scheduler_factory: Callable[..., SchedulerHandle],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Callable[..., contextlib.AbstractContextManager[Seed]]:
    """`running_seed` with the tier's fixtures bound: `with seed_scenes(models=..., proxies=2) as scene:`."""
    return functools.partial(running_seed, control_plane, k8s_client, scheduler_factory, tmp_path_factory, request)


@pytest.fixture(scope="module")
def seed(seed_scenes: Callable[..., contextlib.AbstractContextManager[Seed]]) -> Iterator[Seed]:
    with seed_scenes() as scene:
        yield scene


# ----------------------------------------------------------------------------------------------- helpers

IDLE = re.compile(r"idle [0-9]+s")


def chat(ai: openai.OpenAI, model: str, *, stream: bool = False, max_tokens: int = 3) -> str:
    """One chat completion through the proxy; the answer's text (streamed or not)."""
    messages: Any = [{"role": "user", "content": "hello"}]
    if stream:
        chunks = ai.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = ai.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    assert answer.model == model
    return answer.choices[0].message.content or ""


def tokens(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


def printer_columns(seed: Seed) -> dict[str, dict[str, str]]:
    """`kubectl get inferencemodels` as {name: {column: value}}."""
    res = seed.kubectl("get", "inferencemodels")
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.rstrip("\n").splitlines()
    # Columns are left-aligned at the header's offsets; an unset field prints as blanks.
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    table = {}
    for row in rows:
        cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        table[cells[0]] = dict(zip(names, cells, strict=True))
    return table


class ModelLoader:
    """Plays a model server loading its weights: the first pod of `model` stays not Ready for `load_seconds`
    after it is bound, then the test marks it Ready (the pod simulator reports what the annotation says)."""

    def __init__(self, seed: Seed, model: str, load_seconds: float) -> None:
        self.seed, self.model, self.load_seconds = seed, model, load_seconds
        self.bound_at: float | None = None  # time.monotonic()
        self.ready_at: float | None = None  # just before the readiness flip was written
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"loader-{model}", daemon=True)

    def start(self) -> ModelLoader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        api = self.seed.cp.api_client()
        core = client.CoreV1Api(api)
        try:
            while not self._stop.is_set():
                pods = core.list_namespaced_pod(self.seed.namespace, label_selector=f"{LABEL_MODEL}={self.model}")
                bound = [p for p in pods.items if p.spec.node_name]
                if bound:
                    self.bound_at = time.monotonic()
                    if self._stop.wait(self.load_seconds):
                        return
                    pod = bound[0].metadata.name
                    self.ready_at = time.monotonic()
                    core.patch_namespaced_pod(
                        pod, self.seed.namespace, {"metadata": {"annotations": {POD_READY_ANNOTATION: "true"}}}
                    )
                    return
                self._stop.wait(0.05)
        except Exception as exc:
            self.error = repr(exc)
        finally:
            api.close()


def wait_scaled_to_zero(seed: Seed, name: str, timeout_seconds: float) -> None:
    wait_for(
        lambda: seed.model(name)["spec"].get("replicas") == 0 and not seed.pods(name),
        timeout=timeout_seconds,
        interval=0.5,
        message=lambda: (
            f"{name} scaled to zero (spec.replicas {seed.model(name)['spec'].get('replicas')}, "
            f"pods {[p.metadata.name for p in seed.pods(name)]})"
        ),
    )


# ----------------------------------------------------------------------------------------------- the story


def test_1_model_a_runs_where_the_budget_scheduler_placed_it_and_serves(seed: Seed) -> None:
    wait_for(
        lambda: seed.model("model-a").get("status", {}).get("ready") is True,
        timeout=120,
        interval=0.3,
        message=lambda: f"model-a ready; status {json.dumps(seed.model('model-a').get('status'))}",
    )
    (pod,) = seed.pods("model-a")
    assert pod.spec.scheduler_name == comp.SCHEDULER_NAME
    assert pod.spec.node_name == seed.node
    assert seed.ready(pod) and pod.status.pod_ip == "127.0.0.1"
    # Bound by the extender (bindVerb), not by the default binder.
    assert seed.extender_binds() >= 1
    scheduled = [
        e
        for e in seed.core.list_namespaced_event(
            seed.namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
        ).items
        if e.reason == "Scheduled"
    ]
    assert scheduled, "no Scheduled event for model-a's pod"
    assert (scheduled[0].reporting_component or scheduled[0].source.component) == comp.SCHEDULER_NAME

    columns = printer_columns(seed)
    assert {k: columns["model-a"][k] for k in ("READY", "REPLICAS", "MEMORY")} == {
        "READY": "true",
        "REPLICAS": "1",
        "MEMORY": "80Gi",
    }, columns
    assert columns["model-b"]["MEMORY"] == "60Gi" and columns["model-c"]["MEMORY"] == "16Gi"

    assert chat(seed.openai(), "model-a") == tokens(3)


def test_2_model_b_gets_an_immediate_explained_429_and_kubectl_scale_is_refused_alike(seed: Seed) -> None:
    ai = seed.openai()
    before = seed.model("model-b")
    # model-a is busy (a streamed answer), then idle.
    busy_at = time.time()
    assert chat(ai, "model-a", stream=True, max_tokens=5) == tokens(5)
    wait_for(
        lambda: (parse_time(seed.model("model-a").get("status", {}).get("lastRequestTime")) or 0) >= int(busy_at),
        timeout=30,
        interval=0.2,
        message="the proxy recorded model-a's request in status.lastRequestTime",
    )
    time.sleep(2.5)

    started = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as caught:
        chat(ai, "model-b")
    elapsed = time.perf_counter() - started
    response = caught.value.response
    body = response.json()
    seed.notes["429_seconds"] = round(elapsed, 4)
    assert elapsed < 1.0, f"the 429 took {elapsed:.3f}s"
    assert body["error"]["code"] == "insufficient_memory"
    assert {k: body["requested"][k] for k in ("model", "memory")} == {"model": "model-b", "memory": "60Gi"}
    assert body["available"] == "48Gi"
    assert [(b["model"], b["memory"]) for b in body["blocking"]] == [("model-a", "80Gi")]
    idle_seconds = int(body["blocking"][0]["idle_for"].removesuffix("s"))
    assert 2 <= idle_seconds < COOLDOWN_A_SECONDS, body
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= COOLDOWN_A_SECONDS - idle_seconds + 1, (retry_after, body)
    assert body["message"].startswith(
        f"model-b needs 60Gi in pool {POOL_TEXT}; 48Gi available; blocked by model-a (80Gi, idle "
    ), body["message"]
    # The proxy decided alone: no write reached model-b.
    after = seed.model("model-b")
    assert after["spec"]["replicas"] == 0
    assert after["metadata"]["generation"] == before["metadata"]["generation"]

    refused = seed.kubectl("scale", "inferencemodel/model-b", "--replicas=1")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "denied the request: insufficient_memory: " in refused.stderr, refused.stderr
    webhook_message = refused.stderr.split("denied the request: insufficient_memory: ", 1)[1].strip()
    webhook_message = re.sub(r"; retry after [0-9]+s$", "", webhook_message)
    # The same explanation in both layers, up to the idle seconds that passed in between.
    assert IDLE.sub("idle Ns", webhook_message) == IDLE.sub("idle Ns", body["message"]), (webhook_message, body)
    assert seed.model("model-b")["spec"]["replicas"] == 0


def test_3_model_c_fits_beside_model_a_and_is_served_after_its_cold_start(seed: Seed) -> None:
    ai = seed.openai()
    assert chat(ai, "model-a") == tokens(3)  # model-a still serves (and its idle clock restarts)
    assert seed.pods("model-c") == []

    started = time.monotonic()
    assert chat(ai, "model-c", max_tokens=4) == tokens(4)
    seed.notes["model_c_cold_start_seconds"] = round(time.monotonic() - started, 2)

    assert seed.model("model-c")["spec"]["replicas"] == 1
    (pod,) = seed.pods("model-c")
    assert pod.spec.scheduler_name == comp.SCHEDULER_NAME and pod.spec.node_name == seed.node
    assert seed.bound_on_node() == {"model-a": 80 * GI, "model-c": 16 * GI}
    # Warm now: a streamed answer comes straight through.
    assert chat(ai, "model-c", stream=True, max_tokens=3) == tokens(3)

    # 128 - 80 - 16 = 32Gi: model-b still does not fit, and both running models are named.
    with pytest.raises(openai.RateLimitError) as caught:
        chat(ai, "model-b")
    body = caught.value.response.json()
    assert body["available"] == "32Gi"
    assert sorted((b["model"], b["memory"]) for b in body["blocking"]) == [("model-a", "80Gi"), ("model-c", "16Gi")]


def test_4_after_model_a_idles_out_fifty_concurrent_requests_for_model_b_are_all_served(seed: Seed) -> None:
    # model-c (cooldown 10s) and model-a (20s) idle out; the controller scales both to zero.
    wait_scaled_to_zero(seed, "model-c", timeout_seconds=90)
    wait_scaled_to_zero(seed, "model-a", timeout_seconds=120)
    idle_events = [
        e
        for e in seed.core.list_namespaced_event(seed.namespace, field_selector="involvedObject.name=model-a").items
        if e.reason == "IdleScaleDown"
    ]
    assert idle_events, "no IdleScaleDown event for model-a"
    assert seed.model("model-b")["spec"]["replicas"] == 0 and seed.pods("model-b") == []
    # Every layer has caught up with the empty node before the burst: the proxy's view...
    wait_for(
        lambda: seed.proxy_states() == {"model-a": "stopped", "model-b": "stopped", "model-c": "stopped"},
        timeout=30,
        interval=0.2,
        message=lambda: f"the proxy sees every model stopped: {seed.proxy_states()}",
    )
    # ...and the webhook's (a server-side dry run is judged and leaves nothing behind). Its admission ledger
    # still holds model-a's and model-c's entries (TTL 60 s), but once its cache has seen a model's spec
    # reach an entry, the spec rules: the scale-downs free the memory at once (within a watch event).
    gate_started = time.monotonic()
    denials: list[str] = []

    def webhook_admits_model_b() -> bool:
        res = seed.kubectl("scale", "inferencemodel/model-b", "--replicas=1", "--dry-run=server")
        if res.returncode != 0:
            denials.append(res.stderr.strip())
        return res.returncode == 0

    wait_for(
        webhook_admits_model_b, timeout=5, interval=0.5, message=lambda: f"the webhook admits model-b: {denials[-1:]}"
    )
    seed.notes["webhook_agreed_after_seconds"] = round(time.monotonic() - gate_started, 1)
    seed.notes["webhook_denials_while_node_empty"] = len(denials)
    if denials:
        lag = seed.notes["webhook_agreed_after_seconds"]
        print(f"[seed-e2e] the webhook denied model-b on an empty node for {lag}s: {denials[0]}")
    assert seed.model("model-b")["spec"]["replicas"] == 0

    ai = seed.openai(timeout_seconds=150)
    barrier = threading.Barrier(BURST)
    sent: dict[int, float] = {}
    results: dict[int, tuple[str, float]] = {}  # text, completion time (monotonic)
    failures: dict[int, str] = {}

    def one(i: int) -> None:
        stream = i % 3 == 0
        barrier.wait(timeout=60)
        sent[i] = time.monotonic()
        try:
            text = chat(ai, "model-b", stream=stream, max_tokens=4)
            results[i] = (text, time.monotonic())
        except Exception as exc:
            failures[i] = f"{type(exc).__name__}: {exc}"

    loader = ModelLoader(seed, "model-b", LOAD_SECONDS).start()
    burst_wall = time.time()
    threads = [threading.Thread(target=one, args=(i,), name=f"client-{i}") for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    burst_end = time.monotonic()
    loader.stop()
    assert not any(t.is_alive() for t in threads), "some clients never got an answer"
    assert loader.error is None, loader.error

    assert failures == {}, f"{len(failures)} of {BURST} requests lost: {failures}"
    assert len(results) == BURST
    assert all(text == tokens(4) for text, _ in results.values()), results
    # One cold start: model-b went 0 -> 1 once, with one pod placed by our scheduler.
    assert seed.model("model-b")["spec"]["replicas"] == 1
    (pod,) = seed.pods("model-b")
    assert pod.spec.scheduler_name == comp.SCHEDULER_NAME and pod.spec.node_name == seed.node
    # Every request was sent before model-b's pod existed, let alone was Ready: all of them were held
    # through the cold start (scale-up, scheduling, binding, loading) and then served.
    send_spread = max(sent.values()) - min(sent.values())
    created = pod.metadata.creation_timestamp.timestamp()
    assert created >= int(burst_wall), (created, burst_wall)
    assert loader.ready_at is not None and loader.bound_at is not None
    assert max(sent.values()) < loader.ready_at, "a request was sent after model-b was Ready"
    assert min(done for _, done in results.values()) >= loader.ready_at, "a request was answered before Ready"
    latencies = sorted(done - sent[i] for i, (_, done) in results.items())

    burst_samples = seed.sampler.between(min(sent.values()), burst_end)
    all_samples = seed.sampler.samples
    peak = max(s.bound_bytes for s in all_samples)
    seed.notes.update(
        burst_send_spread_seconds=round(send_spread, 3),
        model_b_bound_after_seconds=round(loader.bound_at - min(sent.values()), 2),
        burst_first_served_seconds=round(latencies[0], 2),
        burst_median_seconds=round(statistics.median(latencies), 2),
        burst_last_served_seconds=round(latencies[-1], 2),
        samples=len(all_samples),
        samples_during_burst=len(burst_samples),
        peak_bound_gi=peak / GI,
        extender_min_free_gi=min((f for _, f in seed.sampler.extender_free), default=-1) / GI,
        sampler_errors=len(seed.sampler.errors),
        extender_binds=seed.extender_binds(),
    )
    print(json.dumps(seed.notes))
    assert len(burst_samples) >= 5, f"too few memory samples during the burst: {len(burst_samples)}"
    over = [s for s in all_samples if s.bound_bytes > parse_quantity(CAPACITY)]
    assert over == [], f"memory on {seed.node} exceeded {CAPACITY}: {over[:3]}"
    assert peak == 96 * GI, f"expected model-a + model-c (96Gi) as the peak, got {peak / GI}Gi"
    assert all(free >= 0 for _, free in seed.sampler.extender_free), "the extender promised more than the node has"
    assert len(seed.sampler.extender_free) >= 0.5 * len(all_samples)
    assert seed.sampler.errors == [] or len(seed.sampler.errors) < 0.05 * len(all_samples), seed.sampler.errors[:5]
    # Three pods were ever placed (model-a, model-c, model-b), every one bound by the extender.
    assert seed.extender_binds() == 3


def test_5_a_scale_down_frees_the_webhooks_budget_at_once(seed: Seed) -> None:
    """model-c is admitted for 4 replicas (64Gi beside model-b's 60Gi) and scaled back to 0 at once; with its
    pods gone the node holds 60Gi, so a second model-b replica (60Gi) fits and must be admitted."""
    assert seed.bound_on_node() == {"model-b": 60 * GI}
    up = seed.kubectl("scale", "inferencemodel/model-c", "--replicas=4")
    assert up.returncode == 0, up.stderr
    down = seed.kubectl("scale", "inferencemodel/model-c", "--replicas=0")
    assert down.returncode == 0, down.stderr
    wait_scaled_to_zero(seed, "model-c", timeout_seconds=60)
    wait_for(lambda: seed.bound_on_node() == {"model-b": 60 * GI}, timeout=30, message="only model-b on the node")
    res = seed.kubectl("scale", "inferencemodel/model-b", "--replicas=2", "--dry-run=server")
    assert res.returncode == 0, f"a fitting scale-up was denied on a node holding only model-b:\n{res.stderr}"


def test_6_memory_on_the_node_never_exceeded_its_capacity(seed: Seed) -> None:
    """The invariant over the whole module (including test_5's 4-replica scale-up beside model-b)."""
    samples = seed.sampler.samples
    assert len(samples) >= 100, len(samples)
    over = [s for s in samples if s.bound_bytes > parse_quantity(CAPACITY)]
    assert over == [], f"memory on {seed.node} exceeded {CAPACITY}: {over[:3]}"
    assert all(free >= 0 for _, free in seed.sampler.extender_free), "the extender promised more than the node has"
