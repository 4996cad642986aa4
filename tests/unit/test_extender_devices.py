"""The extender per device: captured scheduler requests over nodes whose devices come from captured
ResourceSlices. Pods are answered where each of their devices fits, reserve those devices, say per device
why not, and are bound with the indices in the Binding's `inference.eh-ops.io/devices` annotation.

Nodes (the captured node-a/b/c, each with the captured slice of one shape; the slice wins over the
capacity annotation): node-a two 40Gi GPUs, node-b one 80Gi GPU, node-c an A100-40GB cut into MIG
slices 3g.20gb, 2g.10gb and 1g.5gb.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from budget.decide import REASON_DEVICES, REASON_INSUFFICIENT
from budget.objects import ANNOTATION_DEVICES, ANNOTATION_MEMORY, LABEL_MODEL
from extender import CacheSource, ReservationBook, Settings, create_app
from tests.unit.test_extender_app import Clock, FakeWriter, as_model_pod, budgeted, captured

pytestmark = pytest.mark.unit

GI = 2**30
SLICES = json.loads((Path(__file__).resolve().parents[1] / "fixtures/captured/resourceslices.json").read_text())
SHAPES = {"node-a": "gpu-2x40", "node-b": "gpu-1x80", "node-c": "gpu-mig"}


def node_slice(node: str) -> dict[str, Any]:
    (found,) = [s for s in SLICES["items"] if s["spec"]["nodeName"] == SHAPES[node]]
    obj = copy.deepcopy(found)
    obj["kind"] = "ResourceSlice"
    obj["metadata"]["name"] = f"{node}-gpu.nvidia.com"
    obj["spec"].update(nodeName=node, pool={**obj["spec"]["pool"], "name": node})
    return obj


def model(name: str, memory: str, devices: int = 1, selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelName": name, "memory": memory, "replicas": 1, "devices": devices}
    if selector:
        spec["deviceSelector"] = selector
    return {"kind": "InferenceModel", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def bound(name: str, node: str, memory: str, devices: str, model_name: str = "other") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"uid-{name}",
            "labels": {LABEL_MODEL: model_name},
            "annotations": {ANNOTATION_MEMORY: memory, ANNOTATION_DEVICES: devices},
        },
        "spec": {"nodeName": node},
        "status": {"phase": "Running"},
    }


class DeviceEnv:
    """The extender app over the three GPU nodes, a fake writer and a fixed clock."""

    def __init__(self, *objects: dict[str, Any], settings: Settings | None = None) -> None:
        nodes = [budgeted(n, "1Gi") for n in captured("filter-nodes")["Nodes"]["items"]]
        slices = [node_slice(n) for n in SHAPES]
        self.source = CacheSource.from_objects([*nodes, *slices, *objects])
        self.writer = FakeWriter()
        self.source.writer = self.writer
        self.clock = Clock()
        settings = settings or Settings()
        self.book = ReservationBook(settings.reservation_ttl_seconds, clock=self.clock)
        self.client = create_app(settings, self.source, book=self.book).test_client()

    def filter(self, uid: str, memory: str, model_name: str, nodes: list[str] | None = None) -> dict[str, Any]:
        args = as_model_pod(captured("filter-nodenames"), memory, uid=uid, model=model_name)
        args["Pod"]["metadata"]["name"] = uid
        if nodes is not None:
            args["NodeNames"] = nodes
        response = self.client.post("/filter", json=args)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def bind(self, uid: str, node: str) -> dict[str, Any]:
        body = {"PodName": uid, "PodNamespace": "default", "PodUID": uid, "Node": node}
        return self.client.post("/bind", json=body).get_json()

    def devices_reserved(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {r.uid: (r.node, r.devices) for r in self.book.live(self.clock())}


@pytest.mark.parametrize(
    ("memory", "devices", "selector", "node", "annotation"),
    [
        pytest.param("60Gi", 1, None, "node-b", "0", id="60Gi-on-one-device-only-the-80Gi-GPU"),
        pytest.param("60Gi", 2, None, "node-a", "0,1", id="60Gi-over-two-devices-the-2x40Gi-node"),
        pytest.param("16Gi", 1, {"kind": "mig"}, "node-c", "2", id="mig-selector-the-3g.20gb-slice"),
        pytest.param("4Gi", 1, {"profile": "1g.5gb"}, "node-c", "0", id="mig-profile-the-1g.5gb-slice"),
        pytest.param("30Gi", 1, None, "node-a", "0", id="spread-nodes-binpack-devices"),
    ],
)
def test_a_pod_goes_where_its_devices_fit_and_is_bound_with_their_indices(
    memory: str, devices: int, selector: dict[str, str] | None, node: str, annotation: str
) -> None:
    env = DeviceEnv(model("m", memory, devices, selector))
    body = env.filter("p1", memory, "m")
    assert body["NodeNames"] == [node], body
    assert env.devices_reserved() == {"p1": (node, tuple(int(i) for i in annotation.split(",")))}
    assert env.bind("p1", node) == {"Error": ""}
    assert env.writer.bindings == [("default", "p1", "p1", node)]
    assert env.writer.annotations["p1"] == {ANNOTATION_DEVICES: annotation}, "the indices ride on the Binding"


def test_pods_filtered_before_either_is_bound_take_different_gpus() -> None:
    env = DeviceEnv(model("m", "30Gi"))
    assert env.filter("p1", "30Gi", "m", ["node-a"])["NodeNames"] == ["node-a"]
    assert env.filter("p2", "30Gi", "m", ["node-a"])["NodeNames"] == ["node-a"]
    assert env.devices_reserved() == {"p1": ("node-a", (0,)), "p2": ("node-a", (1,))}
    third = env.filter("p3", "30Gi", "m", ["node-a"])
    assert third["NodeNames"] == [], "each GPU holds 30Gi of its 40Gi: a third 30Gi fits neither"
    assert [env.bind(p, "node-a") for p in ("p1", "p2")] == [{"Error": ""}] * 2
    assert env.writer.annotations == {"p1": {ANNOTATION_DEVICES: "0"}, "p2": {ANNOTATION_DEVICES: "1"}}


def test_fragmentation_across_gpus_is_refused_per_device() -> None:
    # 24Gi over 2 devices: node-a has 20Gi free, 10Gi on each GPU; node-b has one GPU; node-c's slices are small.
    env = DeviceEnv(model("tp", "24Gi", 2), bound("x", "node-a", "30Gi", "0"), bound("y", "node-a", "30Gi", "1"))
    body = env.filter("p1", "24Gi", "tp")
    assert body["NodeNames"] == [] and body["Error"] == ""
    reasons = {**body["FailedNodes"], **body["FailedAndUnresolvableNodes"]}
    assert reasons == {
        "node-a": f"{REASON_INSUFFICIENT} (12Gi on each of 2 devices; GPU 0 has 10Gi free of 40Gi, GPU 1 has 10Gi "
        "free of 40Gi)",
        "node-b": f"{REASON_DEVICES} (needs 2, has 1)",
        "node-c": f"{REASON_INSUFFICIENT} (12Gi on each of 2 devices; MIG 1g.5gb 0 has 4864Mi free of 4864Mi, "
        "MIG 2g.10gb 1 has 9856Mi free of 9856Mi, MIG 3g.20gb 2 has 19968Mi free of 19968Mi)",
    }
    assert "node-a" in body["FailedNodes"], "node-a fits once a replica goes: failed, not unresolvable"
    assert len(env.book) == 0


def test_a_deviceselector_no_device_matches_says_how_many_match() -> None:
    env = DeviceEnv(model("m", "4Gi", 1, {"profile": "7g.80gb"}))
    body = env.filter("p1", "4Gi", "m", ["node-c"])
    assert body["FailedAndUnresolvableNodes"] == {
        "node-c": f"{REASON_DEVICES} (needs 1 matching its deviceSelector, has 0)"
    }


def test_bind_re_checks_per_device_and_names_the_devices_when_they_are_gone() -> None:
    env = DeviceEnv(model("m", "30Gi"))
    assert env.filter("p1", "30Gi", "m", ["node-b"])["NodeNames"] == ["node-b"]
    # Meanwhile another scheduler bound a 60Gi pod to node-b's only GPU.
    env.source.cache.apply("Pod", "ADDED", bound("z", "node-b", "60Gi", "0"))
    body = env.bind("p1", "node-b")
    assert body["Error"] == (
        f"pod default/p1 cannot be bound to node-b: {REASON_INSUFFICIENT} (30Gi on 1 device; GPU 0 has 20Gi free "
        "of 80Gi)"
    )
    assert env.writer.bindings == []


def test_a_unified_memory_node_keeps_the_bare_reason_and_device_zero() -> None:
    """Nodes with only the capacity annotation answer as before devices existed (reasons the scheduler can
    group); a bound pod is told device 0, its node's one unified-memory device."""
    nodes = [budgeted(n) for n in captured("filter-nodes")["Nodes"]["items"]]  # 24, 48, 80Gi
    source = CacheSource.from_objects([*nodes, model("m", "60Gi")])
    writer = FakeWriter()
    source.writer = writer
    client = create_app(Settings(), source).test_client()
    args = as_model_pod(captured("filter-nodenames"), "60Gi", uid="u1", model="m")
    body = client.post("/filter", json=args).get_json()
    assert body["NodeNames"] == ["node-c"]
    assert set(body["FailedAndUnresolvableNodes"].values()) == {REASON_INSUFFICIENT}
    bind = {"PodName": "nc-pod-1", "PodNamespace": "default", "PodUID": "u1", "Node": "node-c"}
    assert client.post("/bind", json=bind).get_json() == {"Error": ""}
    assert writer.annotations["nc-pod-1"] == {ANNOTATION_DEVICES: "0"}


def test_debug_view_lists_each_device_with_what_is_free() -> None:
    env = DeviceEnv(model("tp", "60Gi", 2), bound("x", "node-a", "60Gi", "0,1", "tp"))
    view = env.client.get("/debug/view").get_json()["nodes"]
    assert view["node-a"]["capacitySource"] == "resourceslice"
    assert [(d["index"], d["kind"], d["capacityBytes"], d["freeBytes"]) for d in view["node-a"]["devices"]] == [
        (0, "gpu", 40 * GI, 10 * GI),
        (1, "gpu", 40 * GI, 10 * GI),
    ]
    assert [(d["kind"], d["profile"]) for d in view["node-c"]["devices"]] == [
        ("mig", "1g.5gb"),
        ("mig", "2g.10gb"),
        ("mig", "3g.20gb"),
    ]


@pytest.mark.parametrize("score", ["spread", "binpack"])
def test_within_a_node_devices_are_bin_packed_whatever_the_node_strategy(score: str) -> None:
    """The fullest GPU that fits, as the webhook's decision would place it: GPU 0 stays whole for a 40Gi replica."""
    env = DeviceEnv(model("m", "10Gi"), bound("x", "node-a", "20Gi", "1"), settings=Settings(score_strategy=score))
    assert env.filter("p1", "10Gi", "m", ["node-a"])["NodeNames"] == ["node-a"]
    assert env.devices_reserved() == {"p1": ("node-a", (1,))}


def test_the_nodes_form_takes_devices_from_the_watched_resourceslices() -> None:
    """Node objects in the request carry labels and annotations; their slices come from the watch."""
    env = DeviceEnv(model("tp", "60Gi", 2))
    args = as_model_pod(captured("filter-nodes"), "60Gi", uid="p1", model="tp")
    args["Nodes"]["items"] = [budgeted(n, "1Gi") for n in args["Nodes"]["items"]]  # 1Gi: the slices must win
    body = env.client.post("/filter", json=args).get_json()
    assert [n["metadata"]["name"] for n in body["Nodes"]["items"]] == ["node-a"]
    assert env.devices_reserved() == {"p1": ("node-a", (0, 1))}
