"""The one decision, per device: which GPUs (or MIG slices) a replica takes, and why not, in words a user reads."""

from dataclasses import dataclass, field

import pytest

from budget import (
    REASON_INSUFFICIENT,
    ClusterView,
    Device,
    Model,
    Node,
    NodeVerdict,
    Placement,
    PodRequest,
    Reservation,
    decide_scale,
    explain,
    filter_nodes,
    score_nodes,
)
from budget.decide import REASON_DEVICES, Need, choose_devices
from budget.evict import plan_eviction
from budget.objects import view_from_objects
from budget.status import build_status, status_body

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 50_000.0
POOL = {"pool": "gpu"}


def gpus(name: str, *sizes_gi: int, kind: str = "gpu", profile: str = "") -> Node:
    return Node(name, POOL, None, "devices-annotation",
                tuple(Device(i, s * GI, kind, profile) for i, s in enumerate(sizes_gi)))  # type: ignore[arg-type]


def model(name: str, memory_gi: int, replicas: int = 0, *, devices: int = 1, selector=None, last=None) -> Model:
    return Model("default", name, memory_gi * GI, name, POOL, 600.0, replicas, last_request_time=last,
                 devices=devices, device_selector=selector or {})


def held(name: str, node: str, memory_gi: int, devices=(), i: int = 0) -> Placement:
    return Placement(f"default/{name}-{i}", node, memory_gi * GI, f"default/{name}", uid=f"{name}-{i}",
                     phase="Running", started_at=NOW - 300 + i, ready=True, devices=tuple(devices))


@dataclass(frozen=True)
class Case:
    nodes: list[Node]
    models: list[Model]
    target: str
    replicas: int
    allowed: bool
    reason: str
    where: list[tuple[str, tuple[int, ...]]]  # the new replicas' (node, devices)
    available: str
    placements: list[Placement] = field(default_factory=list)
    says: tuple[str, ...] = ()  # fragments the message must contain


MIXED_MIG = Node("mig-node", POOL, None, "gfd-mig-labels", (
    Device(0, 10 * GI, "mig", "1g.10gb"), Device(1, 10 * GI, "mig", "1g.10gb"), Device(2, 40 * GI, "mig", "3g.40gb"),
))

CASES = {
    "60gi-single-device-goes-only-to-the-80gi-gpu": Case(
        [gpus("a-2x40", 40, 40), gpus("b-1x80", 80)], [model("m", 60)], "m", 1, True, "fits",
        [("b-1x80", (0,))], "80Gi",
    ),
    "60gi-over-two-devices-goes-to-the-2x40gi-node": Case(
        [gpus("a-2x40", 40, 40), gpus("b-1x80", 80)], [model("m", 60, devices=2)], "m", 1, True, "fits",
        [("a-2x40", (0, 1))], "2 x 40Gi on a-2x40",
    ),
    "equal-nodes-name-the-first": Case(
        [gpus("a", 40, 40), gpus("b", 40, 40)], [model("m", 60, devices=2)], "m", 1, True, "fits",
        [("a", (0, 1))], "2 x 40Gi on a",
    ),
    "two-30gi-replicas-take-different-gpus": Case(
        [gpus("n", 40, 40)], [model("m", 30)], "m", 2, True, "fits", [("n", (0,)), ("n", (1,))], "40Gi",
    ),
    "third-30gi-replica-has-no-gpu-left": Case(
        [gpus("n", 40, 40)], [model("a", 30, 2), model("m", 30)], "m", 1, False, "insufficient_memory", [], "10Gi",
        [held("a", "n", 30, (0,), 0), held("a", "n", 30, (1,), 1)],
        ("n: GPU 0 has 10Gi free of 40Gi, GPU 1 has 10Gi free of 40Gi",),
    ),
    "fragmentation-across-gpus-denied-with-per-device-reasons": Case(
        [gpus("gpu-node-2", 40, 40)], [model("filler", 25, 2), model("m", 20)], "m", 1, False,
        "insufficient_memory", [], "15Gi",  # 30Gi free on the node, but no GPU has 20Gi
        [held("filler", "gpu-node-2", 25, (0,), 0), held("filler", "gpu-node-2", 25, (1,), 1)],
        ("m needs 20Gi in pool pool=gpu; 15Gi available",
         "gpu-node-2: GPU 0 has 15Gi free of 40Gi, GPU 1 has 15Gi free of 40Gi"),
    ),
    "tensor-parallel-fragmented-denied": Case(
        [gpus("gpu-node-1", 40, 40, 40)], [model("a", 30, 2), model("m", 40, devices=2)], "m", 1, False,
        "insufficient_memory", [], "2 x 10Gi on gpu-node-1",
        [held("a", "gpu-node-1", 30, (0,), 0), held("a", "gpu-node-1", 30, (1,), 1)],
        ("m needs 40Gi on 2 devices of one node (20Gi each) in pool pool=gpu; 2 x 10Gi on gpu-node-1 available",
         "GPU 2 has 40Gi free of 40Gi"),
    ),
    "binpack-devices-within-a-node": Case(
        [gpus("n", 40, 80)], [model("small", 10, 1), model("m", 20)], "m", 1, True, "fits", [("n", (0,))], "80Gi",
        [held("small", "n", 10, (0,))],
    ),
    "mig-mixed-profile-selected": Case(
        [MIXED_MIG], [model("m", 9, selector={"profile": "1g.10gb"})], "m", 2, True, "fits",
        [("mig-node", (0,)), ("mig-node", (1,))], "10Gi",
    ),
    "mig-mixed-large-profile": Case(
        [MIXED_MIG], [model("m", 30, selector={"profile": "3g.40gb"})], "m", 1, True, "fits",
        [("mig-node", (2,))], "40Gi",
    ),
    "mig-profile-too-small-never-fits": Case(
        [MIXED_MIG], [model("m", 12, selector={"profile": "1g.10gb"})], "m", 1, False, "exceeds_node_capacity",
        [], "10Gi", says=("the largest device matching profile=1g.10gb in pool pool=gpu has 10Gi",),
    ),
    "mig-profile-absent": Case(
        [MIXED_MIG], [model("m", 5, selector={"profile": "7g.80gb"})], "m", 1, False, "no_matching_nodes",
        [], "0", says=("no device in pool pool=gpu matches deviceSelector profile=7g.80gb",),
    ),
    "too-few-devices-on-any-node": Case(
        [gpus("n", 80, 80)], [model("m", 60, devices=4)], "m", 1, False, "exceeds_node_capacity", [], "0",
        says=("no node in pool pool=gpu has 4 devices (at most 2); it can never fit without such a node",),
    ),
    "split-replica-on-unified-memory-never-fits": Case(
        [Node("shadow", POOL, 128 * GI)], [model("m", 60, devices=2)], "m", 1, False, "exceeds_node_capacity", [],
        "0", says=("no node in pool pool=gpu has 2 devices (at most 1)",),
    ),
    "too-few-matching-mig-slices": Case(
        [MIXED_MIG], [model("m", 9, devices=3, selector={"profile": "1g.10gb"})], "m", 1, False,
        "exceeds_node_capacity", [], "0",
        says=("no node in pool pool=gpu has 3 devices matching profile=1g.10gb (at most 2)",),
    ),
    "per-device-reasons-name-only-matching-slices": Case(
        [MIXED_MIG],
        [model("a", 8, 2, selector={"profile": "1g.10gb"}), model("m", 8, selector={"profile": "1g.10gb"})],
        "m", 1, False, "insufficient_memory", [], "2Gi",
        [held("a", "mig-node", 8, (0,), 0), held("a", "mig-node", 8, (1,), 1)],
        ("mig-node: MIG 1g.10gb 0 has 2Gi free of 10Gi, MIG 1g.10gb 1 has 2Gi free of 10Gi; blocked by",),
    ),
    "a-node-with-too-few-devices-does-not-hide-the-next": Case(
        [gpus("a-small", 80), gpus("b-big", 40, 40)], [model("x", 40, 2), model("m", 60, devices=2)], "m", 1,
        False, "insufficient_memory", [], "0",
        [held("x", "b-big", 40, (0,), 0), held("x", "b-big", 40, (1,), 1)],
        ("a-small: 1 matching device(s) of the 2 needed; b-big: GPU 0 has 0 free of 40Gi, GPU 1 has 0 free of 40Gi",),
    ),
    "tensor-parallel-shares-too-large": Case(
        [gpus("n", 40, 40)], [model("m", 100, devices=2)], "m", 1, False, "exceeds_node_capacity", [],
        "2 x 40Gi on n", says=("the largest 2 devices of one node in pool pool=gpu have 40Gi each (n)",),
    ),
    "odd-bytes-split-rounds-up": Case(
        [gpus("n", 40, 40)], [Model("default", "m", 80 * GI + 1, "m", POOL, 600.0, 0, devices=2)], "m", 1,
        False, "exceeds_node_capacity", [], "2 x 40Gi on n",
    ),
    "decrease-always-passes-even-overcommitted": Case(
        [gpus("n", 40)], [model("m", 30, 2)], "m", 1, True, "decrease", [], "0",
        [held("m", "n", 30, (0,), 0), held("m", "n", 30, (0,), 1)],
    ),
    "unknown-devices-charged-to-the-first-gpus": Case(
        [gpus("n", 40, 40)], [model("old", 30, 1), model("m", 30)], "m", 1, True, "fits", [("n", (1,))], "40Gi",
        [held("old", "n", 30)],
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide_per_device(case: Case) -> None:
    view = ClusterView.build(nodes=case.nodes, models=case.models, placements=case.placements)
    d = decide_scale(view, case.target, case.replicas, NOW)
    assert (d.allowed, d.reason) == (case.allowed, case.reason), d.message
    assert [(s.node, s.devices) for s in d.device_placements] == case.where
    body = explain(d)
    assert body["available"] == case.available
    # The 429 body says a replica is split, and only then (the seed's `requested` keeps its shape).
    split = next(m.devices for m in case.models if m.name == case.target)
    assert body["requested"].get("devices") == (split if split > 1 else None)
    for fragment in case.says:
        assert fragment in d.message


def test_four_gpus_on_three_nodes_are_listed_without_more() -> None:
    nodes = [gpus(f"n{i}", *[40] * 4) for i in range(3)]
    placements = [held("a", f"n{i}", 30, (g,), i * 4 + g) for i in range(3) for g in range(4)]
    d = decide_scale(ClusterView.build(nodes=nodes, models=[model("a", 30, 12), model("m", 20)],
                                       placements=placements), "m", 1, NOW)
    assert "n2: GPU 0 has 10Gi free of 40Gi, GPU 1 has 10Gi free of 40Gi, GPU 2 has 10Gi free of 40Gi, GPU 3 has " \
           "10Gi free of 40Gi; blocked by" in d.message
    assert "more" not in d.message


def test_the_message_is_bounded_on_large_pools() -> None:
    nodes = [gpus(f"n{i}", *[40] * 8) for i in range(6)]
    placements = [held("a", f"n{i}", 30, (g,), i * 8 + g) for i in range(6) for g in range(8)]
    view = ClusterView.build(nodes=nodes, models=[model("a", 30, 48), model("m", 20)], placements=placements)
    d = decide_scale(view, "m", 1, NOW)
    assert not d.allowed
    assert "4 more; n1:" in d.message and "; 3 more node(s)" in d.message
    assert len(d.message) < 600, d.message


def test_unified_nodes_keep_the_seed_message() -> None:
    view = ClusterView.build(nodes=[Node("shadow", POOL, 128 * GI)],
                             models=[model("model-a", 80, 1, last=NOW - 120), model("model-b", 60)],
                             placements=[held("model-a", "shadow", 80)])
    d = decide_scale(view, "model-b", 1, NOW)
    assert d.message.startswith("model-b needs 60Gi in pool pool=gpu; 48Gi available; blocked by model-a (80Gi,")
    assert explain(d)["available"] == "48Gi"


def test_dra_slices_feed_the_decision() -> None:
    def dev(name, memory, index):
        return {"name": name, "attributes": {"index": {"int": index}}, "capacity": {"memory": {"value": memory}}}

    view = view_from_objects([
        {"kind": "Node", "metadata": {"name": "dra-node", "labels": POOL,
                                      "annotations": {"inference.eh-ops.io/memory-capacity": "160Gi"}}},
        {"kind": "ResourceSlice", "metadata": {"name": "dra-node-gpu"},
         "spec": {"driver": "gpu.nvidia.com", "nodeName": "dra-node", "pool": {"name": "dra-node", "generation": 1},
                  "devices": [dev("gpu-0", "80Gi", 0), dev("gpu-1", "80Gi", 1)]}},
        {"kind": "InferenceModel", "metadata": {"name": "big"},
         "spec": {"memory": "100Gi", "nodeSelector": POOL, "replicas": 0}},
        {"kind": "InferenceModel", "metadata": {"name": "split"},
         "spec": {"memory": "100Gi", "nodeSelector": POOL, "replicas": 0, "devices": 2}},
    ])
    assert decide_scale(view, "big", 1, NOW).reason == "exceeds_node_capacity"  # 160Gi unified said yes
    fits = decide_scale(view, "split", 1, NOW)
    assert (fits.allowed, [tuple(s) for s in fits.device_placements]) == (True, [("dra-node", (0, 1))])


# ---- the extender's filter per device ----


@pytest.mark.parametrize(
    ("nodes", "memory_gi", "devices", "selector", "held_", "expected"),
    [
        pytest.param([gpus("a", 40, 40), gpus("b", 80)], 60, 0, {}, [],
                     {"a": ("unresolvable", REASON_INSUFFICIENT, ()), "b": ("passed", "", (0,))},
                     id="60gi-only-on-the-80gi-gpu"),
        pytest.param([gpus("a", 40, 40), gpus("b", 80)], 60, 2, {}, [],
                     {"a": ("passed", "", (0, 1)), "b": ("unresolvable", REASON_DEVICES, ())},
                     id="60gi-over-two-only-on-the-2x40gi-node"),
        pytest.param([gpus("a", 80, 10)], 80, 2, {}, [],
                     {"a": ("unresolvable", REASON_INSUFFICIENT, ())}, id="two-devices-one-too-small-even-when-empty"),
        pytest.param([gpus("a", 40, 40)], 30, 0, {}, [held("x", "a", 30, (0,))],
                     {"a": ("passed", "", (1,))}, id="next-replica-gets-the-other-gpu"),
        pytest.param([gpus("a", 40, 40)], 30, 0, {}, [held("x", "a", 30, (0,), 0), held("x", "a", 30, (1,), 1)],
                     {"a": ("failed", REASON_INSUFFICIENT, ())}, id="both-gpus-taken"),
        pytest.param([MIXED_MIG], 9, 0, {"profile": "3g.40gb"}, [], {"mig-node": ("passed", "", (2,))},
                     id="pod-device-selector"),
        pytest.param([MIXED_MIG], 9, 0, {"kind": "gpu"}, [], {"mig-node": ("unresolvable", REASON_DEVICES, ())},
                     id="no-device-of-that-kind"),
    ],
)
def test_filter_nodes_per_device(nodes, memory_gi, devices, selector, held_, expected) -> None:
    view = ClusterView.build(nodes=nodes, models=[model("m", memory_gi)], placements=held_)
    pod = PodRequest("default", "p", "p-uid", "default/m", memory_gi * GI, POOL, devices, selector)
    verdicts = filter_nodes(view, pod, [n.name for n in nodes], NOW)
    assert {v.node: (v.status, v.reason, v.devices) for v in verdicts} == expected


@pytest.mark.parametrize(
    ("strategy", "chosen"),
    [pytest.param(None, (1,), id="binpack-by-default"), pytest.param("binpack", (1,), id="binpack"),
     pytest.param("spread", (0,), id="spread")],
)
def test_filter_chooses_devices_by_strategy(strategy, chosen) -> None:
    view = ClusterView.build(nodes=[gpus("a", 40, 40, 40)], models=[model("m", 10)],
                             placements=[held("x", "a", 15, (1,)), held("x", "a", 5, (2,), 1)])
    pod = PodRequest("default", "p", "p-uid", "default/m", 10 * GI)
    extra = {} if strategy is None else {"strategy": strategy}
    (verdict,) = filter_nodes(view, pod, ["a"], NOW, **extra)
    assert (verdict.status, verdict.devices) == ("passed", chosen)


def test_filter_says_how_much_a_node_with_too_few_devices_has() -> None:
    view = ClusterView.build(nodes=[gpus("a", 80)], models=[model("m", 60, devices=2)],
                             placements=[held("x", "a", 20, (0,))])
    (verdict,) = filter_nodes(view, PodRequest("default", "p", "p-uid", "default/m", 60 * GI), ["a"], NOW)
    assert verdict == (("a", "unresolvable", REASON_DEVICES, 60 * GI, 80 * GI, ()))


def test_filter_counts_reservations_per_device() -> None:
    view = ClusterView.build(
        nodes=[gpus("a", 40, 40)], models=[model("m", 30)],
        reservations=[Reservation("other", "default/m", 30 * GI, NOW + 30, "a", devices=(1,))],
    )
    pod = PodRequest("default", "p", "p-uid", "default/m", 30 * GI)
    (verdict,) = filter_nodes(view, pod, ["a"], NOW)
    assert (verdict.status, verdict.devices) == ("passed", (0,))


@pytest.mark.parametrize(
    ("free_gi", "devices", "strategy", "chosen"),
    [
        pytest.param([40, 10, 25], 1, "binpack", (2,), id="binpack-fullest-that-fits"),
        pytest.param([40, 10, 25], 1, "spread", (0,), id="spread-emptiest"),
        pytest.param([20, 20, 20], 2, "binpack", (0, 1), id="ties-lowest-index"),
        pytest.param([40, 10, 25], 2, "binpack", (0, 2), id="two-of-three"),
        pytest.param([40, 10, 5], 2, "binpack", None, id="not-enough-with-room"),
    ],
)
def test_choose_devices(free_gi, devices, strategy, chosen) -> None:
    node = gpus("n", *[40] * len(free_gi))
    free = {i: f * GI for i, f in enumerate(free_gi)}
    assert choose_devices(node, free, Need(devices, 20 * GI, {}), strategy) == chosen


# ---- making room per device ----


def test_eviction_frees_the_device_the_request_needs() -> None:
    """2x40Gi: a (35Gi) on GPU 0, b and c (15Gi each) on GPU 1; 30Gi needs one whole GPU's worth. Stopping b
    alone frees enough bytes on the node (5 + 25) but no GPU has 30Gi; b and c together (30Gi) are the
    cheapest set that empties a GPU, cheaper than a (35Gi)."""
    def idle(name, memory_gi):
        return Model("default", name, memory_gi * GI, name, POOL, 600.0, 1, last_request_time=NOW - 300,
                     evict_idle_after_seconds=60.0)

    view = ClusterView.build(
        nodes=[gpus("n", 40, 40)],
        models=[idle("a", 35), idle("b", 15), idle("c", 15), model("m", 30)],
        placements=[held("a", "n", 35, (0,)), held("b", "n", 15, (1,)), held("c", "n", 15, (1,))],
    )
    plan = plan_eviction(view, "m", 1, NOW)
    assert plan is not None
    assert [v.name for v in plan.victims] == ["b", "c"]
    assert [tuple(s) for s in plan.decision.device_placements] == [("n", (1,))]


# ---- what /status says per device ----


def test_status_nodes_list_their_devices() -> None:
    view = ClusterView.build(
        nodes=[gpus("gpu-node-1", 40, 40)],
        models=[model("a", 30, 1), model("tp", 20, 1, devices=2), model("pending", 8, 1)],
        placements=[held("a", "gpu-node-1", 30, (0,)), held("tp", "gpu-node-1", 20, (0, 1))],
    )
    (node,) = status_body(build_status(view, NOW))["nodes"]
    rows = [(d["index"], d["label"], d["used"], d["free"], d["largest_placeable"]) for d in node["devices"]]
    # a: 30Gi on GPU 0; tp: 10Gi on each; the admitted, unplaced 8Gi replica lands (binpack) on GPU 1.
    assert rows == [(0, "GPU 0", "40Gi", "0", "0"), (1, "GPU 1", "10Gi", "30Gi", "22Gi")]
    assert (node["free"], node["largest_placeable"]) == ("30Gi", "22Gi")


def test_status_of_a_full_gpu_node_places_nothing() -> None:
    view = ClusterView.build(nodes=[gpus("n", 40, 40)], models=[model("a", 40, 2)],
                             placements=[held("a", "n", 40, (0,), 0), held("a", "n", 40, (1,), 1)])
    (node,) = status_body(build_status(view, NOW))["nodes"]
    assert (node["largest_placeable_bytes"], [d["largest_placeable_bytes"] for d in node["devices"]]) == (0, [0, 0])


def test_spread_mirrors_binpack_after_rounding() -> None:
    """5 bytes on an empty 100-byte node: 0.05 used rounds to 1, and 0.95 free must then be 9, not 10."""
    verdicts = [NodeVerdict("n", "passed", "", 100, 100)]
    assert (score_nodes(verdicts, 5, "binpack"), score_nodes(verdicts, 5, "spread")) == ({"n": 1}, {"n": 9})
