"""Device inventory: every source (annotation, GFD GPU and MIG labels, DRA ResourceSlices) lands as devices."""

import re

import pytest

from budget import Device, Node, ObjectError
from budget.objects import (
    ANNOTATION_DEVICES,
    apply_resourceslices,
    devices_from_resourceslices,
    format_device_indices,
    model_from_inferencemodel,
    node_from_object,
    parse_device_indices,
    parse_devices,
    placement_from_pod,
    view_from_objects,
)

pytestmark = pytest.mark.unit

GI = 2**30
MI = 2**20


def node(annotations=None, labels=None, name="n1"):
    return {"kind": "Node", "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}}


def rslice(node_name, devices, *, name="s", driver="gpu.nvidia.com", pool=None, generation=1):
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node_name,
            "pool": {"name": pool or node_name, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def gpu(name, memory, index=None, product="NVIDIA A100-SXM4-80GB"):
    attributes = {"type": {"string": "gpu"}, "productName": {"string": product}}
    if index is not None:
        attributes["index"] = {"int": index}
    return {"name": name, "attributes": attributes, "capacity": {"memory": {"value": memory}}}


def mig(name, memory, profile):
    return {
        "name": name,
        "attributes": {"type": {"string": "mig"}, "gpu.nvidia.com/profile": {"string": profile}},
        "capacity": {"gpu.nvidia.com/memory": {"value": memory}},
    }


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        pytest.param("4x80Gi", [80 * GI] * 4, id="count-times-size"),
        pytest.param("80Gi,80Gi,40Gi", [80 * GI, 80 * GI, 40 * GI], id="list"),
        pytest.param("2x80Gi,40Gi", [80 * GI, 80 * GI, 40 * GI], id="mixed"),
        pytest.param("24G", [24 * 10**9], id="one-decimal"),
        pytest.param("1x1.5Gi", [3 * GI // 2], id="fraction-in-eighths"),
        pytest.param("2x1", [1, 1], id="one-byte-devices"),
        pytest.param("1024x1Gi", [GI] * 1024, id="at-most-1024-devices"),
        pytest.param("1000x1Gi,24x2Gi", [GI] * 1000 + [2 * GI] * 24, id="1024-over-two-items"),
    ],
)
def test_devices_annotation_grammar(text, sizes):
    assert parse_devices(text) == sizes


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "expected devices like 4x80Gi", id="empty"),
        pytest.param("0x80Gi", "the count before 'x' must be a whole number >= 1", id="zero-count"),
        pytest.param("-1x80Gi", "the count before 'x' must be a whole number >= 1", id="negative-count"),
        pytest.param("x80Gi", "the count before 'x' must be a whole number >= 1", id="no-count"),
        pytest.param("2x", "is not a memory quantity", id="no-size"),
        pytest.param("80Gi,,40Gi", "is not a memory quantity", id="empty-item"),
        pytest.param("80Gi, 40Gi", "remove the spaces", id="space"),
        pytest.param("4x100m", "did you mean 100Mi", id="milli-typo"),
        pytest.param("2x0", "has no memory", id="zero-size"),
        pytest.param("2000x1Gi", "more than 1024 devices", id="too-many"),
        pytest.param("1025x1Gi", "more than 1024 devices", id="one-too-many"),
        pytest.param("1000x1Gi,25x1Gi", "more than 1024 devices", id="one-too-many-over-two-items"),
    ],
)
def test_devices_annotation_refused(text, fragment):
    with pytest.raises(ObjectError, match=fragment):
        parse_devices(text)


@pytest.mark.parametrize(
    ("obj", "source", "devices"),
    [
        pytest.param(
            node(labels={"nvidia.com/gpu.memory": "40960", "nvidia.com/gpu.count": "2",
                         "nvidia.com/gpu.product": "A100-40GB"}),
            "gfd-labels", [Device(0, 40 * GI, "gpu", "", "A100-40GB"), Device(1, 40 * GI, "gpu", "", "A100-40GB")],
            id="gfd-two-gpus",
        ),
        pytest.param(
            node(labels={"nvidia.com/mig.strategy": "mixed", "nvidia.com/gpu.product": "A100-80GB",
                         "nvidia.com/mig-3g.40gb.count": "1", "nvidia.com/mig-3g.40gb.memory": "40192",
                         "nvidia.com/mig-1g.10gb.count": "2", "nvidia.com/mig-1g.10gb.memory": "9856",
                         "nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "1"}),
            "gfd-mig-labels",
            [Device(0, 9856 * MI, "mig", "1g.10gb", "A100-80GB"), Device(1, 9856 * MI, "mig", "1g.10gb", "A100-80GB"),
             Device(2, 40192 * MI, "mig", "3g.40gb", "A100-80GB")],
            id="mig-mixed-per-profile",
        ),
        pytest.param(
            node(labels={"nvidia.com/mig-2g.20gb.memory": "19968"}),
            "gfd-mig-labels", [Device(0, 19968 * MI, "mig", "2g.20gb")], id="mig-count-defaults-to-one",
        ),
        pytest.param(
            node(labels={"nvidia.com/gpu.memory": "4864", "nvidia.com/gpu.count": "1",
                         "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"}),
            "gfd-labels", [Device(0, 4864 * MI, "gpu", "", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb")],
            id="mig-product-without-single-strategy-is-a-gpu",
        ),
        pytest.param(
            node(labels={"nvidia.com/mig.strategy": "single", "nvidia.com/gpu.memory": "40960",
                         "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}),
            "gfd-labels", [Device(0, 40 * GI, "gpu", "", "NVIDIA-A100-SXM4-40GB")],
            id="single-strategy-without-mig-product-is-a-gpu",
        ),
        pytest.param(
            node(labels={"nvidia.com/gpu.memory": "1", "nvidia.com/gpu.count": "1024"}),
            "gfd-labels", [Device(i, MI) for i in range(1024)], id="1024-gpus",
        ),
        pytest.param(
            node(labels={"nvidia.com/mig-a.count": "1000", "nvidia.com/mig-a.memory": "1",
                         "nvidia.com/mig-b.count": "24", "nvidia.com/mig-b.memory": "1"}),
            "gfd-mig-labels", [Device(i, MI, "mig", "a" if i < 1000 else "b") for i in range(1024)],
            id="1024-mig-slices-over-two-profiles",
        ),
        pytest.param(
            node(labels={"nvidia.com/mig.strategy": "single", "nvidia.com/gpu.memory": "4864",
                         "nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"}),
            "gfd-mig-labels",
            [Device(i, 4864 * MI, "mig", "1g.5gb", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb") for i in range(2)],
            id="mig-single-strategy",
        ),
        pytest.param(
            node(annotations={ANNOTATION_DEVICES: "80Gi,40Gi", "inference.eh-ops.io/memory-capacity": "1Gi"},
                 labels={"nvidia.com/gpu.memory": "1024", "nvidia.com/gpu.product": "H100"}),
            "devices-annotation", [Device(0, 80 * GI, product="H100"), Device(1, 40 * GI, product="H100")],
            id="annotation-wins-over-capacity-and-labels",
        ),
        pytest.param(
            node(annotations={ANNOTATION_DEVICES: "24Gi,24Gi"}),
            "devices-annotation", [Device(0, 24 * GI), Device(1, 24 * GI)], id="annotation-without-gfd-has-no-product",
        ),
        pytest.param(
            node(labels={"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "0"}),
            "gfd-labels", [Device(0, 0, "unified")], id="zero-gpus-budgeted-with-no-room",
        ),
        pytest.param(
            node(annotations={"inference.eh-ops.io/memory-capacity": "128Gi"}),
            "annotation", [Device(0, 128 * GI, "unified")], id="memory-capacity-is-one-unified-device",
        ),
        pytest.param(node(), "none", [], id="unbudgeted-has-none"),
    ],
)
def test_node_inventory(obj, source, devices):
    n = node_from_object(obj)
    assert (n.name, dict(n.labels), n.capacity_source, list(n.devices)) == (
        "n1", obj["metadata"]["labels"], source, devices)
    assert n.capacity_bytes == (sum(d.memory_bytes for d in devices) if devices else None)


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        pytest.param(node(annotations={ANNOTATION_DEVICES: "4x"}), "Node n1: annotation inference.eh-ops.io/devices",
                     id="bad-annotation-names-node"),
        pytest.param(node(labels={"nvidia.com/mig-1g.10gb.count": "2"}),
                     "nvidia.com/mig-1g.10gb.memory is required", id="mig-count-without-memory"),
        pytest.param(node(labels={"nvidia.com/mig-1g.10gb.count": "x", "nvidia.com/mig-1g.10gb.memory": "9856"}),
                     "label nvidia.com/mig-1g.10gb.count", id="mig-bad-count"),
        pytest.param(node(labels={"nvidia.com/mig-1g.10gb.count": "1", "nvidia.com/mig-1g.10gb.memory": "9GB"}),
                     "Node n1: label nvidia.com/mig-1g.10gb.memory: '9GB'", id="mig-bad-memory-named"),
        pytest.param(node(labels={"nvidia.com/gpu.memory": "1", "nvidia.com/gpu.count": "1025"}),
                     "label nvidia.com/gpu.count: '1025' is more than 1024 devices", id="1025-gpus"),
        pytest.param(node(labels={"nvidia.com/mig-a.count": "1025", "nvidia.com/mig-a.memory": "1"}),
                     "label nvidia.com/mig-a.count: '1025' is more than 1024 devices", id="1025-mig-slices"),
        pytest.param(node(labels={"nvidia.com/mig-a.count": "1000", "nvidia.com/mig-a.memory": "1",
                                  "nvidia.com/mig-b.count": "25", "nvidia.com/mig-b.memory": "1"}),
                     "label nvidia.com/mig-b.count: '25' is more than 1024 devices", id="1025-over-two-profiles"),
    ],
)
def test_node_inventory_refused(obj, fragment):
    with pytest.raises(ObjectError, match=fragment):
        node_from_object(obj)


SLICES = {
    "two-gpus-by-index": (
        [rslice("n1", [gpu("gpu-1", "40Gi", 1), gpu("gpu-0", "80Gi", 0)])],
        {"n1": [Device(0, 80 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-1")]},
    ),
    "mig-profiles": (
        [rslice("n1", [mig("gpu-0-mig-10", "10Gi", "1g.10gb"), mig("gpu-0-mig-2", "20Gi", "2g.20gb")])],
        {"n1": [Device(0, 20 * GI, "mig", "2g.20gb", "", "gpu-0-mig-2"),
                Device(1, 10 * GI, "mig", "1g.10gb", "", "gpu-0-mig-10")]},
    ),
    "devices-without-memory-ignored": (
        [rslice("n1", [{"name": "nic-0", "attributes": {}}, gpu("gpu-0", "24Gi", 0)])],
        {"n1": [Device(0, 24 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0")]},
    ),
    "stale-generation-ignored": (
        [rslice("n1", [gpu("gpu-0", "40Gi", 0)], name="old", generation=1),
         rslice("n1", [gpu("gpu-0", "80Gi", 0)], name="new", generation=2)],
        {"n1": [Device(0, 80 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0")]},
    ),
    "slices-of-one-pool-join": (
        [rslice("n1", [gpu("gpu-0", "40Gi", 0)], name="a"), rslice("n1", [gpu("gpu-1", "40Gi", 1)], name="b")],
        {"n1": [Device(0, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-1")]},
    ),
    "not-node-local-ignored": (
        [{"kind": "ResourceSlice", "metadata": {"name": "net"},
          "spec": {"driver": "x.example.com", "allNodes": True, "pool": {"name": "p", "generation": 1},
                   "devices": [gpu("gpu-0", "40Gi", 0)]}}],
        {},
    ),
    "names-in-natural-order": (
        [rslice("n1", [gpu("dev-10", "1Gi"), gpu("dev-2", "2Gi"), gpu("dev-b", "3Gi"), gpu("dev-a", "4Gi")])],
        {"n1": [Device(0, 2 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "dev-2"),
                Device(1, GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "dev-10"),
                Device(2, 4 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "dev-a"),
                Device(3, 3 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "dev-b")]},
    ),
    "index-attribute-wins-over-name": (
        [rslice("n1", [gpu("a", "40Gi", 1), gpu("b", "80Gi", 0), gpu("c", "20Gi")])],
        {"n1": [Device(0, 80 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "b"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "a"),
                Device(2, 20 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "c")]},
    ),
    "slice-without-generation-is-generation-0": (
        [{"kind": "ResourceSlice", "metadata": {"name": "s"},
          "spec": {"driver": "d.example.com", "nodeName": "n1", "pool": {"name": "n1"}, "devices": [gpu("g", "8Gi")]}}],
        {"n1": [Device(0, 8 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "g")]},
    ),
    "pool-without-name-is-the-node": (
        [{"kind": "ResourceSlice", "metadata": {"name": "old"},
          "spec": {"driver": "d", "nodeName": "n1", "pool": {"generation": 1}, "devices": [gpu("g", "8Gi")]}},
         {"kind": "ResourceSlice", "metadata": {"name": "new"},
          "spec": {"driver": "d", "nodeName": "n1", "pool": {"name": "n1", "generation": 2},
                   "devices": [gpu("g", "16Gi")]}}],
        {"n1": [Device(0, 16 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "g")]},
    ),
    "a-non-local-slice-does-not-stop-the-others": (
        [{"kind": "ResourceSlice", "metadata": {"name": "net"},
          "spec": {"driver": "x", "allNodes": True, "pool": {"name": "p", "generation": 1}, "devices": []}},
         {"kind": "ResourceSlice", "metadata": {"name": "empty"},
          "spec": {"driver": "x", "nodeName": "", "pool": {"name": "q", "generation": 1},
                   "devices": [gpu("g", "1Gi")]}},
         rslice("n1", [gpu("gpu-0", "24Gi", 0)])],
        {"n1": [Device(0, 24 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0")]},
    ),
    "drivers-keep-their-own-generations-and-come-in-driver-order": (
        [rslice("n1", [gpu("gpu-0", "40Gi", 0)], name="b", driver="b.example.com", pool="n1", generation=5),
         rslice("n1", [gpu("x-0", "20Gi", 0)], name="a", driver="a.example.com", pool="n1", generation=1)],
        {"n1": [Device(0, 20 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "x-0"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0")]},
    ),
    "mig-by-type-attribute-or-profile": (
        [rslice("n1", [{"name": "m0", "attributes": {"type": {"string": "mig"}},
                        "capacity": {"memory": {"value": "5Gi"}}},
                       mig("m1", "10Gi", "1g.10gb")])],
        {"n1": [Device(0, 5 * GI, "mig", "", "", "m0"), Device(1, 10 * GI, "mig", "1g.10gb", "", "m1")]},
    ),
    "mig-index-attribute-ignored": (
        [rslice("n1", [{"name": "b", "attributes": {"profile": {"string": "1g.10gb"}, "index": {"int": 0}},
                        "capacity": {"memory": {"value": "10Gi"}}},
                       {"name": "a", "attributes": {"profile": {"string": "1g.10gb"}, "index": {"int": 1}},
                        "capacity": {"memory": {"value": "10Gi"}}}])],
        {"n1": [Device(0, 10 * GI, "mig", "1g.10gb", "", "a"), Device(1, 10 * GI, "mig", "1g.10gb", "", "b")]},
    ),
    "bool-index-is-no-index": (
        [rslice("n1", [{"name": "a", "attributes": {"index": {"int": True}}, "capacity": {"memory": {"value": "1Gi"}}},
                       gpu("b", "2Gi", 5)])],
        {"n1": [Device(0, 2 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "b"), Device(1, GI, "gpu", "", "", "a")]},
    ),
    # Pools named apart from the node (as drivers name them): each keeps its own generation.
    "pools-named-apart-from-the-node-keep-their-own-generations": (
        [rslice("n1", [gpu("gpu-0", "80Gi", 0)], name="a", pool="gpu-pool-a", generation=3),
         rslice("n1", [gpu("gpu-1", "40Gi", 1)], name="b", pool="gpu-pool-b", generation=1)],
        {"n1": [Device(0, 80 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-1")]},
    ),
    "the-newer-generation-listed-first-still-wins": (
        [rslice("n1", [gpu("gpu-0", "80Gi", 0)], name="new", generation=2),
         rslice("n1", [gpu("gpu-0", "40Gi", 0)], name="old", generation=1)],
        {"n1": [Device(0, 80 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0")]},
    ),
    "generation-0-and-no-generation-are-one-generation": (
        [rslice("n1", [gpu("gpu-0", "40Gi", 0)], name="a", generation=0),
         {"kind": "ResourceSlice", "metadata": {"name": "b"},
          "spec": {"driver": "gpu.nvidia.com", "nodeName": "n1", "pool": {"name": "n1"},
                   "devices": [gpu("gpu-1", "40Gi", 1)]}}],
        {"n1": [Device(0, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-1")]},
    ),
    "a-device-without-a-name": (
        [rslice("n1", [{"capacity": {"memory": {"value": "24Gi"}}}])],
        {"n1": [Device(0, 24 * GI, "gpu", "", "", "")]},
    ),
    # Two pools of one driver both publish a `gpu-0` without an index: both count, in the order listed.
    "two-pools-name-the-same-device": (
        [rslice("n1", [gpu("gpu-0", "80Gi")], name="a", pool="pool-a"),
         rslice("n1", [gpu("gpu-0", "40Gi")], name="b", pool="pool-b")],
        {"n1": [Device(0, 80 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0"),
                Device(1, 40 * GI, "gpu", "", "NVIDIA A100-SXM4-80GB", "gpu-0")]},
    ),
    "memory-among-other-capacities": (
        [rslice("n1", [{"name": "gpu-0", "capacity": {"cores": {"value": "8"}, "memory": {"value": "40Gi"}}}])],
        {"n1": [Device(0, 40 * GI, "gpu", "", "", "gpu-0")]},
    ),
}


@pytest.mark.parametrize(("slices", "expected"), list(SLICES.values()), ids=list(SLICES))
def test_resourceslices_translated(slices, expected):
    assert {n: list(d) for n, d in devices_from_resourceslices(slices).items()} == expected


@pytest.mark.parametrize(
    ("generation", "fragment"),
    [
        pytest.param("2", "ResourceSlice s: spec.pool.generation must be an integer, got '2'", id="string"),
        pytest.param(True, "ResourceSlice s: spec.pool.generation must be an integer, got True", id="bool"),
    ],
)
def test_resourceslice_generation_must_be_an_integer(generation, fragment):
    with pytest.raises(ObjectError, match=fragment):
        devices_from_resourceslices([rslice("n1", [gpu("g", "1Gi")], generation=generation)])


def test_resourceslices_win_over_labels_in_the_view():
    view = view_from_objects([
        node(annotations={"inference.eh-ops.io/memory-capacity": "128Gi"}),
        node(name="n2", annotations={"inference.eh-ops.io/memory-capacity": "64Gi"}),
        rslice("n1", [gpu("gpu-0", "40Gi", 0), gpu("gpu-1", "40Gi", 1)]),
    ])
    by_name = view.node_index
    assert (by_name["n1"].capacity_source, by_name["n1"].capacity_bytes, len(by_name["n1"].devices)) == (
        "resourceslice", 80 * GI, 2)
    assert (by_name["n2"].capacity_source, by_name["n2"].capacity_bytes) == ("annotation", 64 * GI)


@pytest.mark.parametrize(
    ("devices", "fragment"),
    [
        pytest.param([gpu("gpu-0", "lots", 0)], "ResourceSlice s: device 'gpu-0' capacity memory: 'lots'",
                     id="bad-quantity"),
        pytest.param([{"name": "gpu-0", "capacity": {"memory": "40Gi"}}],
                     "ResourceSlice s: device 'gpu-0' capacity memory: expected a quantity",
                     id="capacity-not-an-object"),
        pytest.param("gpu-0", "ResourceSlice s: spec.devices must be a list", id="devices-not-a-list"),
        pytest.param(["gpu-0"], "ResourceSlice s: spec.devices entries must be objects", id="device-not-an-object"),
    ],
)
def test_resourceslice_mistakes_named(devices, fragment):
    with pytest.raises(ObjectError, match=fragment):
        apply_resourceslices([Node("n1")], [rslice("n1", devices)])


@pytest.mark.parametrize(
    ("spec", "devices", "selector"),
    [
        pytest.param({"memory": "60Gi"}, 1, {}, id="default-one-device"),
        pytest.param({"memory": "60Gi", "devices": 2}, 2, {}, id="tensor-parallel-two"),
        pytest.param({"memory": "10Gi", "deviceSelector": {"profile": "1g.10gb"}}, 1, {"profile": "1g.10gb"},
                     id="mig-profile"),
        pytest.param({"memory": "10Gi", "deviceSelector": {"kind": "gpu", "product": "H100"}}, 1,
                     {"kind": "gpu", "product": "H100"}, id="kind-and-product"),
    ],
)
def test_model_device_fields(spec, devices, selector):
    m = model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"}, "spec": spec})
    assert (m.devices, dict(m.device_selector)) == (devices, selector)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        pytest.param({"devices": 0}, "spec.devices must be an integer >= 1, got 0", id="zero"),
        pytest.param({"devices": True}, "spec.devices must be an integer >= 1, got True", id="bool"),
        pytest.param({"devices": "2"}, "spec.devices must be an integer >= 1, got '2'", id="string"),
        pytest.param({"deviceSelector": {"memory": "x"}},
                     "spec.deviceSelector: unknown key 'memory' (use kind, product, profile)", id="bad-key"),
        pytest.param({"deviceSelector": {"kind": "tpu"}},
                     "spec.deviceSelector.kind must be one of gpu, mig, unified, got 'tpu'", id="bad-kind"),
        pytest.param({"deviceSelector": {"profile": 3}}, "spec.deviceSelector must map strings", id="not-string"),
    ],
)
def test_model_device_fields_refused(spec, fragment):
    with pytest.raises(ObjectError, match=re.escape(fragment)):
        model_from_inferencemodel({"kind": "InferenceModel", "metadata": {"name": "m"},
                                   "spec": {"memory": "1Gi", **spec}})


@pytest.mark.parametrize(
    ("annotation", "devices"),
    [
        pytest.param("0,1", (0, 1), id="two"),
        pytest.param("3", (3,), id="one"),
        pytest.param(None, (), id="absent-not-known"),
        pytest.param("0,0", (), id="repeated-not-known"),
        pytest.param("a,1", (), id="unreadable-not-known"),
        pytest.param("", (), id="empty-not-known"),
        pytest.param(",".join(map(str, range(1024))), tuple(range(1024)), id="1024-devices"),
        pytest.param(",".join(map(str, range(1025))), (), id="1025-not-known"),
    ],
)
def test_pod_devices_annotation(annotation, devices):
    annotations = {"inference.eh-ops.io/memory": "16Gi"}
    if annotation is not None:
        annotations[ANNOTATION_DEVICES] = annotation
    p = placement_from_pod({"kind": "Pod", "metadata": {"name": "p", "labels": {"inference.eh-ops.io/model": "m"},
                                                         "annotations": annotations},
                            "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    assert p is not None and p.devices == devices
    assert parse_device_indices(annotation) == devices
    if devices:
        assert format_device_indices(devices) == annotation  # what the extender writes, the cache reads back


@pytest.mark.parametrize("value", [None, 0, 5, ["0"]], ids=["none", "zero", "int", "list"])
def test_pod_devices_annotation_not_a_string(value):
    assert parse_device_indices(value) == ()
