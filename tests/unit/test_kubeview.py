"""The live cache's bookkeeping, fed events directly: views follow adds, updates, deletes and stale copies."""

import copy

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


# ----- the view never depends on the order objects arrive in -----
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from budget.objects import view_from_objects  # noqa: E402

MODELS = ("m0", "m1", "m2")


def _model_obj(name, memory_gi, replicas, rv):
    return {"kind": "InferenceModel", "metadata": {"name": name, "namespace": "default", "resourceVersion": str(rv)},
            "spec": {"memory": f"{memory_gi}Gi", "replicas": replicas, "modelName": name}}


def _deployment_obj(name, model, memory_gi, replicas, rv):
    return {"kind": "Deployment",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": str(rv),
                         "labels": {"inference.eh-ops.io/model": model}},
            "spec": {"replicas": replicas,
                     "template": {"metadata": {"annotations": {"inference.eh-ops.io/memory": f"{memory_gi}Gi"}}}}}


def _pod_obj(name, model, node_name, annotated_gi, phase, rv):
    meta = {"name": name, "namespace": "default", "uid": name, "resourceVersion": str(rv),
            "labels": {"inference.eh-ops.io/model": model}}
    if annotated_gi is not None:
        meta["annotations"] = {"inference.eh-ops.io/memory": f"{annotated_gi}Gi"}
    return {"kind": "Pod", "metadata": meta, "spec": {"nodeName": node_name}, "status": {"phase": phase}}


@st.composite
def histories(draw):
    """Each object's events in its own order (ADDED, MODIFIED..., maybe DELETED), as the watch delivers them."""
    rv = iter(range(1, 10_000))
    out = []
    for i in range(draw(st.integers(1, 2))):
        out.append([("Node", "ADDED", {"kind": "Node", "metadata": {
            "name": f"n{i}", "resourceVersion": str(next(rv)),
            "annotations": {"inference.eh-ops.io/memory-capacity": f"{draw(st.integers(16, 256))}Gi"}}})])
    for name in MODELS:
        versions = draw(st.lists(st.tuples(st.integers(1, 100), st.integers(0, 3)), max_size=3))
        events = [("InferenceModel", "ADDED" if j == 0 else "MODIFIED", _model_obj(name, gi, n, next(rv)))
                  for j, (gi, n) in enumerate(versions)]
        if events and draw(st.booleans()) and draw(st.booleans()):
            events.append(("InferenceModel", "DELETED", events[-1][2]))
        out.append(events)
        if draw(st.booleans()):  # an adopted Deployment labelled with the model
            gi, n = draw(st.integers(1, 100)), draw(st.integers(0, 4))
            out.append([("Deployment", "ADDED", _deployment_obj(f"d-{name}", name, gi, n, next(rv)))])
        for p in range(draw(st.integers(0, 3))):
            versions = draw(st.lists(st.tuples(st.sampled_from(["n0", "n1", ""]),
                                               st.sampled_from([None, None, 24]),
                                               st.sampled_from(["Running", "Pending", "Succeeded"])),
                                     min_size=1, max_size=3))
            out.append([("Pod", "ADDED" if j == 0 else "MODIFIED",
                         _pod_obj(f"{name}-{p}", name, node, gi, phase, next(rv)))
                        for j, (node, gi, phase) in enumerate(versions)])
    return [h for h in out if h]


def _final_objects(history_list):
    """What the cache holds at the end, less the pods it cannot budget: no annotation and no model."""
    final = {}
    for history in history_list:
        for kind, etype, obj in history:
            final[(kind, obj["metadata"]["name"])] = None if etype == "DELETED" else obj
    objects = [o for o in final.values() if o is not None]
    models = {o["metadata"]["name"] for o in objects if o["kind"] == "InferenceModel"}
    models |= {o["metadata"]["labels"]["inference.eh-ops.io/model"] for o in objects if o["kind"] == "Deployment"}

    def budgetable(o):
        if o["kind"] != "Pod" or "annotations" in o["metadata"]:
            return True
        unplaced = not o["spec"]["nodeName"] or o["status"]["phase"] == "Succeeded"
        return unplaced or o["metadata"]["labels"]["inference.eh-ops.io/model"] in models

    return [o for o in objects if budgetable(o)]


@settings(max_examples=150, deadline=None)
@given(history_list=histories(), data=st.data())
def test_the_view_is_the_same_whatever_order_the_objects_arrive_in(history_list, data):
    # An interleaving: a random order of slots, each slot taken by the next event of its object.
    slots = [i for i, h in enumerate(history_list) for _ in h]
    order = data.draw(st.permutations(slots))
    cursors = [0] * len(history_list)
    cache = ClusterCache(api=None)
    for i in order:
        kind, etype, obj = history_list[i][cursors[i]]
        cursors[i] += 1
        cache.apply(kind, etype, copy.deepcopy(obj))
    assert cache.view() == view_from_objects(_final_objects(history_list))


def test_a_pod_listed_before_its_model_is_placed_once_the_model_arrives(cache):
    """The bug this fixes: an adopted Deployment's pod (no memory annotation) listed before its model was
    dropped for good: 0 placements and 100Gi free instead of 20Gi."""
    cache.apply("Node", "ADDED", node(cap="100Gi"))
    cache.apply("Pod", "ADDED", _pod_obj("vllm-1", "model-a", "shadow", None, "Running", 5))
    assert cache.view().placements == ()
    cache.apply("InferenceModel", "ADDED", im("model-a", "80Gi", 1))
    assert cache.view().free_bytes(0) == {"shadow": 20 * GI}
    cache.apply("InferenceModel", "MODIFIED", im("model-a", "60Gi", 1, rv="7"))
    assert cache.view().free_bytes(0) == {"shadow": 40 * GI}, "the model's new memory reaches its pods"


# ----- DRA ResourceSlices: a node's devices follow its slices, whatever the order they arrive in -----------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from kubeview.cache import RESOURCE_SLICE, watched_kinds  # noqa: E402

CAPTURED_SLICES = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures/captured/resourceslices.json").read_text()
)["items"]


def captured_slice(node_name):
    (found,) = [s for s in CAPTURED_SLICES if s["spec"]["nodeName"] == node_name]
    return copy.deepcopy(found)


def devices_of(cache, name):
    node = cache.view().node_index.get(name)
    return None if node is None else [(d.index, d.memory_bytes // GI, d.kind, d.profile) for d in node.devices]


@pytest.mark.parametrize(
    ("kinds", "resource_slices", "watched"),
    [
        pytest.param(("Node", "Pod"), True, ("Node", "Pod", RESOURCE_SLICE), id="nodes-bring-their-slices"),
        pytest.param(("InferenceModel", "Deployment", "Pod"), True, ("InferenceModel", "Deployment", "Pod"),
                     id="no-nodes-no-slices"),
        pytest.param(("Node",), False, ("Node",), id="turned-off"),
        pytest.param(("Node", RESOURCE_SLICE), True, ("Node", RESOURCE_SLICE), id="asked-for-once"),
    ],
)
def test_a_cache_of_nodes_watches_their_resourceslices(kinds, resource_slices, watched):
    assert watched_kinds(kinds, resource_slices=resource_slices) == watched
    assert ClusterCache(api=None, kinds=kinds, resource_slices=resource_slices).kinds == watched


@pytest.mark.parametrize("slice_first", [False, True], ids=["node-then-slice", "slice-then-node"])
def test_a_node_gets_the_devices_its_slice_publishes(cache, slice_first):
    # A 2 x 40Gi GPU node that also carries an (older, coarser) capacity annotation: the slice wins.
    events = [("Node", node("gpu-2x40", "80Gi")), (RESOURCE_SLICE, captured_slice("gpu-2x40"))]
    for kind, obj in reversed(events) if slice_first else events:
        cache.apply(kind, "ADDED", obj)
    assert devices_of(cache, "gpu-2x40") == [(0, 40, "gpu", ""), (1, 40, "gpu", "")]
    assert cache.view().node_index["gpu-2x40"].capacity_source == "resourceslice"


def test_slice_changes_and_deletes_translate_the_node_again(cache):
    cache.apply("Node", "ADDED", node("gpu-mig", "40Gi"))
    published = captured_slice("gpu-mig")
    cache.apply(RESOURCE_SLICE, "ADDED", published)
    assert sorted(devices_of(cache, "gpu-mig"), key=lambda d: d[3]) == [
        (0, 4, "mig", "1g.5gb"), (1, 9, "mig", "2g.10gb"), (2, 19, "mig", "3g.20gb")]
    # The driver republishes the pool (new generation) with one slice fewer: the node follows at once.
    republished = copy.deepcopy(published)
    republished["metadata"]["resourceVersion"] = "7"
    republished["spec"]["pool"]["generation"] = 2
    del republished["spec"]["devices"][2]
    cache.apply(RESOURCE_SLICE, "MODIFIED", republished)
    assert sorted(d[3] for d in devices_of(cache, "gpu-mig")) == ["2g.10gb", "3g.20gb"]
    cache.apply(RESOURCE_SLICE, "DELETED", republished)
    assert devices_of(cache, "gpu-mig") == [(0, 40, "unified", "")], "without a slice, the annotation again"


def test_a_slice_of_no_node_or_of_another_node_leaves_a_node_alone(cache):
    cache.apply("Node", "ADDED", node("gpu-1x80", "64Gi"))
    network = captured_slice("gpu-2x40")
    network["metadata"]["name"] = "fabric"
    del network["spec"]["nodeName"]
    network["spec"]["allNodes"] = True
    for obj in (network, captured_slice("gpu-2x40")):
        cache.apply(RESOURCE_SLICE, "ADDED", obj)
    assert devices_of(cache, "gpu-1x80") == [(0, 64, "unified", "")]
    assert "gpu-2x40" not in cache.view().node_index, "a slice alone makes no node"
    cache.apply(RESOURCE_SLICE, "ADDED", captured_slice("gpu-1x80"))
    assert devices_of(cache, "gpu-1x80") == [(0, 80, "gpu", "")]
