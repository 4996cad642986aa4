"""The one admission decision: the seed scenario and its neighbours, as a table."""

import json
from dataclasses import dataclass, field, replace

import pytest

from budget import (
    REASON_INSUFFICIENT,
    REASON_NO_BUDGET,
    REASON_SELECTOR,
    ClusterView,
    Model,
    Node,
    Placement,
    PodRequest,
    Reservation,
    UnknownModelError,
    decide_scale,
    explain,
    filter_nodes,
    score_nodes,
)
from budget.objects import view_from_objects

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_000_000.0
POOL = {"inference-pool": "gpu-nodes"}


def model(name, mem_gi, replicas=0, selector=POOL, last=None, cooldown=600.0):
    return Model("default", name, mem_gi * GI, name, selector, cooldown, replicas, last)


def placed(name, node, mem_gi, started=NOW - 3600, i=0):
    return Placement(f"default/{name}-{i}", node, mem_gi * GI, f"default/{name}", uid=f"{name}-{i}", started_at=started)


def seed_view(**changes):
    nodes = [Node("shadow", POOL, 128 * GI, "annotation")]
    models = [model("model-a", 80, 1, last=NOW - 120), model("model-b", 60), model("model-c", 16)]
    placements = [placed("model-a", "shadow", 80)]
    return ClusterView.build(
        nodes=changes.get("nodes", nodes),
        models=changes.get("models", models),
        placements=changes.get("placements", placements),
    )


@dataclass
class Case:
    view: ClusterView
    model: str
    replicas: int
    allowed: bool
    reason: str
    available: str = ""
    blocking: list = field(default_factory=list)


CASES = {
    "seed-deny": Case(seed_view(), "model-b", 1, False, "insufficient_memory", "48Gi", [("model-a", "80Gi", "120s")]),
    "seed-fit-after-a-gone": Case(
        seed_view(models=[model("model-a", 80, 0), model("model-b", 60)], placements=[]),
        "model-b", 1, True, "fits", "128Gi",
    ),
    "small-model-fits-beside-a": Case(seed_view(), "model-c", 1, True, "fits", "48Gi"),
    "selector-mismatch": Case(
        seed_view(models=[model("model-b", 60, selector={"inference-pool": "other"})], placements=[]),
        "model-b", 1, False, "no_matching_nodes", "0",
    ),
    # Issue 17: GFD labels are two 80Gi GPUs, not one 160Gi node; 150Gi fits only split over both.
    "gfd-capacity-fits-over-two-devices": Case(
        view_from_objects(
            [
                {"kind": "Node", "metadata": {"name": "gpu1", "labels": {
                    **POOL, "nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "2"}}},
                {"kind": "InferenceModel", "metadata": {"name": "big"},
                 "spec": {"memory": "150Gi", "nodeSelector": POOL, "replicas": 0, "devices": 2}},
            ]
        ),
        "big", 1, True, "fits", "2 x 80Gi on gpu1",
    ),
    "gfd-one-device-exceeds-each-gpu": Case(
        view_from_objects(
            [
                {"kind": "Node", "metadata": {"name": "gpu1", "labels": {
                    **POOL, "nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "2"}}},
                {"kind": "InferenceModel", "metadata": {"name": "big"},
                 "spec": {"memory": "150Gi", "nodeSelector": POOL, "replicas": 0}},
            ]
        ),
        "big", 1, False, "exceeds_node_capacity", "80Gi",
    ),
    "total-enough-no-single-node": Case(
        seed_view(
            nodes=[Node("n1", POOL, 40 * GI), Node("n2", POOL, 40 * GI)],
            models=[model("model-b", 60)],
            placements=[],
        ),
        "model-b", 1, False, "exceeds_node_capacity", "40Gi",
    ),
    "fragmented-free-space": Case(
        seed_view(
            nodes=[Node("n1", POOL, 64 * GI), Node("n2", POOL, 64 * GI)],
            models=[model("model-a", 32, 2), model("model-b", 60)],
            placements=[placed("model-a", "n1", 32, i=0), placed("model-a", "n2", 32, i=1)],
        ),
        "model-b", 1, False, "insufficient_memory", "32Gi", [("model-a", "64Gi", "3600s")],
    ),
    "decrease-always-allowed": Case(seed_view(), "model-a", 0, True, "decrease", "48Gi"),
    "decrease-even-when-overcommitted": Case(
        seed_view(models=[model("model-a", 80, 3)]), "model-a", 2, True, "decrease", "48Gi"
    ),
    "no-change": Case(seed_view(), "model-a", 1, True, "no_change", "48Gi"),
    "second-replica-never-fits-the-pool": Case(seed_view(), "model-a", 2, False, "exceeds_pool_capacity", "48Gi"),
    "lookup-by-model-name": Case(seed_view(), "default/model-b", 1, False, "insufficient_memory", "48Gi",
                                 [("model-a", "80Gi", "120s")]),
    "admitted-pending-replica-counts": Case(
        seed_view(models=[model("model-a", 80, 1, last=NOW - 120), model("model-c", 16, 1), model("model-b", 40)]),
        "model-b", 1, False, "insufficient_memory", "32Gi",
    ),
    "reservation-counts": Case(
        ClusterView.build(
            nodes=[Node("shadow", POOL, 128 * GI)],
            models=[model("model-a", 80, 1), model("model-b", 60)],
            reservations=[Reservation("uid-a", "default/model-a", 80 * GI, NOW + 10, "shadow")],
        ),
        "model-b", 1, False, "insufficient_memory", "48Gi",
    ),
    "expired-reservation-ignored": Case(
        ClusterView.build(
            nodes=[Node("shadow", POOL, 128 * GI)],
            models=[model("model-a", 80, 0), model("model-b", 60)],
            reservations=[Reservation("uid-a", "default/model-a", 80 * GI, NOW - 1, "shadow")],
        ),
        "model-b", 1, True, "fits", "128Gi",
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide_scale(case):
    d = decide_scale(case.view, case.model, case.replicas, NOW)
    assert (d.allowed, d.reason) == (case.allowed, case.reason), d.message
    body = explain(d)
    if case.available:
        assert body["available"] == case.available
    got = [(b["model"], b["memory"], b["idle_for"]) for b in body["blocking"]]
    if case.blocking:
        assert got == case.blocking


def test_seed_body_has_the_seed_shape_and_a_sentence():
    d = decide_scale(seed_view(), "model-b", 1, NOW)
    body = explain(d)
    assert body["error"] == "insufficient_memory"
    assert body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
    assert body["available"] == "48Gi"
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]
    assert body["message"] == (
        "model-b needs 60Gi in pool inference-pool=gpu-nodes; 48Gi available; blocked by model-a (80Gi, idle 120s)"
    )
    # model-a's 10m cooldown ends 480 s from now: that is when a retry can succeed.
    assert d.retry_after_seconds == 480 == body["retry_after_seconds"]


def test_retry_after_defaults_when_nothing_will_scale_down():
    v = seed_view(models=[model("model-a", 80, 1, cooldown=0), model("model-b", 60)])
    d = decide_scale(v, "model-b", 1, NOW)
    assert not d.allowed and d.retry_after_seconds == 30


def test_idle_counts_from_replica_start_when_no_request_came():
    v = seed_view(models=[model("model-a", 80, 1, last=None), model("model-b", 60)],
                  placements=[placed("model-a", "shadow", 80, started=NOW - 45)])
    assert explain(decide_scale(v, "model-b", 1, NOW))["blocking"][0]["idle_for"] == "45s"


def test_unknown_model_is_an_error_naming_it():
    with pytest.raises(UnknownModelError, match="nope"):
        decide_scale(seed_view(), "nope", 1, NOW)


@pytest.mark.parametrize("replicas", [-1, 1.5, "2", True], ids=["negative", "float", "string", "bool"])
def test_bad_replicas_rejected(replicas):
    with pytest.raises(ValueError, match="replicas"):
        decide_scale(seed_view(), "model-b", replicas, NOW)


# ---- node filtering and scoring (the extender's questions) ----

def pod(mem_gi, uid="p1", selector=None):
    return PodRequest("default", "model-b-x", uid, "default/model-b", mem_gi * GI, selector or {})


def test_filter_nodes_reasons_are_stable_and_number_free():
    v = ClusterView.build(
        nodes=[
            Node("full", POOL, 128 * GI),
            Node("roomy", POOL, 128 * GI),
            Node("plain", {}, None),
            Node("other", {"inference-pool": "cpu"}, 512 * GI),
            Node("tiny", POOL, 32 * GI),
        ],
        models=[model("model-a", 80, 1), model("model-b", 60)],
        placements=[placed("model-a", "full", 80)],
    )
    verdicts = {x.node: x for x in filter_nodes(v, pod(60), ["full", "roomy", "plain", "other", "tiny", "ghost"], NOW)}
    assert (verdicts["full"].status, verdicts["full"].reason) == ("failed", REASON_INSUFFICIENT)
    assert verdicts["roomy"].status == "passed"
    assert (verdicts["plain"].status, verdicts["plain"].reason) == ("unresolvable", REASON_NO_BUDGET)
    assert (verdicts["other"].status, verdicts["other"].reason) == ("unresolvable", REASON_SELECTOR)
    assert (verdicts["tiny"].status, verdicts["tiny"].reason) == ("unresolvable", REASON_INSUFFICIENT)
    assert verdicts["ghost"].status == "unresolvable"
    assert not any(ch.isdigit() for x in verdicts.values() for ch in x.reason)


def test_filter_ignores_the_pods_own_reservation():
    v = ClusterView.build(
        nodes=[Node("n1", POOL, 64 * GI)],
        models=[model("model-b", 60, 1)],
        reservations=[Reservation("p1", "default/model-b", 60 * GI, NOW + 30, "n1")],
    )
    assert filter_nodes(v, pod(60, uid="p1"), ["n1"], NOW)[0].status == "passed"
    assert filter_nodes(v, pod(60, uid="p2"), ["n1"], NOW)[0].status == "failed"


def test_scores_binpack_prefers_fuller_node_and_spread_the_emptier():
    v = ClusterView.build(
        nodes=[Node("busy", POOL, 128 * GI), Node("idle", POOL, 128 * GI)],
        models=[model("model-a", 16, 1), model("model-b", 60)],
        placements=[placed("model-a", "busy", 48)],
    )
    verdicts = filter_nodes(v, pod(16), ["busy", "idle"], NOW)
    pack = score_nodes(verdicts, 16 * GI, "binpack")
    spread = score_nodes(verdicts, 16 * GI, "spread")
    assert pack["busy"] > pack["idle"]
    assert spread["idle"] > spread["busy"]
    assert all(0 <= s <= 10 for s in [*pack.values(), *spread.values()])


def test_admitted_replicas_still_starting_are_named_as_blocking():
    v = seed_view(models=[model("model-a", 80, 1, last=NOW - 120), model("model-c", 16, 1), model("model-b", 40)])
    d = decide_scale(v, "model-b", 1, NOW)
    body = explain(d)
    assert body["available"] == "32Gi"
    assert body["blocking"] == [
        {"model": "model-a", "memory": "80Gi", "idle_for": "120s"},
        {"model": "model-c", "memory": "16Gi", "idle_for": "0s", "state": "starting"},
    ]
    assert "model-c (16Gi, starting)" in d.message


def test_derived_views_reuse_caches_only_when_their_inputs_are_unchanged():
    from dataclasses import replace

    v = seed_view()
    assert v.used_bytes(NOW) == {"shadow": 80 * GI}  # fills the per-view cache
    with_r = v.with_reservations([Reservation("uid-c", "default/model-c", 16 * GI, NOW + 10, "shadow")])
    assert with_r.used_bytes(NOW) == {"shadow": 96 * GI}
    assert with_r.used_bytes(NOW, exclude_uid="model-a-0") == {"shadow": 16 * GI}
    emptied = replace(with_r, placements=())
    assert emptied.used_bytes(NOW) == {"shadow": 16 * GI}


# ---- the whole Decision, the blocking list and the retry hint, as a user reads them ----


def test_decision_fields_for_each_allowed_outcome():
    v = ClusterView.build(
        nodes=[Node("n1", {"pool": "a", "gpu": "h100"}, 64 * GI)],
        models=[Model("ns", "m", 16 * GI, "llama-7b", {"pool": "a", "gpu": "h100"}, 600.0, 1)],
        placements=[Placement("ns/m-0", "n1", 16 * GI, "ns/m", uid="m-0")],
    )
    fits = decide_scale(v, "llama-7b", 3, NOW)
    assert (fits.model, fits.model_key, fits.replicas_from, fits.replicas_to, fits.pool) == (
        "llama-7b", "ns/m", 1, 3, "gpu=h100,pool=a")
    assert fits.message == "llama-7b fits: 2 new replica(s) of 16Gi in pool gpu=h100,pool=a"
    assert dict(fits.placements) == {"n1": 2}
    assert decide_scale(v, "m", 0, NOW).message == "llama-7b: scaling down from 1 to 0"
    assert decide_scale(v, "m", 1, NOW).message == "llama-7b: 1 replica(s) need no new memory"


@pytest.mark.parametrize(
    ("view", "replicas", "reason", "message"),
    [
        pytest.param(
            ClusterView.build(nodes=[Node("n1", POOL, 32 * GI)], models=[model("m", 16)]), 3,
            "exceeds_pool_capacity", "m cannot have 3 replica(s) of 16Gi in pool inference-pool=gpu-nodes even with "
            "nothing else running (1 node(s), 32Gi in all); it can never fit without more nodes",
            id="several-replicas-more-than-the-pool",
        ),
        pytest.param(
            ClusterView.build(nodes=[Node("n1", {}, 16 * GI)], models=[model("m", 16)]), 1,
            "no_matching_nodes", "m needs 16Gi but no budgeted node matches pool inference-pool=gpu-nodes",
            id="no-matching-node",
        ),
        pytest.param(
            ClusterView.build(nodes=[Node("n1", {}, 16 * GI)], models=[model("m", 16, selector={})]), 1,
            "fits", "m fits: 1 new replica(s) of 16Gi in the whole cluster", id="no-selector",
        ),
        pytest.param(
            ClusterView.build(nodes=[Node("n1", POOL, 8 * GI)], models=[model("m", 16)]), 1,
            "exceeds_node_capacity", "m needs 16Gi but the largest node in pool inference-pool=gpu-nodes has 8Gi; "
            "it can never fit without a larger node", id="too-big",
        ),
        pytest.param(
            ClusterView.build(nodes=[Node("n1", POOL, 0)], models=[Model("default", "m", 1, "m", POOL, 600.0, 0)]), 1,
            "exceeds_node_capacity", "m needs 1 but the largest node in pool inference-pool=gpu-nodes has 0; "
            "it can never fit without a larger node", id="zero-capacity-node",
        ),
    ],
)
def test_denials_read_exactly(view, replicas, reason, message):
    d = decide_scale(view, "m", replicas, NOW, default_retry_after_seconds=17)
    assert (d.reason, d.message) == (reason, message)
    if not d.allowed:  # a denial that waiting cannot cure gives no retry hint
        assert d.retry_after_seconds == (17 if reason == "insufficient_memory" else 0)


def test_a_model_without_memory_needs_no_room():
    v = ClusterView.build(nodes=[Node("n1", POOL, GI)], models=[Model("default", "m", 0, "m", POOL, 600.0, 0)])
    assert decide_scale(v, "m", 5, NOW).reason == "no_change"


def test_blocking_lists_other_models_in_the_pool_with_counts_idle_first():
    other_pool = {"inference-pool": "other"}
    v = ClusterView.build(
        nodes=[Node("a", POOL, 64 * GI), Node("b", POOL, 64 * GI), Node("x", other_pool, 64 * GI)],
        models=[
            model("target", 40, 1),
            Model("default", "big", 16 * GI, "big-7b", POOL, 600.0, 2, NOW - 100),
            model("small", 8, 3, last=NOW - 100),
            model("elsewhere", 8, 1, selector=other_pool),
        ],
        placements=[
            placed("elsewhere", "x", 8),
            placed("target", "a", 40),
            placed("big", "a", 16, i=0),
            placed("big", "b", 16, i=1),
            placed("small", "b", 8, i=0),
            placed("small", "b", 8, i=1),
            placed("small", "b", 8, i=2),
            Placement("default/ghost-0", "b", 8 * GI, "default/ghost", uid="ghost-0", started_at=NOW - 5),
        ],
    )
    d = decide_scale(v, "target", 2, NOW)
    assert d.reason == "insufficient_memory"
    assert sorted((b.model, b.memory_bytes // GI, b.replicas, b.idle_for_seconds) for b in d.blocking) == [
        ("big-7b", 32, 2, 100.0),
        ("ghost", 8, 1, 5.0),
        ("small", 24, 3, 100.0),
    ]
    ghost = next(b for b in d.blocking if b.model == "ghost")
    assert (ghost.cooldown_seconds, ghost.cooldown_remaining_seconds) == (0.0, None)
    assert d.retry_after_seconds == 500


def test_admitted_replicas_still_starting_are_counted_per_model():
    v = ClusterView.build(
        nodes=[Node("n1", POOL, 64 * GI)],
        models=[model("target", 40), Model("default", "c", 16 * GI, "c-7b", POOL, 600.0, 2)],
    )
    d = decide_scale(v, "target", 1, NOW)
    assert [(b.model, b.memory_bytes, b.replicas, b.starting) for b in d.blocking] == [("c-7b", 32 * GI, 2, True)]
    assert json.dumps(d.blocking[0].replicas) == "2"
    assert "c-7b (32Gi, starting)" in d.message


def test_admitted_replicas_are_placed_largest_first():
    # Largest first puts 32Gi on n1 and 16Gi on n2: nothing is left for the target. Smallest first would
    # strand the 32Gi replica and wrongly leave 16Gi free on n1.
    v = ClusterView.build(
        nodes=[Node("n1", POOL, 32 * GI), Node("n2", POOL, 16 * GI)],
        models=[model("target", 16), model("a", 16, 1), model("b", 32, 1)],
    )
    assert decide_scale(v, "target", 1, NOW).reason == "insufficient_memory"


def test_admitted_replicas_outside_the_pool_or_without_memory_are_not_blocking():
    other_pool = {"inference-pool": "other"}
    v = ClusterView.build(
        nodes=[Node("n1", POOL, 16 * GI), Node("x", other_pool, 16 * GI)],
        models=[model("target", 32), model("far", 16, 1, selector=other_pool), model("huge", 64, 1),
                Model("default", "free", 0, "free", POOL, 600.0, 3)],
    )
    d = decide_scale(v, "target", 1, NOW)
    assert d.reason == "exceeds_node_capacity"
    d = decide_scale(replace(v, nodes=(Node("n1", POOL, 32 * GI), Node("x", other_pool, 16 * GI))), "target", 1, NOW)
    assert d.reason == "fits", d.message


def test_replicas_held_by_reservations_are_not_placed_twice():
    v = ClusterView.build(
        nodes=[Node("n1", POOL, 48 * GI)],
        models=[model("m", 16, 2)],
        placements=[placed("m", "n1", 16)],
        reservations=[Reservation("m-r", "default/m", 16 * GI, NOW + 30, "n1")],
    )
    d = decide_scale(v, "m", 3, NOW)
    assert (d.reason, dict(d.placements)) == ("fits", {"n1": 1})


@pytest.mark.parametrize(
    ("idle", "cooldown", "retry"),
    [
        pytest.param(599.5, 600.0, 1, id="half-a-second-left-rounds-up-to-one"),
        pytest.param(700.0, 600.0, 1, id="cooldown-over-still-one"),
        pytest.param(100.0, 600.0, 500, id="five-hundred-left"),
    ],
)
def test_retry_after_is_when_the_first_cooldown_ends(idle, cooldown, retry):
    v = seed_view(models=[model("model-a", 80, 1, last=NOW - idle, cooldown=cooldown), model("model-b", 60)])
    assert decide_scale(v, "model-b", 1, NOW).retry_after_seconds == retry


def test_idle_is_zero_when_nothing_is_known():
    from budget import idle_seconds

    assert idle_seconds(None, [], NOW) == 0.0
    v = seed_view(placements=[placed("model-a", "shadow", 80, started=None)],
                  models=[model("model-a", 80, 1), model("model-b", 60)])
    assert decide_scale(v, "model-b", 1, NOW).blocking[0].idle_for_seconds == 0.0


def test_node_verdicts_carry_capacity_for_every_budgeted_node():
    v = ClusterView.build(nodes=[Node("other", {"inference-pool": "cpu"}, 512 * GI), Node("tiny", POOL, 32 * GI)],
                          models=[model("model-b", 60)])
    verdicts = {x.node: x for x in filter_nodes(v, pod(60), ["other", "tiny"], NOW)}
    assert (verdicts["other"].capacity_bytes, verdicts["tiny"].capacity_bytes, verdicts["tiny"].free_bytes) == (
        512 * GI, 32 * GI, 32 * GI)
    assert score_nodes(list(verdicts.values()), 60 * GI) == score_nodes(list(verdicts.values()), 60 * GI, "binpack")


def test_a_one_byte_node_taking_a_one_byte_pod_is_full():
    v = ClusterView.build(nodes=[Node("n", POOL, 1)], models=[model("model-b", 0)])
    verdicts = filter_nodes(v, PodRequest("default", "p", "p", "default/model-b", 1), ["n"], NOW)
    assert score_nodes(verdicts, 1) == {"n": 10}


def test_derived_views_share_the_unchanged_caches():
    v = seed_view()
    index, placed_cache = v.node_index, v._placed
    for derived in (v.with_model(model("model-d", 1)), v.with_reservations([])):
        assert derived.node_index is index and derived._placed is placed_cache
