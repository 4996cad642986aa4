"""The live cache against the real apiserver: it syncs, follows binds and deletes, and survives reconnects."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kubeview import ClusterCache, load_api_client
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


# ----- stop, 410, backoff: against an apiserver that serves watches from etcd ------------------------------
# With its watch cache on (the session's control plane), an apiserver answers a watch from its own event
# buffer and etcd's compaction never shows. Without it, a watch from a compacted resourceVersion gets the
# ERROR event with code 410 that a long-lived client meets after an etcd compaction or a partition.


@pytest.fixture(scope="module")
def etcd_watches() -> Iterator[ControlPlane]:
    cp = ControlPlane.start_new(apiserver_extra_args=("--watch-cache=false",))
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
    assert cache.failures == {"Node": 0, "Pod": 0}, "a closed watch is not a failure to retry"


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
        assert cache.failures == {"Node": 0, "Pod": 0}, "a 410 is re-listed at once, not backed off"
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
