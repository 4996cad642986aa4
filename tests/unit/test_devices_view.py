"""The view per device: a node's devices and capacity agree, and memory is charged to the right devices."""

from dataclasses import replace

import pytest

from budget import ClusterView, Device, Model, Node, Placement, Reservation
from budget.view import device_matches, share_bytes

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_000.0


@pytest.mark.parametrize(
    ("node", "capacity", "devices"),
    [
        pytest.param(lambda: Node("a", {}, 128 * GI), 128 * GI, [Device(0, 128 * GI, "unified")],
                     id="capacity-is-one-unified"),
        pytest.param(lambda: Node("a", {}, None, "x", (Device(0, 40 * GI), Device(1, 80 * GI))), 120 * GI,
                     [Device(0, 40 * GI), Device(1, 80 * GI)], id="devices-sum-to-capacity"),
        pytest.param(lambda: Node("a"), None, [], id="unbudgeted-has-none"),
        pytest.param(lambda: Node("a", {}, 0), 0, [Device(0, 0, "unified")], id="zero-capacity-one-empty-device"),
        pytest.param(lambda: replace(Node("a", {}, 8 * GI), capacity_bytes=16 * GI), 16 * GI,
                     [Device(0, 16 * GI, "unified")], id="replace-capacity-moves-the-unified-device"),
    ],
)
def test_node_devices_and_capacity_agree(node, capacity, devices):
    # Built inside the test, not at collection: Node.__post_init__ is what is tested (and what mutmut mutates).
    built = node()
    assert (built.capacity_bytes, list(built.devices)) == (capacity, devices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"capacity_bytes": 10, "devices": (Device(0, 5),)}, "capacity_bytes 10 is not the sum",
                     id="capacity-disagrees"),
        pytest.param({"devices": (Device(0, 5), Device(0, 5))}, "device indices must be unique", id="same-index"),
    ],
)
def test_node_refuses_inconsistent_devices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Node("n", **kwargs)


@pytest.mark.parametrize(
    ("device", "label"),
    [
        pytest.param(Device(1, GI), "GPU 1", id="gpu"),
        pytest.param(Device(3, GI, "mig", "1g.10gb"), "MIG 1g.10gb 3", id="mig"),
        pytest.param(Device(2, GI, "mig"), "MIG 2", id="mig-without-profile"),
        pytest.param(Device(0, GI, "unified"), "memory", id="unified"),
    ],
)
def test_device_labels(device, label):
    assert device.label() == label


@pytest.mark.parametrize(
    ("memory", "devices", "share"),
    [
        pytest.param(60 * GI, 2, 30 * GI, id="even"),
        pytest.param(80 * GI + 1, 2, 40 * GI + 1, id="odd-rounds-up"),
        pytest.param(7, 3, 3, id="ceil"),
        pytest.param(9, 1, 9, id="one"),
        pytest.param(9, 0, 9, id="zero-is-one"),
    ],
)
def test_share_bytes(memory, devices, share):
    assert share_bytes(memory, devices) == share


@pytest.mark.parametrize(
    ("selector", "device", "matched"),
    [
        pytest.param({}, Device(0, GI), True, id="empty-matches-all"),
        pytest.param({"kind": "mig"}, Device(0, GI, "mig"), True, id="kind"),
        pytest.param({"kind": "mig"}, Device(0, GI), False, id="other-kind"),
        pytest.param({"profile": "1g.10gb", "kind": "mig"}, Device(0, GI, "mig", "1g.10gb"), True, id="both"),
        pytest.param({"profile": "1g.10gb", "kind": "gpu"}, Device(0, GI, "mig", "1g.10gb"), False, id="one-differs"),
        pytest.param({"product": "H100"}, Device(0, GI, product="H100"), True, id="product"),
        pytest.param({"memory_bytes": str(GI)}, Device(0, GI), False, id="unknown-key-never-matches"),
    ],
)
def test_device_selector(selector, device, matched):
    assert device_matches(selector, device) is matched


GPUS = Node("n", {}, None, "x", (Device(0, 40 * GI), Device(1, 40 * GI), Device(2, 40 * GI)))


def placed(name, memory_gi, devices=(), started=None, model="default/m"):
    return Placement(f"default/{name}", "n", memory_gi * GI, model, uid=name, started_at=started, devices=devices)


USED = {
    "known-devices-charged-their-share": ([placed("a", 30, (0, 2))], [], {0: 15, 2: 15}),
    "unknown-goes-to-the-lowest-index-with-room": ([placed("a", 30, (0,)), placed("b", 20)], [], {0: 30, 1: 20}),
    # early (30Gi) takes GPU 0 first, late (20Gi) finds it too full, then never-started (15Gi) fits only GPU 1.
    "unknown-in-start-order": ([placed("a-late", 20, started=20.0), placed("b-early", 30, started=10.0),
                                placed("0-never-started", 15)], [], {0: 30, 1: 35}),
    "unknown-after-known-even-if-listed-first": ([placed("b", 20), placed("a", 30, (0,))], [], {0: 30, 1: 20}),
    "index-not-on-the-node-is-unknown": ([placed("a", 30, (7,))], [], {0: 30}),
    "a-placement-on-an-unknown-node-is-skipped-not-the-rest": (
        [Placement("default/gone", "gone-node", GI, "default/m", uid="gone"), placed("a", 30, (0,))], [], {0: 30}),
    "unknown-fills-an-empty-gpu-exactly": ([placed("a", 10, (0,)), placed("b", 40)], [], {0: 10, 1: 40}),
    "overcommitted-unknown-still-counted": ([placed("a", 40, (0,)), placed("b", 40, (1,)), placed("c", 40, (2,)),
                                             placed("d", 10)], [], {0: 50, 1: 40, 2: 40}),
    "reservations-after-placements": (
        [placed("a", 30)], [Reservation("r", "default/m", 30 * GI, NOW + 5, "n", devices=(0,))], {0: 60}),
    "expired-reservation-frees": ([], [Reservation("r", "default/m", 30 * GI, NOW, "n", devices=(1,))], {}),
}


@pytest.mark.parametrize(("placements", "reservations", "expected_gi"), list(USED.values()), ids=list(USED))
def test_device_used(placements, reservations, expected_gi):
    view = ClusterView.build(nodes=[GPUS], models=[Model("default", "m", GI)], placements=placements,
                             reservations=reservations)
    assert view.device_used(NOW) == ({"n": {i: g * GI for i, g in expected_gi.items()}} if expected_gi else {})


def test_unknown_devices_without_start_times_go_by_pod_name():
    """Pod names, not UIDs, order them: b (30Gi) after a (20Gi) finds GPU 0 too full."""
    placements = [Placement("default/b", "n", 30 * GI, "default/m", uid="uid-1"),
                  Placement("default/a", "n", 20 * GI, "default/m", uid="uid-2")]
    view = ClusterView.build(nodes=[GPUS], models=[Model("default", "m", GI)], placements=placements)
    assert view.device_used(NOW)["n"] == {0: 20 * GI, 1: 30 * GI}


def test_device_used_leaves_out_a_pod_or_models():
    view = ClusterView.build(
        nodes=[GPUS], models=[Model("default", "m", GI, devices=2), Model("default", "o", GI)],
        placements=[placed("a", 30, (0,)), placed("tp", 20), placed("o", 10, model="default/o")],
    )
    # Unknown ones by name (no start times): o (10Gi) fills GPU 0; tp (2 x 10Gi) takes GPUs 1 and 2.
    assert view.device_used(NOW)["n"] == {0: 40 * GI, 1: 10 * GI, 2: 10 * GI}
    assert view.device_used(NOW, exclude_uid="a")["n"] == {0: 20 * GI, 1: 10 * GI}  # tp moves onto 0 and 1
    assert view.device_used(NOW, without=frozenset({"default/m"}))["n"] == {0: 10 * GI}
    assert view.device_free(NOW) == {"n": {0: 0, 1: 30 * GI, 2: 30 * GI}}
    assert view.with_model(Model("default", "m", GI, devices=1)).device_used(NOW)["n"] == {0: 40 * GI, 1: 20 * GI}
