"""Warm replicas (spec.minReplicas) on the real control plane: the controller asks, the webhook decides.

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
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from budget.quantity import parse_quantity
from tests.cluster import components as comp
from tests.cluster.harness import ControlPlane, PodSimulator, wait_for

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
