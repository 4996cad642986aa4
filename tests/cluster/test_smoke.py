"""Smoke test of the cluster tier: the real scheduler binds a Deployment's pods to fake nodes.

Why: it proves, end to end, what every other cluster test relies on: the control plane answers,
the controller-manager makes ReplicaSets and pods, the default kube-scheduler binds them to nodes made
by ``create_node``, the pod simulator marks them Ready, and kubectl works with the fixture's kubeconfig.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kubernetes import client

from tests.cluster.harness import ControlPlane, PodSimulator, wait_for

log = logging.getLogger(__name__)

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: smoke
spec:
  replicas: 3
  selector:
    matchLabels: {app: smoke}
  template:
    metadata:
      labels: {app: smoke}
    spec:
      containers:
      - name: pause
        image: registry.k8s.io/pause:3.10
        resources:
          requests: {cpu: 100m, memory: 64Mi}
"""


def test_control_plane_versions(control_plane: ControlPlane) -> None:
    version = control_plane.kubectl("version", "-o", "json", check=True).stdout
    assert '"gitVersion": "v1.36.' in version, version
    control_plane.check_alive()


def test_deployment_scheduled_on_fake_nodes(
    control_plane: ControlPlane,
    k8s_client: Any,
    pod_simulator: PodSimulator,
    node_factory: Any,
    namespace: str,
) -> None:
    node_factory("smoke-node-a", capacity="80Gi", gfd_memory_mib=81920, gfd_count=1)
    node_factory("smoke-node-b", capacity="48Gi", labels={"ibc.test/pool": "b"})
    core, apps = client.CoreV1Api(k8s_client), client.AppsV1Api(k8s_client)
    node = core.read_node("smoke-node-a")
    assert not node.spec.taints, node.spec.taints
    assert node.metadata.annotations["inference.eh-ops.io/memory-capacity"] == "80Gi"
    assert node.metadata.labels["nvidia.com/gpu.memory"] == "81920"

    t0 = time.monotonic()
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT, check=True)

    def available() -> bool:
        d = apps.read_namespaced_deployment("smoke", namespace)
        return (d.status.available_replicas or 0) == 3 and (d.status.ready_replicas or 0) == 3

    wait_for(available, timeout=60, message="deployment smoke available with 3 replicas")
    log.info("deployment available %.2fs after apply", time.monotonic() - t0)

    pods = core.list_namespaced_pod(namespace, label_selector="app=smoke").items
    assert len(pods) == 3
    for pod in pods:
        assert pod.spec.node_name in ("smoke-node-a", "smoke-node-b")
        assert pod.status.phase == "Running"
        assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.244.")
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
        bound_by = {e.reporting_component or (e.source and e.source.component) for e in _events(core, pod)}
        assert "default-scheduler" in bound_by, bound_by

    out = control_plane.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=True).stdout
    log.info("kubectl get pods:\n%s", out)
    assert out.count("Running") == 3, out
    for pod in pods:
        assert pod.metadata.name in out

    # scale down: the simulator must remove terminating pods like a kubelet would
    control_plane.kubectl("scale", "-n", namespace, "deployment/smoke", "--replicas=1", check=True)
    wait_for(
        lambda: len(core.list_namespaced_pod(namespace, label_selector="app=smoke").items) == 1,
        timeout=60,
        message="scale down to 1 pod",
    )


def _events(core: Any, pod: Any) -> list[Any]:
    """Events about ``pod`` (the Scheduled event names the scheduler that bound it)."""

    def fetch() -> list[Any]:
        items = core.list_namespaced_event(
            pod.metadata.namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
        ).items
        return [e for e in items if e.reason == "Scheduled"]

    return wait_for(fetch, timeout=10, message=f"Scheduled event of {pod.metadata.name}")
