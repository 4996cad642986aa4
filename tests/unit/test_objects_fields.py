"""Every field the budget reads from a Kubernetes object lands in the view, and every bad one is named exactly.

Why: a user who fixes a manifest reads the error, and the scheduler/webhook decide on these fields. A field read
under the wrong key, a default that drifts, or an error that loses the object's name goes unnoticed by tests
that only check that *some* error is raised; these tables pin the whole value and the whole message.
"""

from __future__ import annotations

import pytest

from budget import Device, Model, Node, ObjectError, Placement, PodRequest, SnapshotError
from budget.objects import (
    merge_models,
    model_from_deployment,
    model_from_inferencemodel,
    node_from_object,
    parse_time,
    placement_from_pod,
    pod_request_from_pod,
    view_from_objects,
)
from budget.snapshot import load_snapshot, parse_snapshot

pytestmark = pytest.mark.unit

GI = 2**30
LABEL = "inference.eh-ops.io/model"
MEMORY = "inference.eh-ops.io/memory"
T0 = 1767225600.0  # 2026-01-01T00:00:00Z


def deployment(replicas=None, name="d", namespace="ns", template_spec=None, annotations=None, labels=None):
    spec = {"template": {"metadata": {"annotations": {MEMORY: "8Gi"} if annotations is None else annotations},
                         "spec": template_spec or {}}}
    if replicas is not None:
        spec["replicas"] = replicas
    meta = {"name": name, "namespace": namespace, "labels": {LABEL: "m"} if labels is None else labels}
    return {"kind": "Deployment", "metadata": meta, "spec": spec}


def pod(status=None, meta=None, spec=None):
    metadata = {"name": "p", "namespace": "ns", "labels": {LABEL: "m"}, "annotations": {MEMORY: "16Gi"}, **(meta or {})}
    return {"kind": "Pod", "metadata": metadata, "spec": {"nodeName": "n1", **(spec or {})}, "status": status or {}}


# ---- what lands in the view ----


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            {"kind": "Node", "metadata": {"name": "a", "labels": {"x": "1"},
                                          "annotations": {"inference.eh-ops.io/memory-capacity": "1Gi"}}},
            Node("a", {"x": "1"}, GI, "annotation"), id="annotation-keeps-labels",
        ),
        pytest.param(
            {"kind": "Node", "metadata": {"name": "g", "labels": {"nvidia.com/gpu.memory": "81559"}}},
            Node("g", {"nvidia.com/gpu.memory": "81559"}, 81559 * 2**20, "gfd-labels", (Device(0, 81559 * 2**20),)),
            id="gfd-keeps-labels",
        ),
        pytest.param(
            {"kind": "Node", "metadata": {"name": "c", "labels": {"x": "1"}}},
            Node("c", {"x": "1"}, None, "none"), id="unbudgeted-keeps-labels",
        ),
    ],
)
def test_nodes_land_whole(obj, expected):
    assert node_from_object(obj) == expected


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            deployment(),
            Model("ns", "m", 8 * GI, "m", {}, 0.0, 1, None, None, "Deployment"), id="replicas-default-to-one",
        ),
        pytest.param(
            deployment(0, template_spec={"nodeSelector": {"pool": "gpu"}}),
            Model("ns", "m", 8 * GI, "m", {"pool": "gpu"}, 0.0, 0, None, None, "Deployment"),
            id="scaled-to-zero-with-selector",
        ),
    ],
)
def test_labelled_deployments_are_models(obj, expected):
    assert model_from_deployment(obj) == expected


def test_inferencemodel_defaults_and_backend():
    obj = {"kind": "InferenceModel", "metadata": {"name": "m"},
           "spec": {"memory": "1Gi", "backendUrl": "http://127.0.0.1:9000"}}
    assert model_from_inferencemodel(obj) == Model(
        "default", "m", GI, "m", {}, 600.0, 1, None, "http://127.0.0.1:9000", "InferenceModel"
    )


@pytest.mark.parametrize(
    ("status", "meta", "expected"),
    [
        pytest.param({}, {}, Placement("ns/p", "n1", 16 * GI, "ns/m", "", "Pending", None, False, state="starting"),
                     id="no-status-is-pending-not-ready"),
        pytest.param(
            {"phase": "Running", "startTime": "2026-01-01T00:00:00Z",
             "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]},
            {"uid": "u1"}, Placement("ns/p", "n1", 16 * GI, "ns/m", "u1", "Running", T0, True), id="running-ready",
        ),
        pytest.param({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}, {},
                     Placement("ns/p", "n1", 16 * GI, "ns/m", "", "Running", None, False, state="starting"),
                     id="ready-false"),
        pytest.param({"phase": "Running", "conditions": [{"type": "Initialized", "status": "True"}]}, {},
                     Placement("ns/p", "n1", 16 * GI, "ns/m", "", "Running", None, False), id="other-condition-true"),
        pytest.param({"phase": "Running", "conditions": ["Ready", {"type": "Ready", "status": "True"}]}, {},
                     Placement("ns/p", "n1", 16 * GI, "ns/m", "", "Running", None, True), id="junk-condition-skipped"),
        pytest.param({"phase": "Running", "conditions": {"type": "Ready", "status": "True"}}, {},
                     Placement("ns/p", "n1", 16 * GI, "ns/m", "", "Running", None, False),
                     id="conditions-not-a-list"),
        pytest.param({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
                     {"uid": "u1", "deletionTimestamp": "2026-01-01T00:00:30Z"},
                     Placement("ns/p", "n1", 16 * GI, "ns/m", "u1", "Running", None, True, state="stopping",
                               free_by=T0 + 30),
                     id="deleted-still-holds-until-its-grace-ends"),
    ],
)
def test_placements_land_whole(status, meta, expected):
    assert placement_from_pod(pod(status, meta)) == expected


def test_pod_requests_land_whole():
    assert pod_request_from_pod(pod(spec={"nodeSelector": {"pool": "gpu"}})) == PodRequest(
        "ns", "p", "", "ns/m", 16 * GI, {"pool": "gpu"}
    )


def test_a_pod_without_memory_takes_its_models_memory_in_the_view():
    view = view_from_objects([
        {"kind": "InferenceModel", "metadata": {"name": "m", "namespace": "ns"}, "spec": {"memory": "24Gi"}},
        pod(meta={"annotations": {}}),
        {"kind": "Pod", "metadata": {"name": "plain", "namespace": "ns"}, "spec": {"nodeName": "n1"}},
        {"kind": "ConfigMap", "metadata": {"name": "ignored"}},
    ])
    assert [(p.pod, p.memory_bytes) for p in view.placements] == [("ns/p", 24 * GI)]


def test_a_pod_of_a_model_in_another_namespace_gets_no_memory_from_it():
    with pytest.raises(ObjectError, match="model pod without annotation"):
        view_from_objects([
            {"kind": "InferenceModel", "metadata": {"name": "m", "namespace": "other"}, "spec": {"memory": "24Gi"}},
            pod(meta={"annotations": {}}),
        ])


@pytest.mark.parametrize(
    ("im_replicas", "dep_replicas", "expected"),
    [
        pytest.param(2, 3, 3, id="deployment-asks-more"),
        pytest.param(3, 3, 3, id="equal"),
        pytest.param(3, 1, 3, id="model-asks-more"),
    ],
)
def test_merge_budgets_for_the_larger_replicas(im_replicas, dep_replicas, expected):
    im = Model("ns", "m", GI, "m", {}, 600.0, im_replicas)
    dm = Model("ns", "m", 2 * GI, "m", {}, 0.0, dep_replicas, source="Deployment")
    other = Model("ns", "solo", GI, "solo", {}, 0.0, 1, source="Deployment")
    merged = merge_models([im], [dm, other])
    assert merged["ns/m"] is im if expected == im_replicas else merged["ns/m"].replicas == expected
    assert (merged["ns/m"].memory_bytes, merged["ns/m"].source) == (GI, "InferenceModel")
    assert merged["ns/solo"] == other


def _im(name, namespace=None, memory="1Gi"):
    meta = {"name": name} | ({"namespace": namespace} if namespace else {})
    return {"kind": "InferenceModel", "metadata": meta, "spec": {"memory": memory}}


MODELS_IN_ANY_ORDER = [
    _im("z"),  # no namespace: keyed `z`, after `b/m`
    _im("y"),
    _im("m", "b"),
    _im("m", "a"),
    deployment(name="d2", namespace="b", labels={LABEL: "m2"}, annotations={MEMORY: "12Gi"}),
    deployment(name="d1", namespace="b", labels={LABEL: "m2"}, annotations={MEMORY: "8Gi"}),
]


@pytest.mark.parametrize(
    "objects",
    [pytest.param(MODELS_IN_ANY_ORDER, id="as-listed"), pytest.param(MODELS_IN_ANY_ORDER[::-1], id="reversed")],
)
def test_the_view_does_not_depend_on_the_order_objects_arrive_in(objects):
    """Models come in object-key order (a watch delivers in any order); of two Deployments of one model,
    the first by name sets its memory, whichever arrived first."""
    view = view_from_objects(objects)
    assert list(view.models) == ["a/m", "b/m", "default/y", "default/z", "b/m2"]
    assert view.models["b/m2"].memory_bytes == 8 * GI


def test_an_object_listed_twice_in_a_snapshot_loads_once():
    """`kubectl get -o yaml` outputs concatenated by hand repeat objects, edited in between or not; the
    view counts each once: the later InferenceModel, the first labelled Deployment."""
    objects = [_im("m", "a"), _im("m", "a", memory="2Gi"), _im("m", "a", memory="2Gi"),
               deployment(), deployment(annotations={MEMORY: "4Gi"})]
    view = view_from_objects(objects)
    assert {k: m.memory_bytes for k, m in view.models.items()} == {"a/m": 2 * GI, "ns/m": 8 * GI}


def test_list_documents_are_flattened_and_empty_documents_skipped():
    snap = parse_snapshot(
        "---\n---\nkind: List\nitems:\n- {kind: Node, metadata: {name: a, annotations: "
        "{inference.eh-ops.io/memory-capacity: 1Gi}}}\n---\n"
        "kind: NodeList\nitems:\n- {kind: Node, metadata: {name: b}}\n"
    )
    assert [n.name for n in snap.view.nodes] == ["a", "b"]
    assert [o["metadata"]["name"] for o in snap.objects] == ["a", "b"]


def test_an_object_with_items_that_is_no_list_kind_is_an_object():
    with pytest.raises(SnapshotError, match="missing kind"):
        parse_snapshot("items: []\nmetadata: {name: x}\n")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param("", None, id="empty"),
        pytest.param("2026-01-01T00:00:00Z", T0, id="z"),
        pytest.param("2026-01-01T01:00:00+01:00", T0, id="offset"),
    ],
)
def test_parse_time(value, expected):
    assert parse_time(value) == expected


# ---- what a user reads when an object is wrong ----


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: model_from_deployment({"kind": "Deployment", "metadata": {"labels": "x"}}),
                     "Deployment ?: metadata.labels must be an object, got str", id="labels-str-no-name"),
        pytest.param(lambda: model_from_deployment({"kind": "Deployment", "metadata": "oops"}),
                     "Deployment ?: metadata.labels must be an object", id="metadata-not-a-mapping"),
        pytest.param(lambda: model_from_deployment({"metadata": {"name": "d", "labels": [1]}}),
                     "object d: metadata.labels must be an object, got list", id="no-kind"),
        pytest.param(lambda: model_from_deployment({"kind": "Deployment", "metadata": {"name": "d", "namespace": "ns",
                                                                                      "labels": 1}}),
                     "Deployment ns/d: metadata.labels must be an object, got int", id="namespaced"),
        pytest.param(lambda: node_from_object({"kind": "Node", "metadata": {"name": 5}}),
                     "Node without metadata.name", id="name-not-a-string"),
        pytest.param(lambda: node_from_object({"metadata": {}}), "object without metadata.name", id="kindless-no-name"),
        pytest.param(lambda: node_from_object({"kind": "Node", "metadata": {"name": "n", "namespace": 5}}),
                     "Node 5/n: metadata.namespace must be a string", id="namespace-not-a-string"),
        pytest.param(lambda: node_from_object({"kind": "Node", "metadata": {"name": "n", "labels": {
            "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "two"}}}),
                     "Node n: label nvidia.com/gpu.count: 'two' is not a memory quantity in whole bytes",
                     id="bad-gpu-count"),
        pytest.param(lambda: model_from_deployment(deployment(-1)),
                     "Deployment ns/d: spec.replicas must be a non-negative integer, got -1", id="deployment-negative"),
        pytest.param(lambda: model_from_deployment(deployment("2")),
                     "Deployment ns/d: spec.replicas must be a non-negative integer, got '2'", id="deployment-str"),
        pytest.param(lambda: model_from_deployment(deployment(True)),
                     "Deployment ns/d: spec.replicas must be a non-negative integer, got True", id="deployment-bool"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {}}),
                     "InferenceModel m: spec.memory is required", id="no-memory"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {"memory": "1GB"}}),
                     "InferenceModel m: spec.memory: '1GB' is not a memory quantity in whole bytes", id="bad-memory"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {"memory": "1Gi", "cooldownPeriod": "1d"}}),
                     "InferenceModel m: spec.cooldownPeriod: '1d' is not a duration", id="bad-cooldown"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {"memory": "1Gi", "backendUrl": 8000}}),
                     "InferenceModel m: spec.backendUrl must be a string, got 8000", id="backend-not-a-string"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {"memory": "1Gi"},
                                                        "status": {"lastRequestTime": "soon"}}),
                     "InferenceModel m: status.lastRequestTime: 'soon' is not an RFC 3339 time", id="bad-last-request"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {"memory": "1Gi", "eviction": {"idleAfter": "soon"}}}),
                     "InferenceModel m: spec.eviction.idleAfter: 'soon' is not a duration", id="bad-idle-after"),
        pytest.param(lambda: model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                                        "spec": {"memory": "1Gi", "admission": {"maxWait": "soon"}}}),
                     "InferenceModel m: spec.admission.maxWait: 'soon' is not a duration", id="bad-max-wait"),
        pytest.param(lambda: parse_time(5), "time: expected an RFC 3339 time, got 5", id="time-not-a-string"),
        pytest.param(lambda: placement_from_pod(pod({"startTime": "noon"})),
                     "Pod ns/p: status.startTime: 'noon' is not an RFC 3339 time", id="bad-start-time"),
        pytest.param(lambda: placement_from_pod(pod(meta={"deletionTimestamp": "later"})),
                     "Pod ns/p: metadata.deletionTimestamp: 'later' is not an RFC 3339 time",
                     id="bad-deletion-time"),
        pytest.param(lambda: view_from_objects([5]), "expected a Kubernetes object (a mapping), got int",
                     id="not-a-mapping"),
    ],
)
def test_errors_name_the_object_and_the_field(call, message):
    with pytest.raises(ObjectError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("kind: Node\nmetadata: {name: [\n",
                     "<snapshot>: not valid YAML at line 3, column 1: "
                     "expected the node content, but found '<stream end>'",
                     id="broken-yaml-line-and-column"),
        pytest.param("kind: Node\x00", "<snapshot>: not valid YAML: unacceptable character #x0000",
                     id="control-character-has-no-line"),
    ],
)
def test_yaml_errors_point_at_the_line(text, message):
    with pytest.raises(SnapshotError) as info:
        parse_snapshot(text)
    assert str(info.value).startswith(message), str(info.value)


def test_captured_at_is_read_from_the_list(tmp_path):
    path = tmp_path / "state.yaml"
    path.write_text(
        "kind: List\nmetadata: {annotations: {inference.eh-ops.io/captured-at: '2026-01-01T00:00:00Z'}}\n"
        "items:\n- {kind: Node, metadata: {name: a}}\n",
        encoding="utf-8",
    )
    snap = load_snapshot(path)
    assert snap.captured_at == T0
    assert snap.objects == ({"kind": "Node", "metadata": {"name": "a"}},)


def test_a_bad_capture_time_names_the_file_and_annotation(tmp_path):
    path = tmp_path / "state.yaml"
    path.write_text("kind: List\nmetadata: {annotations: {inference.eh-ops.io/captured-at: later}}\n"
                    "items:\n- {kind: Node, metadata: {name: a}}\n")
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert str(info.value) == f"{path}: inference.eh-ops.io/captured-at: 'later' is not an RFC 3339 time"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"\xff\xfe not utf-8", "cannot read", id="not-utf8"),
        pytest.param("kind: Node\nmetadata: {name: é}\n".encode(), None, id="utf8-name"),
    ],
)
def test_snapshot_files_are_utf8(tmp_path, content, message):
    path = tmp_path / "state.yaml"
    path.write_bytes(content)
    if message is None:
        assert [n.name for n in load_snapshot(path).view.nodes] == ["é"]
        return
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path)
    assert str(info.value).startswith(f"{path}: {message}: ")


def test_null_items_in_a_list_are_skipped_not_the_end():
    snap = parse_snapshot("kind: List\nitems:\n- null\n- {kind: Node, metadata: {name: a}}\n")
    assert [n.name for n in snap.view.nodes] == ["a"]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns"])
def test_rfc3339_is_utc_whatever_the_machines_zone(monkeypatch, zone):
    import time as clock
    from datetime import UTC, datetime

    from budget.objects import rfc3339

    monkeypatch.setenv("TZ", zone)
    clock.tzset()
    try:
        assert rfc3339(T0 + 0.9) == "2026-01-01T00:00:00Z"
        assert rfc3339(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00Z"
    finally:
        monkeypatch.undo()
        clock.tzset()
