"""`ibc proxy` against the real kube-apiserver: scale from zero through `/scale`, and the 429 at once.

Real parts: the apiserver with the CRD from deploy/crd/, the default kube-scheduler binding model pods to
fake nodes, the pod simulator marking them Ready with the loopback IP (annotation `ibc.test/pod-ip`),
`ibc proxy` as a subprocess (gunicorn, the Kubernetes scaler, its watch cache), `ibc mock-backend`
processes as the model servers (listening on 127.0.0.1 at each InferenceModel's `spec.port`), and the
official `openai` client. The controller's part (InferenceModel replicas -> Deployment replicas) is
played by a small loop in the test: the lead's end-to-end test runs the real controller and webhook.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client

from budget.objects import parse_time
from tests.cluster.harness import POD_IP_ANNOTATION, ControlPlane, ManagedProcess, PodSimulator, free_port, wait_for
from tests.integration.test_mock_backend import MockProcess

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crd" / "inferencemodels.inference.eh-ops.io.yaml"
GROUP, VERSION, PLURAL = "inference.eh-ops.io", "v1alpha1", "inferencemodels"
LABEL = "inference.eh-ops.io/model"


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> None:
    if not CRD.is_file():
        pytest.fail(f"{CRD} is missing (the CRD is another task's; this test installs it)")
    control_plane.kubectl("apply", "-f", str(CRD), check=True)
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{PLURAL}.{GROUP}", check=True)


def deployment(name: str, memory: str, replicas: int, pool: str, port: int) -> dict[str, Any]:
    labels = {"app": name, LABEL: name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    # The simulator reports this pod IP, where the test's mock backend listens.
                    "annotations": {"inference.eh-ops.io/memory": memory, POD_IP_ANNOTATION: "127.0.0.1"},
                },
                "spec": {
                    "nodeSelector": {"ibc.test/pool": pool},
                    "containers": [
                        {"name": "server", "image": "registry.k8s.io/pause:3.10", "ports": [{"containerPort": port}]}
                    ],
                },
            },
        },
    }


def inference_model(name: str, memory: str, replicas: int, pool: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {
            "modelName": name,
            "memory": memory,
            "replicas": replicas,
            "port": port,
            "cooldownPeriod": "10m",
            "nodeSelector": {"ibc.test/pool": pool},
            "deploymentRef": {"name": name},
        },
    }


class Env:
    """One test's namespace, node pool, model servers, controller stand-in and `ibc proxy` process."""

    def __init__(self, cp: ControlPlane, api: Any, namespace: str, pool: str, tmp: Path) -> None:
        self.cp, self.ns, self.pool, self.tmp = cp, namespace, pool, tmp
        self.custom = client.CustomObjectsApi(api)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.mocks: list[MockProcess] = []
        self.proxy: ManagedProcess | None = None
        self.url = ""
        self._stop = threading.Event()
        self._stand_in = threading.Thread(target=self._controller_stand_in, daemon=True)

    def add_model(self, name: str, memory: str, replicas: int, *mock_flags: str) -> MockProcess:
        """An InferenceModel adopting a Deployment, and a mock backend on the model's port."""
        mock = MockProcess(name, *mock_flags)
        self.mocks.append(mock)
        self.apps.create_namespaced_deployment(self.ns, deployment(name, memory, replicas, self.pool, mock.port))
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, inference_model(name, memory, replicas, self.pool, mock.port)
        )
        return mock

    def model(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)  # type: ignore[no-any-return]

    def ready_pods(self, name: str) -> int:
        pods = self.core.list_namespaced_pod(self.ns, label_selector=f"{LABEL}={name}").items
        return sum(
            1 for p in pods if any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        )

    def start_stand_in(self) -> None:
        self._stand_in.start()

    def _controller_stand_in(self) -> None:
        """The controller's part in this test: a model's spec.replicas becomes its Deployment's replicas."""
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):
                models = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL)["items"]
                for m in models:
                    name = m["metadata"]["name"]
                    want = m["spec"].get("replicas", 1)
                    dep = self.apps.read_namespaced_deployment(name, self.ns)
                    if dep.spec.replicas != want:
                        self.apps.patch_namespaced_deployment_scale(name, self.ns, {"spec": {"replicas": want}})

    def start_proxy(self, *extra: str) -> None:
        port = free_port()
        argv = [
            sys.executable, "-m", "ibc", "--log-level", "INFO", "proxy",
            "--kubeconfig", str(self.cp.kubeconfig), "--namespace", self.ns,
            "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "32", *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proxy = ManagedProcess("proxy", argv, self.tmp / "proxy.log").start(env=env)
        self.url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert self.proxy is not None
            self.proxy.check_alive()
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

        wait_for(ready, timeout=60, message="ibc proxy /readyz")

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self) -> None:
        self._stop.set()
        if self.proxy is not None:
            if self.proxy.alive():
                self.proxy.stop()
            print(f"--- ibc proxy log tail ---\n{self.proxy.log_tail(80)}")  # shown when the test fails
        for mock in self.mocks:
            mock.stop()


@pytest.fixture
def env(
    control_plane: ControlPlane,
    crd: None,
    k8s_client: Any,
    pod_simulator: PodSimulator,
    node_factory: Callable[..., Any],
    namespace: str,
    tmp_path: Path,
) -> Iterator[Env]:
    pool = f"proxy-{namespace[-6:]}"
    node_factory(f"proxy-{namespace[-6:]}", capacity="128Gi", labels={"ibc.test/pool": pool})
    e = Env(control_plane, k8s_client, namespace, pool, tmp_path)
    try:
        yield e
    finally:
        e.close()


def seed(env: Env) -> None:
    """The seed scenario: model-a (80Gi) runs on the 128Gi node; model-b (60Gi) and model-c (40Gi) are at 0."""
    env.add_model("model-a", "80Gi", 1)
    env.add_model("model-b", "60Gi", 0)
    env.add_model("model-c", "40Gi", 0, "--startup-delay", "0.5", "--token-delay", "0.02")
    env.start_stand_in()
    wait_for(lambda: env.ready_pods("model-a") == 1, timeout=60, message="model-a pod Ready")
    env.start_proxy()


def test_cold_model_that_fits_is_scaled_through_the_api_and_served(env: Env) -> None:
    seed(env)
    ai = env.openai()
    warm = ai.chat.completions.create(model="model-a", messages=[{"role": "user", "content": "hi"}])
    assert warm.model == "model-a"

    started = time.monotonic()
    cold = ai.chat.completions.create(model="model-c", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    elapsed = time.monotonic() - started
    assert cold.model == "model-c"
    assert cold.choices[0].message.content == "tok0 tok1 tok2"
    # The proxy asked through /scale (what the webhook sees) and the replica came up behind it.
    assert env.model("model-c")["spec"]["replicas"] == 1
    assert env.ready_pods("model-c") == 1
    assert elapsed < 60

    # Now warm: a streamed answer comes straight through, chunk by chunk.
    stream = ai.chat.completions.create(model="model-c", messages=[], stream=True, max_tokens=4)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 tok3"

    # Activity reaches status.lastRequestTime (throttled, off the request path) for the idle clock.
    def last_request(name: str) -> float | None:
        return parse_time(env.model(name).get("status", {}).get("lastRequestTime"))

    wait_for(lambda: (last_request("model-c") or 0) >= time.time() - 30, timeout=20, message="lastRequestTime")
    wait_for(lambda: (last_request("model-a") or 0) >= time.time() - 30, timeout=20, message="model-a activity")
    models = {m.id: m.model_extra["state"] for m in ai.models.list()}
    assert models == {"model-a": "ready", "model-b": "stopped", "model-c": "ready"}


def test_model_that_cannot_fit_gets_the_429_at_once_and_no_scale_call(env: Env) -> None:
    seed(env)
    before = env.model("model-b")
    started = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as caught:
        env.openai().chat.completions.create(model="model-b", messages=[{"role": "user", "content": "hi"}])
    elapsed = time.perf_counter() - started
    response = caught.value.response
    body = response.json()
    assert body["error"]["code"] == "insufficient_memory"
    assert body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
    assert body["available"] == "48Gi"
    assert [(b["model"], b["memory"]) for b in body["blocking"]] == [("model-a", "80Gi")]
    assert "model-b needs 60Gi" in body["message"]
    assert int(response.headers["retry-after"]) > 0
    assert elapsed < 1.0, f"the 429 took {elapsed:.3f}s"
    after = env.model("model-b")
    assert after["spec"]["replicas"] == 0
    assert after["metadata"]["generation"] == before["metadata"]["generation"], "no write to the spec"


def test_streaming_cold_start_holds_the_client_with_progress(env: Env) -> None:
    seed(env)
    with httpx.stream(
        "POST",
        f"{env.url}/v1/chat/completions",
        timeout=120,
        json={"model": "model-c", "stream": True, "max_tokens": 2, "messages": []},
    ) as resp:
        assert resp.status_code == 200
        text = "".join(resp.iter_text())
    assert text.startswith(": waiting for model-c to start")
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "tok0 tok1"
    assert text.rstrip().endswith("data: [DONE]")
