"""Kubernetes objects -> view, and snapshot files: every malformed input gets a precise error."""

import pytest

from budget import ObjectError, SnapshotError
from budget.objects import (
    model_from_deployment,
    model_from_inferencemodel,
    node_from_object,
    placement_from_pod,
    pod_request_from_pod,
    view_from_objects,
)
from budget.snapshot import load_snapshot, parse_snapshot

pytestmark = pytest.mark.unit

GI = 2**30


def node(annotations=None, labels=None, name="n1"):
    return {"kind": "Node", "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}}


def im(spec, name="m", status=None):
    return {"kind": "InferenceModel", "metadata": {"name": name, "namespace": "ns"}, "spec": spec,
            "status": status or {}}


def pod(node_name="n1", phase="Running", labels=None, annotations=None):
    return {
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1",
                     "labels": {"inference.eh-ops.io/model": "m"} if labels is None else labels,
                     "annotations": {"inference.eh-ops.io/memory": "16Gi"} if annotations is None else annotations},
        "spec": {"nodeName": node_name} if node_name else {},
        "status": {"phase": phase, "startTime": "2026-01-01T00:00:00Z"},
    }


@pytest.mark.parametrize(
    ("obj", "capacity", "source"),
    [
        pytest.param(node({"inference.eh-ops.io/memory-capacity": "128Gi"}), 128 * GI, "annotation", id="annotation"),
        pytest.param(node(labels={"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "8"}), 640 * GI,
                     "gfd-labels", id="gfd"),
        pytest.param(node(labels={"nvidia.com/gpu.memory": "24576"}), 24 * GI, "gfd-labels", id="gfd-count-default-1"),
        pytest.param(node({"inference.eh-ops.io/memory-capacity": "96Gi"},
                          {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "2"}), 96 * GI, "annotation",
                     id="annotation-wins-over-gfd"),
        pytest.param(node(), None, "none", id="not-budgeted"),
    ],
)
def test_node_capacity_rule(obj, capacity, source):
    n = node_from_object(obj)
    assert (n.capacity_bytes, n.capacity_source) == (capacity, source)


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        pytest.param(node({"inference.eh-ops.io/memory-capacity": "lots"}), "memory-capacity", id="bad-capacity"),
        pytest.param(node(labels={"nvidia.com/gpu.memory": "80GB"}), "nvidia.com/gpu.memory", id="bad-gfd"),
        pytest.param({"kind": "Node", "metadata": {}}, "metadata.name", id="no-name"),
        pytest.param({"kind": "Node", "metadata": {"name": "x", "labels": ["a"]}}, "metadata.labels", id="labels-list"),
        pytest.param({"kind": "Node", "metadata": {"name": "x", "labels": {"a": 1}}}, "metadata.labels",
                     id="label-not-string"),
    ],
)
def test_bad_nodes_are_named(obj, fragment):
    with pytest.raises(ObjectError, match=fragment):
        node_from_object(obj)


def test_inferencemodel_fields_and_defaults():
    m = model_from_inferencemodel(im({"memory": "16Gi", "modelName": "llama-2-7b", "nodeSelector": {"p": "g"}},
                                     status={"lastRequestTime": "2026-01-15T10:30:00Z"}))
    assert (m.key, m.model_name, m.memory_bytes, m.cooldown_seconds, m.replicas) == (
        "ns/m", "llama-2-7b", 16 * GI, 600.0, 1)
    assert m.node_selector == {"p": "g"}
    assert m.last_request_time == 1768473000.0
    # No eviction policy: today's behaviour (only the cooldown stops it; requests get the 429 at once).
    assert (m.evict_idle_after_seconds, m.priority, m.pinned, m.max_wait_seconds) == (None, 0, False, 0.0)


def test_inferencemodel_eviction_policy():
    spec = {"memory": "80Gi", "eviction": {"idleAfter": "60s"}, "priority": -3, "pinned": True,
            "admission": {"maxWait": "2m"}}
    m = model_from_inferencemodel(im(spec))
    assert (m.evict_idle_after_seconds, m.priority, m.pinned, m.max_wait_seconds) == (60.0, -3, True, 120.0)


@pytest.mark.parametrize(
    ("spec", "status", "fragment"),
    [
        pytest.param({}, {}, "spec.memory is required", id="no-memory"),
        pytest.param({"memory": "16GB"}, {}, "spec.memory", id="bad-memory"),
        pytest.param({"memory": "1Gi", "cooldownPeriod": "ten"}, {}, "spec.cooldownPeriod", id="bad-cooldown"),
        pytest.param({"memory": "1Gi", "replicas": -1}, {}, "spec.replicas", id="negative-replicas"),
        pytest.param({"memory": "1Gi", "replicas": "2"}, {}, "spec.replicas", id="string-replicas"),
        pytest.param({"memory": "1Gi", "nodeSelector": "gpu"}, {}, "spec.nodeSelector", id="selector-string"),
        pytest.param({"memory": "1Gi"}, {"lastRequestTime": "yesterday"}, "lastRequestTime", id="bad-time"),
        pytest.param({"memory": "1Gi"}, {"lastRequestTime": "2026-01-01T00:00:00"}, "time zone", id="naive-time"),
        pytest.param({"memory": "1Gi", "modelName": 7}, {}, "spec.modelName", id="model-name-int"),
        pytest.param({"memory": "1Gi", "eviction": {"idleAfter": "soon"}}, {}, "spec.eviction.idleAfter",
                     id="bad-idle-after"),
        pytest.param({"memory": "1Gi", "eviction": "60s"}, {}, "spec.eviction", id="eviction-string"),
        pytest.param({"memory": "1Gi", "priority": "high"}, {}, "spec.priority", id="priority-string"),
        pytest.param({"memory": "1Gi", "pinned": "yes"}, {}, "spec.pinned", id="pinned-string"),
        pytest.param({"memory": "1Gi", "admission": {"maxWait": "2 min"}}, {}, "spec.admission.maxWait",
                     id="bad-max-wait"),
    ],
)
def test_bad_inferencemodels_are_named(spec, status, fragment):
    with pytest.raises(ObjectError, match=fragment) as info:
        model_from_inferencemodel(im(spec, status=status))
    assert "InferenceModel ns/m" in str(info.value)


def test_placement_rules():
    assert placement_from_pod(pod()).memory_bytes == 16 * GI
    assert placement_from_pod(pod(node_name=None)) is None, "unbound pods hold nothing"
    assert placement_from_pod(pod(phase="Succeeded")) is None, "terminated pods hold nothing"
    assert placement_from_pod(pod(phase="Failed")) is None
    assert placement_from_pod(pod(labels={})) is None, "non-model pods are not budgeted"
    assert placement_from_pod(pod(annotations={}), fallback_memory=GI).memory_bytes == GI
    with pytest.raises(ObjectError, match="inference.eh-ops.io/memory"):
        placement_from_pod(pod(annotations={}))


def test_pod_request_only_for_model_pods():
    assert pod_request_from_pod(pod(labels={})) is None
    r = pod_request_from_pod(pod())
    assert (r.model, r.memory_bytes, r.uid) == ("ns/m", 16 * GI, "u1")


def test_deployment_model_and_merge_takes_larger_replicas():
    dep = {
        "kind": "Deployment",
        "metadata": {"name": "m-server", "namespace": "ns", "labels": {"inference.eh-ops.io/model": "m"}},
        "spec": {"replicas": 3, "template": {"metadata": {"annotations": {"inference.eh-ops.io/memory": "8Gi"}}}},
    }
    dm = model_from_deployment(dep)
    assert (dm.key, dm.memory_bytes, dm.replicas) == ("ns/m", 8 * GI, 3)
    view = view_from_objects([node(), im({"memory": "16Gi", "replicas": 1}), dep])
    assert view.models["ns/m"].replicas == 3
    assert view.models["ns/m"].memory_bytes == 16 * GI, "the InferenceModel's memory wins"
    bad = {**dep, "spec": {"replicas": 1, "template": {}}}
    with pytest.raises(ObjectError, match="inference.eh-ops.io/memory"):
        model_from_deployment(bad)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "no Kubernetes objects", id="empty"),
        pytest.param("kind: Node\nmetadata: {name: [\n", "not valid YAML at line", id="broken-yaml"),
        pytest.param("- 1\n- 2\n", "expected a Kubernetes object", id="list-of-numbers"),
        pytest.param("just a string\n", "expected a Kubernetes object", id="scalar"),
        pytest.param("metadata: {name: x}\n", "missing kind", id="no-kind"),
        pytest.param("kind: InferenceModel\nmetadata: {name: m}\nspec: {memory: 1Gi}\n", "no Node objects",
                     id="no-nodes"),
        pytest.param("kind: List\nitems: 5\n", "items must be a list", id="items-not-list"),
        pytest.param("kind: Node\nmetadata: {name: n, annotations: {inference.eh-ops.io/memory-capacity: 1TB}}\n",
                     "memory-capacity", id="bad-capacity"),
    ],
)
def test_bad_snapshots_name_the_source(text, fragment):
    with pytest.raises(SnapshotError) as info:
        parse_snapshot(text, source="state.yaml")
    assert str(info.value).startswith("state.yaml: ")
    assert fragment in str(info.value)


def test_snapshot_missing_file(tmp_path):
    with pytest.raises(SnapshotError, match="no such file"):
        load_snapshot(tmp_path / "absent.yaml")


def test_seed_snapshot_loads_with_capture_time():
    snap = load_snapshot("examples/seed-scenario.yaml")
    assert snap.captured_at is not None
    assert sorted(snap.view.models) == ["default/model-a", "default/model-b", "default/model-c"]
    assert [p.node for p in snap.view.placements] == ["shadow"]
