"""Properties of eviction over random single-node pools: the set is allowed by policy, makes room, and is minimal."""

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget import ClusterView, Model, Node, Placement, decide_scale
from budget.decide import without
from budget.evict import plan_eviction

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 10_000.0

running_st = st.lists(
    st.fixed_dictionaries(
        {
            "memory": st.integers(min_value=1, max_value=64),
            "idle": st.sampled_from([0.0, 30.0, 60.0, 90.0, 400.0]),
            "idle_after": st.one_of(st.none(), st.sampled_from([0.0, 60.0, 300.0])),
            "priority": st.integers(min_value=-2, max_value=2),
            "pinned": st.booleans(),
            "ready": st.sampled_from([True, True, True, False]),
            "busy": st.sampled_from([False, False, True]),
        }
    ),
    min_size=0,
    max_size=7,
)


def build(running, capacity_gi, request_gi, request_priority):
    models = [
        Model(
            "d",
            f"m{i}",
            r["memory"] * GI,
            replicas=1,
            last_request_time=NOW - r["idle"],
            evict_idle_after_seconds=r["idle_after"],
            priority=r["priority"],
            pinned=r["pinned"],
        )
        for i, r in enumerate(running)
    ]
    models.append(Model("d", "want", request_gi * GI, priority=request_priority))
    placements = [
        Placement(f"d/m{i}-0", "n", r["memory"] * GI, f"d/m{i}", uid=f"m{i}", started_at=0.0, ready=r["ready"])
        for i, r in enumerate(running)
    ]
    return ClusterView.build(nodes=[Node("n", {}, capacity_gi * GI)], models=models, placements=placements)


def may_go(r, request_priority):
    """The policy, restated independently of the implementation."""
    return (
        r["idle_after"] is not None
        and not r["pinned"]
        and r["ready"]
        and not r["busy"]
        and r["priority"] <= request_priority
        and r["idle"] >= r["idle_after"]
    )


@settings(max_examples=400, deadline=None)
@given(
    running=running_st,
    slack=st.integers(min_value=0, max_value=16),
    request=st.integers(min_value=1, max_value=128),
    request_priority=st.integers(min_value=-2, max_value=2),
)
def test_eviction_is_allowed_sufficient_and_minimal(running, slack, request, request_priority):
    capacity = max(request, sum(r["memory"] for r in running)) + slack  # a nearly full node: room is scarce
    v = build(running, capacity, request, request_priority)
    busy = {f"d/m{i}" for i, r in enumerate(running) if r["busy"]}
    plan = plan_eviction(v, "want", 1, NOW, busy=busy)
    allowed = [f"d/m{i}" for i, r in enumerate(running) if may_go(r, request_priority)]

    def fits_without(keys):
        return decide_scale(without(v, keys), "want", 1, NOW).allowed

    def freed(keys):
        return sum(v.models[k].memory_bytes for k in keys)

    workable = [c for n in range(len(allowed) + 1) for c in combinations(allowed, n) if fits_without(c)]
    if plan is None:
        assert workable == [], "an evictable set makes room but none was offered"
        return
    victims = [x.model for x in plan.victims]
    assert set(victims) <= set(allowed)  # never pinned, busy, starting, higher priority or not idle enough
    assert fits_without(victims)
    assert plan.decision.allowed
    assert all(freed(victims) <= freed(c) for c in workable)  # no smaller evictable set exists
    if decide_scale(v, "want", 1, NOW).allowed:
        assert victims == []


def test_views_without_victims_keep_others():
    v = build(
        [{"memory": 8, "idle": 100, "idle_after": 60.0, "priority": 0, "pinned": False, "ready": True, "busy": False}]
        * 2,
        64,
        60,
        0,
    )
    after = without(v, ["d/m0"])
    assert [p.model for p in after.placements] == ["d/m1"]
    assert after.models["d/m0"].replicas == 0
    assert isinstance(after, ClusterView)
