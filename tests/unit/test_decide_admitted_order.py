"""Where other models' admitted but not yet placed replicas are counted, and the words of a request that can
never fit: the answers a user gets when the pool holds replicas that are still on their way.

A replica the webhook admitted but no pod holds yet (spec.replicas above the pods) is placed in the
decision before the new request, largest per-device share first, then largest memory, then by name; a
different order can land them elsewhere and turn a request that fits into a 429, or name the wrong model
as the one starting.
"""

from dataclasses import dataclass

import pytest

from budget import ClusterView, Device, Model, Node, Placement, decide_scale, explain

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 50_000.0
POOL = {"pool": "gpu"}
ZONE_X = {"pool": "gpu", "zone": "x"}
ZONE_Y = {"pool": "gpu", "zone": "y"}


def gpus(name: str, *sizes_gi: int, labels: dict[str, str] | None = None) -> Node:
    return Node(name, labels or POOL, None, "devices-annotation",
                tuple(Device(i, s * GI, "gpu", "") for i, s in enumerate(sizes_gi)))  # type: ignore[arg-type]


def model(name: str, memory_gi: int, replicas: int = 0, *, devices: int = 1, where=None) -> Model:
    return Model("default", name, memory_gi * GI, name, where or POOL, 600.0, replicas, devices=devices)


@dataclass(frozen=True)
class Case:
    nodes: list[Node]
    models: list[Model]  # the last one asks for one replica; the others are admitted, with no pod yet
    allowed: bool
    where: list[tuple[str, tuple[int, ...]]]
    message: str  # the whole message ("" when it fits)


CASES = {
    # a (one 60Gi device) lands first on the 60Gi GPU; b (2 x 40Gi) then finds no two devices and waits, so c's
    # 30Gi fits on the 40Gi GPU. Largest memory first would put b (80Gi in all) first and refuse c.
    "largest-share-first-not-largest-memory": Case(
        [gpus("g", 60, 40)], [model("a", 60, 1), model("b", 80, 1, devices=2), model("c", 30)],
        True, [("g", (1,))], "",
    ),
    # Equal shares: the 2 x 40Gi model first takes n1's pair, the 40Gi one n2's only GPU, and nothing is left for c.
    # Smaller memory first would put the 40Gi one on n1, leave the pair nowhere to go, and let c in.
    "equal-shares-largest-memory-first": Case(
        [gpus("n1", 40, 40), gpus("n2", 40)], [model("a", 40, 1), model("b", 80, 1, devices=2), model("c", 40)],
        False, [],
        "c needs 40Gi in pool pool=gpu; 0 available; n1: GPU 0 has 0 free of 40Gi, GPU 1 has 0 free of 40Gi; "
        "n2: GPU 0 has 0 free of 40Gi; blocked by b (80Gi, starting), a (40Gi, starting); it fits once b is gone, "
        "in 600s",
    ),
    # Equal shares and memory: by name. a (two replicas wanted) lands first on x's GPU, so zone x is held by a;
    # ordering by how many replicas are missing would put b there and name b.
    "equal-models-by-name": Case(
        [gpus("nx", 40, labels=ZONE_X), gpus("ny", 40, labels=ZONE_Y)],
        [model("a", 40, 2), model("b", 40, 1, where=ZONE_X), model("c", 40, where=ZONE_X)],
        False, [],
        "c needs 40Gi in pool pool=gpu,zone=x; 0 available; nx: GPU 0 has 0 free of 40Gi; "
        "blocked by a (40Gi, starting), b (40Gi, starting)",
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_admitted_replicas_land_before_the_request(case: Case) -> None:
    view = ClusterView.build(nodes=case.nodes, models=case.models)
    d = decide_scale(view, case.models[-1].key, 1, NOW)
    assert d.allowed == case.allowed, d.message
    assert [(s.node, s.devices) for s in d.device_placements] == case.where
    if case.message:
        assert d.message == case.message


def test_a_node_with_a_large_and_a_small_gpu_takes_a_replica_only_the_large_one_holds() -> None:
    # 60Gi on one device: the 80Gi GPU holds it, though the node's other GPU is 40Gi (not "never fits").
    view = ClusterView.build(nodes=[gpus("g", 80, 40)], models=[model("m", 60)])
    d = decide_scale(view, "default/m", 1, NOW)
    assert (d.allowed, [(s.node, s.devices) for s in d.device_placements]) == (True, [("g", (0,))]), d.message
    assert explain(d)["available"] == "80Gi"


def test_available_is_the_largest_free_device_not_the_smallest() -> None:
    # x holds 50Gi of the 80Gi GPU: 30Gi left there, 40Gi on the other; a 60Gi replica is told 40Gi is available.
    x = Placement("default/x-0", "g", 50 * GI, "default/x", uid="x-0", phase="Running", started_at=NOW - 300,
                  ready=True, devices=(0,))
    view = ClusterView.build(nodes=[gpus("g", 80, 40)], models=[model("x", 50, 1), model("m", 60)], placements=[x])
    d = decide_scale(view, "default/m", 1, NOW)
    assert (d.allowed, d.reason, explain(d)["available"]) == (False, "insufficient_memory", "40Gi")
    assert d.message == ("m needs 60Gi in pool pool=gpu; 40Gi available; g: GPU 0 has 30Gi free of 80Gi, "
                         "GPU 1 has 40Gi free of 40Gi; blocked by x (50Gi, idle 300s)")


@pytest.mark.parametrize(
    ("memory_gi", "devices", "message"),
    [
        (60, 1, "m needs 60Gi but the largest device in pool pool=gpu has 40Gi (g); "
                "it can never fit without larger devices"),
        (100, 2, "m needs 100Gi on 2 devices of one node (50Gi each) but the largest 2 devices of one node in "
                 "pool pool=gpu have 40Gi each (g); it can never fit without larger devices"),
    ],
    ids=["one-device-says-has", "two-devices-say-have-each"],
)
def test_a_replica_larger_than_any_device_never_fits_in_words(memory_gi: int, devices: int, message: str) -> None:
    view = ClusterView.build(nodes=[gpus("g", 40, 40)], models=[model("m", memory_gi, devices=devices)])
    d = decide_scale(view, "default/m", 1, NOW)
    assert (d.allowed, d.reason, d.message) == (False, "exceeds_node_capacity", message)


@pytest.mark.parametrize(
    ("devices", "largest"),
    [(1, "the largest device in pool pool=gpu has 50Gi (b)"),
     (2, "the largest 2 devices of one node in pool pool=gpu have 30Gi each (c)")],
    ids=["one-device-the-50gi-gpu-of-b", "two-devices-c-pair-not-b-10gi"],
)
def test_the_largest_device_is_looked_for_on_every_node(devices: int, largest: str) -> None:
    # a: one 30Gi GPU; b: 50Gi and 10Gi; c: 30Gi and 30Gi. Any node's small GPU must not hide its large one (one
    # device), nor a large GPU hide that its pair is small (two devices).
    nodes = [gpus("a", 30), gpus("b", 50, 10), gpus("c", 30, 30)]
    view = ClusterView.build(nodes=nodes, models=[model("m", 80, devices=devices)])
    d = decide_scale(view, "default/m", 1, NOW)
    assert (d.allowed, d.reason) == (False, "exceeds_node_capacity"), d.message
    assert f"but {largest}; it can never fit without larger devices" in d.message


def test_a_node_with_no_budget_adds_nothing_to_the_pool_total() -> None:
    # A node labelled with 0 memory is in the pool and counted as a node, with 0 bytes, in the words.
    nodes = [Node("big", POOL, 100 * GI), Node("drained", POOL, 0)]
    view = ClusterView.build(nodes=nodes, models=[model("m", 60)])
    d = decide_scale(view, "default/m", 2, NOW)
    assert (d.allowed, d.reason) == (False, "exceeds_pool_capacity"), d.message
    assert "even with nothing else running (2 node(s), 100Gi in all); it can never fit without more nodes" in d.message
