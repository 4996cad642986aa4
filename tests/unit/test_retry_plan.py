"""Retry-After is a plan: the earliest moment the request fits if nothing else changes, and who must go by then."""

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget import ClusterView, Model, Node, Placement, Reservation, decide_scale, explain, without

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_000_000.0
POOL = {"inference-pool": "gpu-nodes"}


def model(name, mem_gi, replicas=0, *, idle=None, cooldown=600.0, selector=POOL, startup=0.0):
    last = None if idle is None else NOW - idle
    return Model("default", name, mem_gi * GI, name, selector, cooldown, replicas, last, startup_seconds=startup)


def placed(name, node, mem_gi, i=0, *, state="running", started=NOW - 3600, free_by=None):
    return Placement(f"default/{name}-{i}", node, mem_gi * GI, f"default/{name}", uid=f"{name}-{i}",
                     started_at=started, ready=state == "running", state=state, free_by=free_by)


def one_node(*models_and_placements, capacity=128, node="shadow", selector=POOL):
    models = [m for m in models_and_placements if isinstance(m, Model)]
    placements = [p for p in models_and_placements if isinstance(p, Placement)]
    return ClusterView.build(nodes=[Node(node, selector, capacity * GI)], models=models, placements=placements)


@dataclass
class Case:
    view: ClusterView
    model: str
    replicas: int
    reason: str
    retry_after: int  # 0: no Retry-After (waiting cannot help)
    first: list = field(default_factory=list)  # the plan's blockers, named first in `blocking`
    states: dict = field(default_factory=dict)  # blocker -> state shown in the body
    says: str = ""  # a fragment of the message


B = model("model-b", 60)
CASES = {
    # The seed: model-a (80Gi) idle 120 s of its 600 s cooldown.
    "seed": Case(one_node(model("model-a", 80, 1, idle=120), B, placed("model-a", "shadow", 80)),
                 "model-b", 1, "insufficient_memory", 480, ["model-a"]),
    # The report: model-c's cooldown ends first but frees too little; only model-a's end makes room.
    "first-to-go-frees-too-little": Case(
        one_node(model("model-a", 80, 1, idle=51), model("model-c", 16, 1, idle=553), B,
                 placed("model-a", "shadow", 80), placed("model-c", "shadow", 16)),
        "model-b", 1, "insufficient_memory", 549, ["model-a"], says="it fits once model-a is gone, in 549s"),
    "two-needed-the-later-one-sets-the-time": Case(
        one_node(model("a", 40, 1, idle=500), model("c", 40, 1, idle=400), model("d", 40, 1, idle=300),
                 model("b", 80), placed("a", "shadow", 40), placed("c", "shadow", 40), placed("d", "shadow", 40)),
        "b", 1, "insufficient_memory", 200, ["a", "c"], says="it fits once a and c are gone, in 200s"),
    "smallest-set-not-everyone-due-by-then": Case(
        one_node(model("a", 64, 1, idle=300), model("c", 16, 1, idle=300), model("d", 16, 1, idle=500),
                 model("b", 60), placed("a", "shadow", 64), placed("c", "shadow", 16), placed("d", "shadow", 16)),
        "b", 1, "insufficient_memory", 300, ["a"]),
    "another-node-frees-sooner": Case(
        ClusterView.build(
            nodes=[Node("n1", POOL, 128 * GI), Node("n2", POOL, 128 * GI)],
            models=[model("a", 100, 1, idle=100), model("c", 100, 1, idle=550), B],
            placements=[placed("a", "n1", 100), placed("c", "n2", 100)],
        ),
        "model-b", 1, "insufficient_memory", 50, ["c"]),
    "stopping-frees-at-its-grace-end": Case(
        one_node(model("model-a", 80, 0, idle=700), B,
                 placed("model-a", "shadow", 80, state="stopping", free_by=NOW + 4)),
        "model-b", 1, "insufficient_memory", 4, ["model-a"], {"model-a": "stopping"}, "model-a (80Gi, stopping)"),
    "starting-process-frees-after-start-up-and-cooldown": Case(
        one_node(model("model-a", 80, 1, startup=30), B,
                 placed("model-a", "shadow", 80, state="starting", started=NOW - 10)),
        "model-b", 1, "insufficient_memory", 620, ["model-a"], {"model-a": "starting"}, "model-a (80Gi, starting)"),
    "admitted-not-placed-counts-as-starting": Case(
        one_node(model("model-a", 80, 1, startup=45), B),
        "model-b", 1, "insufficient_memory", 645, ["model-a"], {"model-a": "starting"}),
    "reserved-by-the-extender-counts-as-starting": Case(
        ClusterView.build(nodes=[Node("shadow", POOL, 128 * GI)], models=[model("model-a", 80, 1), B],
                          reservations=[Reservation("uid-a", "default/model-a", 80 * GI, NOW + 10, "shadow")]),
        "model-b", 1, "insufficient_memory", 600, ["model-a"], {"model-a": "starting"}),
    # A pod whose model (InferenceModel or Deployment) is gone: nothing will start, idle out or stop it.
    "orphan-pod-frees-only-when-deleted": Case(
        one_node(B, placed("gone", "shadow", 80)),
        "model-b", 1, "insufficient_memory", 30, ["gone"], {"gone": "orphan"},
        "blocked by gone (80Gi, orphan pod default/gone-0: its model is gone); only deleting orphan pod "
        "default/gone-0 frees that memory"),
    "two-orphans-needed-both-named": Case(
        one_node(model("big", 100), placed("gone", "shadow", 40), placed("left", "shadow", 40)),
        "big", 1, "insufficient_memory", 30, ["gone", "left"], {"gone": "orphan", "left": "orphan"},
        "; only deleting orphan pod default/gone-0, orphan pod default/left-0 frees that memory"),
    "orphan-beside-a-model-without-cooldown": Case(
        one_node(model("big", 100), model("a", 40, 1, cooldown=0), placed("a", "shadow", 40),
                 placed("gone", "shadow", 40)),
        "big", 1, "insufficient_memory", 30, ["a", "gone"], {"gone": "orphan"},
        "; a never frees its memory on its own (no cooldown); only deleting orphan pod default/gone-0 frees"),
    "orphan-pod-not-ready-is-not-starting": Case(
        one_node(B, placed("gone", "shadow", 80, state="starting")),
        "model-b", 1, "insufficient_memory", 30, ["gone"], {"gone": "orphan"}, "orphan pod default/gone-0"),
    "orphan-pods-are-all-named": Case(
        one_node(B, placed("gone", "shadow", 40), placed("gone", "shadow", 40, 1)),
        "model-b", 1, "insufficient_memory", 30, ["gone"], {"gone": "orphan"},
        "gone (80Gi, orphan pods default/gone-0, default/gone-1: its model is gone)"),
    "terminating-orphan-is-stopping": Case(
        one_node(B, placed("gone", "shadow", 80, state="stopping", free_by=NOW + 4)),
        "model-b", 1, "insufficient_memory", 4, ["gone"], {"gone": "stopping"}, "gone (80Gi, stopping)"),
    "idle-model-before-an-orphan": Case(
        one_node(model("model-a", 40, 1, idle=120), B, placed("model-a", "shadow", 40), placed("gone", "shadow", 40)),
        "model-b", 1, "insufficient_memory", 480, ["model-a"], {"gone": "orphan"},
        "blocked by model-a (40Gi, idle 120s), gone (40Gi, orphan pod default/gone-0: its model is gone); it fits "
        "once model-a is gone, in 480s"),
    "no-cooldown-means-no-known-time": Case(
        one_node(model("model-a", 80, 1, idle=120, cooldown=0), B, placed("model-a", "shadow", 80)),
        "model-b", 1, "insufficient_memory", 30, ["model-a"], says="never frees its memory on its own"),
    "never-fits-the-pool": Case(
        one_node(model("model-a", 80, 1, idle=120), B, placed("model-a", "shadow", 80)),
        "model-b", 3, "exceeds_pool_capacity", 0, says="it can never fit without more nodes"),
    "larger-than-any-node": Case(one_node(model("big", 200)), "big", 1, "exceeds_node_capacity", 0),
    "no-node-in-the-pool": Case(one_node(model("x", 8, selector={"pool": "none"})), "x", 1, "no_matching_nodes", 0),
    "no-selector-is-the-whole-cluster": Case(
        one_node(model("model-a", 80, 1, idle=120, selector={}), model("model-b", 60, selector={}),
                 placed("model-a", "shadow", 80), selector={}),
        "model-b", 1, "insufficient_memory", 480, ["model-a"], says="model-b needs 60Gi in the whole cluster"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_retry_after_is_when_the_smallest_sufficient_set_is_gone(case):
    d = decide_scale(case.view, case.model, case.replicas, NOW)
    body = explain(d)
    assert (d.allowed, d.reason) == (False, case.reason), d.message
    assert d.retry_after_seconds == case.retry_after, d.message
    assert body["retry_after_seconds"] == (case.retry_after or None)
    assert [b["model"] for b in body["blocking"][: d.retry_blocking]] == case.first
    for name, state in case.states.items():
        assert next(b for b in body["blocking"] if b["model"] == name)["state"] == state
    assert case.says in d.message


def test_the_seed_answer_is_unchanged():
    case = CASES["seed"]
    body = explain(decide_scale(case.view, "model-b", 1, NOW))
    assert body["available"] == "48Gi"
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]
    assert body["retry_after_seconds"] == 480


def test_an_orphan_blocker_names_its_pods_in_the_body():
    body = explain(decide_scale(CASES["orphan-pod-frees-only-when-deleted"].view, "model-b", 1, NOW))
    assert body["blocking"] == [
        {"model": "gone", "memory": "80Gi", "idle_for": "3600s", "state": "orphan", "pods": ["default/gone-0"]}
    ]


# ---- the property: remove what Retry-After names, and the request fits ----
@st.composite
def pools(draw):
    nodes = [Node(f"n{i}", {"pool": draw(st.sampled_from("ab"))}, draw(st.integers(16, 160)) * GI)
             for i in range(draw(st.integers(1, 4)))]
    models, placements = [], []
    for i in range(draw(st.integers(1, 6))):
        memory = draw(st.integers(1, 120))
        selector = draw(st.sampled_from([{}, {"pool": "a"}, {"pool": "b"}]))
        cooldown = draw(st.sampled_from([0.0, 60.0, 600.0]))
        idle = draw(st.integers(0, 700))
        held = 0
        for n in nodes:
            if selector.get("pool", n.labels["pool"]) != n.labels["pool"] or not draw(st.booleans()):
                continue
            used = sum(p.memory_bytes for p in placements if p.node == n.name)
            if used + memory * GI > (n.capacity_bytes or 0):
                continue
            state = draw(st.sampled_from(["running", "running", "starting", "stopping"]))
            free_by = NOW + draw(st.integers(0, 30)) if state == "stopping" else None
            placements.append(placed(f"m{i}", n.name, memory, held, state=state, free_by=free_by))
            held += 1
        replicas = held + draw(st.integers(0, 1))  # sometimes one admitted, not placed yet
        models.append(model(f"m{i}", memory, replicas, idle=idle, cooldown=cooldown, selector=selector,
                            startup=draw(st.sampled_from([0.0, 20.0]))))
    target = draw(st.integers(0, len(models) - 1))
    extra = draw(st.integers(1, 3))
    return ClusterView.build(nodes=nodes, models=models, placements=placements), f"default/m{target}", extra


@settings(max_examples=400, deadline=None)
@given(pools())
def test_removing_the_blockers_retry_after_names_lets_the_request_fit(pool):
    view, key, extra = pool
    replicas = view.models[key].replicas + extra
    d = decide_scale(view, key, replicas, NOW)
    if d.allowed:
        return
    if d.reason != "insufficient_memory":
        assert d.retry_after_seconds == 0
        everyone = [k for k in view.models if k != key]
        assert not decide_scale(without(view, everyone), key, replicas, NOW).allowed
        return
    named = [b.key for b in d.blocking[: d.retry_blocking]]
    assert named and d.retry_after_seconds >= 1
    assert decide_scale(without(view, named), key, replicas, NOW).allowed, d.message
    for left_out in named:  # smallest: every one of them is needed
        rest = [k for k in named if k != left_out]
        assert not decide_scale(without(view, rest), key, replicas, NOW).allowed, (left_out, d.message)
    plan = d.blocking[: d.retry_blocking]
    if all(b.free_in_seconds is not None for b in plan):
        when = max(b.free_in_seconds for b in plan)
        sooner = [b.key for b in d.blocking if b.free_in_seconds is not None and b.free_in_seconds < when]
        assert not decide_scale(without(view, sooner), key, replicas, NOW).allowed  # earliest: nothing sooner fits
