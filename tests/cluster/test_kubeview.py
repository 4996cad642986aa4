"""The live cache against the real apiserver: it syncs, follows binds and deletes, and survives reconnects."""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

from kubeview import ClusterCache
from tests.cluster.harness import ControlPlane, wait_for

GI = 2**30


def _pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"inference.eh-ops.io/model": "kv-model"},
            "annotations": {"inference.eh-ops.io/memory": "16Gi"},
        },
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]},
    }


def test_cache_syncs_and_follows_pods_on_a_real_apiserver(
    control_plane: ControlPlane, node_factory: Any, namespace: str
) -> None:
    node_factory("kv-node", capacity="64Gi")
    cache = ClusterCache(control_plane.api_client(), kinds=("Node", "Pod"), watch_timeout_seconds=5).start()
    try:
        assert cache.wait_synced(30), "the cache never synced against the real apiserver"
        assert cache.view().free_bytes(0).get("kv-node") == 64 * GI
        core = client.CoreV1Api(control_plane.api_client())
        core.create_namespaced_pod(namespace, _pod("kv-1", "kv-node"))
        wait_for(
            lambda: cache.view().free_bytes(0).get("kv-node") == 48 * GI,
            timeout=15,
            message="a bound model pod holds its memory in the view",
        )
        # Past the 5 s watch timeout the cache re-watches from its resourceVersion and still follows.
        time.sleep(6)
        core.delete_namespaced_pod("kv-1", namespace, grace_period_seconds=0)
        wait_for(
            lambda: cache.view().free_bytes(0).get("kv-node") == 64 * GI,
            timeout=15,
            message="a deleted pod frees its memory",
        )
    finally:
        cache.stop()
