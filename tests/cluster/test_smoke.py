"""Smoke test of the cluster tier: the real scheduler binds a Deployment's pods to fake nodes.

Why: it proves, end to end, what every other cluster test relies on: the control plane answers,
the controller-manager makes ReplicaSets and pods, the default kube-scheduler binds them to nodes made
by ``create_node``, the pod simulator marks them Ready, and kubectl works with the fixture's kubeconfig.
"""

from __future__ import annotations

import http.server
import json
import logging
import ssl
import threading
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


class _RecordingExtender:
    """A minimal HTTPS scheduler extender: accepts every node, records the verbs it was called with."""

    def __init__(self, cert: str, key: str) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                verb = self.path.rsplit("/", 1)[-1]
                outer.calls.append((verb, body))
                if verb == "filter":
                    reply: Any = {"Nodes": body["Nodes"], "FailedNodes": {}, "Error": ""}
                else:
                    reply = [{"Host": n["metadata"]["name"], "Score": 5} for n in body["Nodes"]["items"]]
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("extender: " + format, *args)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_second_scheduler_with_https_extender(
    control_plane: ControlPlane,
    k8s_client: Any,
    pod_simulator: PodSimulator,
    node_factory: Any,
    namespace: str,
    scheduler_factory: Any,
) -> None:
    node_factory("smoke-ext-a")
    node_factory("smoke-ext-b")
    cert, key, _ca = control_plane.issue_serving_cert(ip_addresses=["127.0.0.1"])
    ext = _RecordingExtender(str(cert), str(key))
    try:
        handle = scheduler_factory(
            "smoke-extender-scheduler",
            extenders=[
                {
                    "urlPrefix": ext.url,
                    "filterVerb": "filter",
                    "prioritizeVerb": "prioritize",
                    "weight": 1,
                    "enableHTTPS": True,
                    "tlsConfig": {"caData": control_plane.ca_cert_pem},  # PEM: base64-encoded by the harness
                    "httpTimeout": "5s",
                    "nodeCacheCapable": False,
                }
            ],
        )
        assert handle.log_path.exists()
        core = client.CoreV1Api(k8s_client)
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="via-extender"),
            spec=client.V1PodSpec(
                scheduler_name="smoke-extender-scheduler",
                containers=[client.V1Container(name="pause", image="registry.k8s.io/pause:3.10")],
            ),
        )
        core.create_namespaced_pod(namespace, pod)

        def ready() -> bool:
            p = core.read_namespaced_pod("via-extender", namespace)
            return bool(p.spec.node_name) and any(
                c.type == "Ready" and c.status == "True" for c in (p.status.conditions or [])
            )

        wait_for(ready, timeout=30, message="pod bound by the second scheduler and Ready")
        verbs = [v for v, _ in ext.calls]
        assert "filter" in verbs, verbs
        filter_body = next(b for v, b in ext.calls if v == "filter")
        assert filter_body["Pod"]["metadata"]["name"] == "via-extender"
        assert {n["metadata"]["name"] for n in filter_body["Nodes"]["items"]} >= {"smoke-ext-a", "smoke-ext-b"}
        events = _events(core, core.read_namespaced_pod("via-extender", namespace))
        assert any((e.reporting_component or "") == "smoke-extender-scheduler" for e in events), events
        handle.stop()
        assert not handle.process.alive()
    finally:
        ext.close()
