"""The live cache against the real apiserver: it syncs, follows binds and deletes, and survives reconnects.

It follows DRA ResourceSlices beside nodes, and an apiserver that does not serve the DRA API (as before
Kubernetes 1.34) leaves it synced with labels and annotations only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kubeview import ClusterCache, load_api_client
from kubeview.api import RESOURCE_SLICES, request_json
from tests.cluster.harness import ControlPlane, create_node, wait_for

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
        watches = cache.watches["Pod"]
        wait_for(lambda: cache.watches["Pod"] > watches, timeout=15, message="a new watch after the server's timeout")
        assert cache.lists["Pod"] == 1, "a watch that timed out is resumed, not re-listed"
        core.delete_namespaced_pod("kv-1", namespace, grace_period_seconds=0)
        wait_for(
            lambda: cache.view().free_bytes(0).get("kv-node") == 64 * GI,
            timeout=15,
            message="a deleted pod frees its memory",
        )
    finally:
        cache.stop()


def _slice(node: str, *memories: str, generation: int = 1) -> dict[str, Any]:
    devices = [
        {"name": f"gpu-{i}", "attributes": {"index": {"int": i}}, "capacity": {"memory": {"value": m}}}
        for i, m in enumerate(memories)
    ]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-gpu.example.com"},
        "spec": {
            "driver": "gpu.example.com",
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def _devices(cache: ClusterCache, node: str) -> list[int] | None:
    found = cache.view().node_index.get(node)
    return None if found is None else [d.memory_bytes // GI for d in found.devices]


def test_cache_follows_resourceslices_on_a_real_apiserver(control_plane: ControlPlane, node_factory: Any) -> None:
    api = control_plane.api_client()
    node_factory("kv-dra", capacity="64Gi")
    cache = ClusterCache(api, kinds=("Node",), watch_timeout_seconds=5).start()
    try:
        assert cache.wait_synced(30)
        assert cache.kinds == ("Node", "ResourceSlice") and not cache.absent["ResourceSlice"]
        assert _devices(cache, "kv-dra") == [64], "no slice yet: the capacity annotation's one device"
        created = request_json(api, "POST", RESOURCE_SLICES.path(), body=_slice("kv-dra", "40Gi", "40Gi"))
        wait_for(lambda: _devices(cache, "kv-dra") == [40, 40], timeout=15, message="the slice's two GPUs")
        request_json(api, "DELETE", RESOURCE_SLICES.path(name=created["metadata"]["name"]))
        wait_for(lambda: _devices(cache, "kv-dra") == [64], timeout=15, message="back to the annotation")
        assert cache.failures["ResourceSlice"] == 0
    finally:
        cache.stop()


# ----- stop, 410, backoff, no DRA: against an apiserver that serves watches from etcd and no DRA API ------------
# With its watch cache on (the session's control plane), an apiserver answers a watch from its own event
# buffer and etcd's compaction never shows. Without it, a watch from a compacted resourceVersion gets the
# ERROR event with code 410 that a long-lived client meets after an etcd compaction or a partition.
# The same apiserver does not serve resource.k8s.io/v1 (a cluster before 1.34): its Node authorizer, which
# watches ResourceSlices, is left out (RBAC alone), or /readyz would wait for them forever.


@pytest.fixture(scope="module")
def etcd_watches() -> Iterator[ControlPlane]:
    cp = ControlPlane.start_new(
        apiserver_extra_args=("--watch-cache=false", "--runtime-config=resource.k8s.io/v1=false"),
        authorization_mode="RBAC",
    )
    try:
        yield cp
    finally:
        cp.stop()


def test_stop_closes_the_watches_at_once(control_plane: ControlPlane) -> None:
    cache = ClusterCache(control_plane.api_client(), kinds=("Node", "Pod"), watch_timeout_seconds=300).start()
    assert cache.wait_synced(30)
    wait_for(lambda: all(cache.watches[k] >= 1 for k in cache.kinds), timeout=15, message="both watches open")
    t0 = time.monotonic()
    assert cache.stop(timeout=5), "a watch thread outlived stop()"
    assert time.monotonic() - t0 < 1.0, "stop() waited on a watch instead of closing it"
    assert cache.failures == {"Node": 0, "Pod": 0, "ResourceSlice": 0}, "a closed watch is not a failure to retry"


def test_a_watch_from_a_compacted_version_relists_and_follows(etcd_watches: ControlPlane) -> None:
    cp = etcd_watches
    api = cp.api_client()
    core = client.CoreV1Api(api)
    create_node(api, "kv-410", capacity="64Gi")
    cache = ClusterCache(api, kinds=("Node", "Pod"), watch_timeout_seconds=2).start()
    try:
        assert cache.wait_synced(30)
        # Other objects move the revision past the cache's; compaction forgets the history in between.
        for i in range(3):
            core.create_namespaced_config_map("default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"c{i}")))
        cp.compact_etcd()
        # The open watches end after 2 s; resumed from the compacted version they get ERROR 410: re-list.
        wait_for(lambda: cache.lists["Pod"] >= 2 and cache.lists["Node"] >= 2, timeout=20, message="re-lists")
        assert cache.failures == {"Node": 0, "Pod": 0, "ResourceSlice": 0}, "a 410 is re-listed at once"
        core.create_namespaced_pod("default", _pod("kv-2", "kv-410"))
        wait_for(lambda: cache.view().free_bytes(0).get("kv-410") == 48 * GI, timeout=15, message="still following")
    finally:
        cache.stop()


def test_a_refused_list_backs_off_and_recovers_when_allowed(etcd_watches: ControlPlane) -> None:
    cp = etcd_watches
    user = "kv-reader"
    cache = ClusterCache(load_api_client(str(cp.write_user_kubeconfig(user))), kinds=("Pod",)).start()
    try:
        t0 = time.monotonic()
        wait_for(lambda: cache.failures["Pod"] >= 5, timeout=20, message="five refused lists (403)")
        assert not cache.synced
        # 0.2 + 0.4 + 0.8 + 1.6 s of backoff before the fifth try: doubling, not a hot loop on the apiserver.
        assert time.monotonic() - t0 >= 3.0
        for args in (
            ("create", "clusterrole", "kv-pods", "--verb=get,list,watch", "--resource=pods"),
            ("create", "clusterrolebinding", "kv-reader", "--clusterrole=kv-pods", f"--user={user}"),
        ):
            res = cp.kubectl(*args)
            assert res.returncode == 0, res.stderr
        # The next try comes within the backoff cap (10 s): then it lists and watches.
        assert cache.wait_synced(25), "did not recover within the 10 s backoff cap once allowed"
    finally:
        cache.stop()


def test_without_the_dra_api_the_cache_syncs_on_labels_and_annotations(etcd_watches: ControlPlane) -> None:
    api = etcd_watches.api_client()
    create_node(api, "kv-no-dra", capacity="48Gi")
    create_node(api, "kv-no-dra-gfd", gfd_memory_mib=40960, gfd_count=2)
    cache = ClusterCache(api, kinds=("Node", "Pod"), absent_recheck_seconds=0.5).start()
    try:
        assert cache.wait_synced(30), "a 404 for ResourceSlices kept the cache from syncing"
        assert cache.absent["ResourceSlice"] and cache.objects("ResourceSlice") == []
        assert _devices(cache, "kv-no-dra") == [48]
        assert _devices(cache, "kv-no-dra-gfd") == [40, 40], "GFD labels still give a node its GPUs"
        # The API is asked again now and then (an upgrade is noticed without a restart), never as a failure.
        wait_for(lambda: cache.absent["ResourceSlice"] >= 3, timeout=10, message="ResourceSlices asked again")
        assert cache.synced and cache.failures == {"Node": 0, "Pod": 0, "ResourceSlice": 0}
        assert cache.lists["ResourceSlice"] == 0
    finally:
        cache.stop()
