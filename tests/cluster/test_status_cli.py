"""`ibc status --kubeconfig` and `ibc stop|start --kubeconfig` against the real kube-apiserver.

Real parts: the apiserver with the CRD, a fake node with a memory budget, a model pod bound to it (the
view counts bound pods), and `ibc` as a subprocess reading through the admin kubeconfig.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.test_proxy import GROUP, LABEL, PLURAL, VERSION, crd  # noqa: F401 (fixture)

pytestmark = pytest.mark.cluster


def _ibc(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ibc", *argv], capture_output=True, text=True, timeout=90)


def _replicas(custom: Any, namespace: str, name: str) -> int:
    return int(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["spec"]["replicas"])


def test_status_and_stop_from_a_cluster(control_plane, k8s_client, node_factory, namespace, crd):  # noqa: F811 (fixture)
    node = f"status-{secrets.token_hex(3)}"
    node_factory(node, capacity="128Gi", labels={"inference-pool": node})
    custom = client.CustomObjectsApi(k8s_client)
    spec = {"modelName": "model-a", "memory": "80Gi", "nodeSelector": {"inference-pool": node}, "replicas": 1}
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceModel", "metadata": {"name": "model-a"}, "spec": spec},
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="model-a-0", labels={LABEL: "model-a"}, annotations={"inference.eh-ops.io/memory": "80Gi"}
        ),
        spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(name="server", image="mock")]),
    )
    client.CoreV1Api(k8s_client).create_namespaced_pod(namespace, pod)
    kubeconfig = str(control_plane.kubeconfig)

    shown = _ibc("status", "--kubeconfig", kubeconfig, "--namespace", namespace, "--output", "json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    (ours,) = [n for n in doc["nodes"] if n["name"] == node]
    assert (ours["capacity"], ours["used"], ours["free"]) == ("128Gi", "80Gi", "48Gi")
    (model,) = [m for m in doc["models"] if m["key"] == f"{namespace}/model-a"]
    assert [p["node"] for p in model["placements"]] == [node] and model["replicas"]["desired"] == 1
    table = _ibc("status", "--kubeconfig", kubeconfig, "--namespace", namespace)
    assert table.returncode == 0 and f"{node}  80Gi / 128Gi" in table.stdout, table.stdout + table.stderr

    stopped = _ibc("stop", "model-a", "--kubeconfig", kubeconfig, "--namespace", namespace)
    assert stopped.returncode == 0 and "replicas 1 -> 0" in stopped.stdout, stopped.stderr
    assert _replicas(custom, namespace, "model-a") == 0
    again = _ibc("stop", "model-a", "--kubeconfig", kubeconfig, "--namespace", namespace)
    assert again.returncode == 0 and "already at 0" in again.stdout

    started = _ibc("start", "model-a", "--kubeconfig", kubeconfig, "--namespace", namespace)
    assert started.returncode == 0 and "replicas 0 -> 1" in started.stdout, started.stderr
    assert _replicas(custom, namespace, "model-a") == 1

    missing = _ibc("stop", "model-z", "--kubeconfig", kubeconfig, "--namespace", namespace)
    assert missing.returncode == 1 and f"no InferenceModel {namespace}/model-z" in missing.stderr
