"""The live cache's bookkeeping, fed events directly: views follow adds, updates, deletes and stale copies."""

import pytest

from kubeview import ClusterCache

pytestmark = pytest.mark.unit

GI = 2**30


def node(name="shadow", cap="128Gi"):
    return {"metadata": {"name": name, "resourceVersion": "1",
                         "annotations": {"inference.eh-ops.io/memory-capacity": cap}}}


def im(name, mem, replicas=0, rv="1"):
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
            "spec": {"memory": mem, "replicas": replicas, "modelName": name}}


def pod(name, model, node_name="shadow", rv="1", phase="Running"):
    return {"metadata": {"name": name, "namespace": "default", "uid": name, "resourceVersion": rv,
                         "labels": {"inference.eh-ops.io/model": model},
                         "annotations": {"inference.eh-ops.io/memory": "80Gi"}},
            "spec": {"nodeName": node_name}, "status": {"phase": phase}}


@pytest.fixture
def cache():
    return ClusterCache(api=None)  # never started: events are applied by hand


def test_view_follows_events(cache):
    cache.apply("Node", "ADDED", node())
    cache.apply("InferenceModel", "ADDED", im("model-a", "80Gi", 1))
    cache.apply("Pod", "ADDED", pod("a-1", "model-a"))
    v1 = cache.view()
    assert v1.free_bytes(0) == {"shadow": 48 * GI}
    assert cache.view() is v1, "the view is cached until something changes"
    cache.apply("Pod", "MODIFIED", pod("a-1", "model-a", rv="2", phase="Succeeded"))
    assert cache.view().free_bytes(0) == {"shadow": 128 * GI}, "a terminated pod frees its memory"
    cache.apply("Pod", "ADDED", pod("a-2", "model-a", rv="3"))
    cache.apply("Pod", "DELETED", pod("a-2", "model-a", rv="4"))
    assert cache.view().free_bytes(0) == {"shadow": 128 * GI}, "a deleted pod frees its memory at once"


def test_stale_event_is_ignored(cache):
    cache.apply("InferenceModel", "ADDED", im("model-a", "80Gi", 2, rv="10"))
    cache.apply("InferenceModel", "MODIFIED", im("model-a", "80Gi", 1, rv="9"))
    assert cache.view().models["default/model-a"].replicas == 2


def test_malformed_object_is_dropped_not_fatal(cache):
    cache.apply("InferenceModel", "ADDED", im("model-a", "80Gi", 1))
    cache.apply("InferenceModel", "MODIFIED", im("model-a", "80GB", 1, rv="2"))
    assert "default/model-a" not in cache.view().models
    assert cache.get("InferenceModel", "default", "model-a")["spec"]["memory"] == "80GB"


def test_listeners_see_events_and_their_failures_are_contained(cache):
    seen = []
    cache.add_listener(lambda kind, etype, obj: seen.append((kind, etype)))
    cache.add_listener(lambda *a: 1 / 0)
    cache.apply("Node", "ADDED", node())
    assert seen == [("Node", "ADDED")]
