"""Who a denial names as blocking, with every number a user reads in the 429: memory (in the pool, or all
of it when freeing it elsewhere is what makes room), state, idle time, replicas, when it frees its memory,
and the Retry-After that follows. Each row is a cluster an operator could meet; the whole `blocking` tuple
is compared, so one wrong byte, second or state fails the row."""

from dataclasses import dataclass, replace

import pytest

from budget import (
    Blocking,
    ClusterView,
    Device,
    Model,
    Node,
    Placement,
    Reservation,
    decide_scale,
)
from budget.decide import free_after_admitted, plan_retry, without

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_000_000.0
A = {"pool": "a"}
B = {"pool": "b"}


def model(name, memory, replicas=0, *, idle=None, cooldown=600.0, selector=A, startup=0.0):
    last = None if idle is None else NOW - idle
    return Model("default", name, memory, name, selector, cooldown, replicas, last, startup_seconds=startup)


def pod(name, node, memory, i=0, *, state="running", started=NOW - 3600, free_by=None):
    return Placement(f"default/{name}-{i}", node, memory, f"default/{name}", uid=f"{name}-{i}",
                     started_at=started, ready=state == "running", state=state, free_by=free_by)


def blocking(name, memory, *, idle=0.0, cooldown=600.0, replicas=1, state="idle", free_in=None):
    return Blocking(name, memory, idle, cooldown, replicas, state, free_in, f"default/{name}")


ONE_NODE = (Node("gpu-2", A, 128 * GI),)


def cluster(*objects, nodes=ONE_NODE):
    return ClusterView.build(
        nodes=list(nodes),
        models=[o for o in objects if isinstance(o, Model)],
        placements=[o for o in objects if isinstance(o, Placement)],
        reservations=[o for o in objects if isinstance(o, Reservation)],
    )


# gpu-1 (pool b) sorts before gpu-2 (pool a): a model without a selector tries gpu-1 first.
TWO_POOLS = (Node("gpu-1", B, 128 * GI), Node("gpu-2", A, 128 * GI))
TARGET = model("t", 60 * GI)


@dataclass
class Case:
    view: ClusterView
    blocking: tuple  # the whole `blocking` tuple of the denial, in order
    retry_after: int
    retry_blocking: int
    message: str  # the whole message
    replicas: int = 1
    reason: str = "insufficient_memory"


CASES = {
    # x holds gpu-1 (pool b) with one replica running and one admitted, unplaced; y (no selector) is
    # admitted too and, with gpu-1 full, lands on gpu-2 in t's pool. x going lets y land on gpu-1 instead,
    # so x is what makes room though none of its memory is in the pool: it is named with all of its
    # memory (100Gi), as starting (its second replica is), freeing after its 100 s cooldown.
    "freeing-another-pool-moves-an-admitted-replica-out": Case(
        cluster(TARGET, model("w", 60 * GI, 1, idle=0), model("x", 50 * GI, 2, cooldown=100, selector=B),
                model("y", 40 * GI, 1, selector={}), pod("w", "gpu-2", 60 * GI), pod("x", "gpu-1", 50 * GI),
                nodes=TWO_POOLS),
        (blocking("x", 100 * GI, cooldown=100, state="starting", free_in=100.0),
         blocking("w", 60 * GI, free_in=600.0),
         blocking("y", 40 * GI, state="starting", free_in=600.0)),
        100, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by x (100Gi, starting), w (60Gi, idle 0s), "
        "y (40Gi, starting); it fits once x is gone, in 100s",
    ),
    # x (no selector) was admitted for two replicas: one lands on gpu-1 (pool b), one on gpu-2 in t's pool.
    # Only the one in the pool is named: 50Gi, one replica.
    "admitted-replicas-split-between-pools": Case(
        cluster(TARGET, model("w", 60 * GI, 1, idle=0), model("x", 50 * GI, 2, cooldown=300, selector={}),
                pod("w", "gpu-2", 60 * GI),
                nodes=(Node("gpu-1", B, 60 * GI), Node("gpu-2", A, 128 * GI))),
        (blocking("x", 50 * GI, cooldown=300, state="starting", free_in=300.0),
         blocking("w", 60 * GI, free_in=600.0)),
        300, 1,
        "t needs 60Gi in pool pool=a; 18Gi available; blocked by x (50Gi, starting), w (60Gi, idle 0s); "
        "it fits once x is gone, in 300s",
    ),
    # r's pod is reserved on gpu-1 (pool b) by the extender: it takes nothing from pool a, so only w is named.
    "a-reservation-in-another-pool-is-not-named": Case(
        cluster(TARGET, model("w", 100 * GI, 1, idle=120), model("r", 100 * GI, 1, selector=B),
                pod("w", "gpu-2", 100 * GI),
                Reservation("uid-r", "default/r", 100 * GI, NOW + 10, "gpu-1"), nodes=TWO_POOLS),
        (blocking("w", 100 * GI, idle=120.0, free_in=480.0),),
        480, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by w (100Gi, idle 120s)",
    ),
    # Two replicas starting: the one started last is ready last (25 s), then the 600 s cooldown runs.
    "two-starting-replicas-the-later-ready-sets-the-time": Case(
        cluster(TARGET, model("s", 50 * GI, 2, startup=30),
                pod("s", "gpu-2", 50 * GI, 0, state="starting", started=NOW - 5),
                pod("s", "gpu-2", 50 * GI, 1, state="starting", started=NOW - 20)),
        (blocking("s", 100 * GI, replicas=2, state="starting", free_in=625.0),),
        625, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by s (100Gi, starting)",
    ),
    # Two pods stopping: the memory is free when the later grace period ends (10 s), not the earlier.
    "two-stopping-pods-the-later-grace-end-sets-the-time": Case(
        cluster(TARGET, model("p", 50 * GI),
                pod("p", "gpu-2", 50 * GI, 0, state="stopping", free_by=NOW + 10),
                pod("p", "gpu-2", 50 * GI, 1, state="stopping", free_by=NOW + 4)),
        (blocking("p", 100 * GI, idle=3600.0, replicas=2, state="stopping", free_in=10.0),),
        10, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by p (100Gi, stopping)",
    ),
    # One of two stopping pods has no grace end: nobody can say when all the memory is free.
    "a-stopping-pod-without-a-grace-end": Case(
        cluster(TARGET, model("p", 50 * GI),
                pod("p", "gpu-2", 50 * GI, 0, state="stopping", free_by=NOW + 4),
                pod("p", "gpu-2", 50 * GI, 1, state="stopping", free_by=None)),
        (blocking("p", 100 * GI, idle=3600.0, replicas=2, state="stopping", free_in=None),),
        30, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by p (100Gi, stopping); "
        "p never frees its memory on its own (no cooldown)",
    ),
    "half-a-second-of-grace-left": Case(
        cluster(TARGET, model("p", 100 * GI), pod("p", "gpu-2", 100 * GI, state="stopping", free_by=NOW + 0.5)),
        (blocking("p", 100 * GI, idle=3600.0, state="stopping", free_in=0.5),),
        1, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by p (100Gi, stopping)",
    ),
    # A pod left behind by a deleted model: no model, no cooldown, so it never goes on its own.
    "a-deleted-model's-leftover-pod": Case(
        cluster(TARGET, pod("gone", "gpu-2", 100 * GI)),
        (Blocking("gone", 100 * GI, 3600.0, 0.0, 1, "orphan", None, "default/gone", ("default/gone-0",)),),
        30, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by gone (100Gi, orphan pod default/gone-0: its "
        "model is gone); only deleting orphan pod default/gone-0 frees that memory",
    ),
    "a-one-second-cooldown": Case(
        cluster(TARGET, model("c", 100 * GI, 1, idle=0, cooldown=1.0), pod("c", "gpu-2", 100 * GI)),
        (blocking("c", 100 * GI, cooldown=1.0, free_in=1.0),),
        1, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by c (100Gi, idle 0s)",
    ),
    # Idle past its cooldown, not scaled down yet: due now (Retry-After never goes below 1 s).
    "idle-past-its-cooldown": Case(
        cluster(TARGET, model("e", 100 * GI, 1, idle=100, cooldown=60.0), pod("e", "gpu-2", 100 * GI)),
        (blocking("e", 100 * GI, idle=100.0, cooldown=60.0, free_in=0.0),),
        1, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by e (100Gi, idle 100s)",
    ),
    # Models of 1 byte admitted, o for two replicas, o1 for one; t needs all but one byte of the node: o going
    # is enough, and o1, holding a single byte, is still named.
    "one-byte-models-admitted": Case(
        cluster(model("t", 128 * GI - 1), model("o", 1, 2), model("o1", 1, 1)),
        (blocking("o", 2, replicas=2, state="starting", free_in=600.0),
         blocking("o1", 1, state="starting", free_in=600.0)),
        600, 1,
        "t needs 137438953471 in pool pool=a; 137438953469 available; blocked by o (2, starting), o1 (1, starting); "
        "it fits once o is gone, in 600s",
    ),
    # A pod that holds no memory is not named; a model of no memory holding a pod counts that pod once.
    "a-pod-holding-no-memory-is-not-named": Case(
        cluster(TARGET, model("q", 10 * GI, 1, idle=0), model("z", 0, 1, idle=0),
                pod("q", "gpu-2", 0), pod("z", "gpu-2", 100 * GI)),
        (blocking("z", 100 * GI, free_in=600.0),),
        600, 1,
        "t needs 60Gi in pool pool=a; 28Gi available; blocked by z (100Gi, idle 0s)",
    ),
    # Freeing more is not always better: with m2 gone (30 s) t's second replica fits on gpu-2; with m1 gone
    # too (60 s), m3's admitted replica (61Gi, no room anywhere now) lands there first and takes the room.
    # So the plan is m2 alone, at 30 s, not "wait for all" nor m3, which never goes. (m4, in pool a, frees
    # first, at 10 s, and too little anywhere: the plan looks past it.)
    "freeing-more-lets-an-admitted-replica-take-the-room": Case(
        cluster(model("t", 45 * GI, selector=B), model("m1", 16 * GI, 1, idle=0, cooldown=60.0, selector=B),
                model("m4", 10 * GI, 1, idle=590), pod("m4", "gpu-0", 10 * GI),
                model("m2", 21 * GI, selector=B), model("m3", 61 * GI, 2, idle=0, cooldown=0, selector={}),
                pod("m1", "gpu-2", 16 * GI, state="starting", started=NOW - 5),
                pod("m2", "gpu-2", 21 * GI, state="stopping", free_by=NOW + 30), pod("m3", "gpu-2", 61 * GI),
                nodes=(Node("gpu-0", A, 10 * GI), Node("gpu-1", B, 59 * GI), Node("gpu-2", B, 135 * GI))),
        (blocking("m2", 21 * GI, idle=3600.0, state="stopping", free_in=30.0),
         blocking("m3", 61 * GI, cooldown=0.0, state="starting"),
         blocking("m1", 16 * GI, cooldown=60.0, state="starting", free_in=60.0)),
        30, 1,
        "t needs 2 more replicas of 45Gi in pool pool=b; 59Gi available; blocked by m2 (21Gi, stopping), "
        "m3 (61Gi, starting), m1 (16Gi, starting); it fits once m2 is gone, in 30s",
        replicas=2,
    ),
    # Two sets of three free room for t's two replicas, at the same time (never: each has a model without a
    # cooldown) and of the same size: {m0, m2, m3} and {m2, m3, m5}. The largest-first rule picks the first:
    # m0 holds 85Gi on gpu-1 now, where m5 is admitted but placed nowhere.
    "of-two-equal-sets-the-largest-first-rule-picks": Case(
        cluster(model("t", 56 * GI, 1, cooldown=0, selector={}, startup=20.0),
                model("m0", 85 * GI, 1, idle=100, cooldown=0),
                model("m2", 106 * GI, 1, idle=0, cooldown=0, selector={}),
                model("m3", 93 * GI, 1, idle=100, cooldown=0, selector={}, startup=20.0),
                model("m5", 85 * GI, 1, idle=261, cooldown=0, selector=B),
                pod("m0", "gpu-1", 85 * GI, started=NOW - 5),
                pod("m2", "gpu-2", 106 * GI, state="stopping", started=NOW - 5, free_by=NOW + 10),
                nodes=(Node("gpu-1", A, 106 * GI), Node("gpu-2", B, 145 * GI))),
        (blocking("m0", 85 * GI, idle=5.0, cooldown=0.0),
         blocking("m2", 106 * GI, cooldown=0.0, state="stopping", free_in=10.0),
         blocking("m3", 93 * GI, cooldown=0.0, state="starting")),
        30, 3,
        "t needs 2 more replicas of 56Gi in the whole cluster; 39Gi available; blocked by m0 (85Gi, idle 5s), "
        "m2 (106Gi, stopping), m3 (93Gi, starting); m0, m3 never frees its memory on its own (no cooldown)",
        replicas=2,
    ),
    "two-more-replicas": Case(
        cluster(TARGET, model("w", 20 * GI, 1, idle=100), pod("w", "gpu-2", 20 * GI)),
        (blocking("w", 20 * GI, idle=100.0, free_in=500.0),),
        500, 1,
        "t needs 2 more replicas of 60Gi in pool pool=a; 108Gi available; blocked by w (20Gi, idle 100s)",
        replicas=2,
    ),
    # Never fits the pool: the models there are still named, without a Retry-After.
    "never-fits-the-pool-still-names-who-is-there": Case(
        cluster(TARGET, model("w", 20 * GI, 1, idle=100), pod("w", "gpu-2", 20 * GI)),
        (blocking("w", 20 * GI, idle=100.0, free_in=500.0),),
        0, 0,
        "t cannot have 3 replica(s) of 60Gi in pool pool=a even with nothing else running "
        "(1 node(s), 128Gi in all); it can never fit without more nodes",
        replicas=3, reason="exceeds_pool_capacity",
    ),
    # Both must go and one has no cooldown: the message names the one that never goes, not the other.
    "one-of-two-needed-never-goes": Case(
        cluster(model("t", 100 * GI), model("n", 50 * GI, 1, idle=0, cooldown=0), model("c", 50 * GI, 1, idle=100),
                pod("n", "gpu-2", 50 * GI), pod("c", "gpu-2", 50 * GI)),
        (blocking("c", 50 * GI, idle=100.0, free_in=500.0), blocking("n", 50 * GI, cooldown=0.0)),
        30, 2,
        "t needs 100Gi in pool pool=a; 28Gi available; blocked by c (50Gi, idle 100s), n (50Gi, idle 0s); "
        "n never frees its memory on its own (no cooldown)",
    ),
    "two-needed-neither-goes": Case(
        cluster(model("t", 100 * GI), model("n", 50 * GI, 1, idle=0, cooldown=0),
                model("m", 50 * GI, 1, idle=100, cooldown=0), pod("n", "gpu-2", 50 * GI), pod("m", "gpu-2", 50 * GI)),
        (blocking("m", 50 * GI, idle=100.0, cooldown=0.0), blocking("n", 50 * GI, cooldown=0.0)),
        30, 2,
        "t needs 100Gi in pool pool=a; 28Gi available; blocked by m (50Gi, idle 100s), n (50Gi, idle 0s); "
        "m, n never frees its memory on its own (no cooldown)",
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_who_blocks_and_when_it_frees(case):
    d = decide_scale(case.view, "t", case.replicas, NOW)
    assert (d.allowed, d.reason) == (False, case.reason), d.message
    assert d.blocking == case.blocking
    assert (d.retry_after_seconds, d.retry_blocking) == (case.retry_after, case.retry_blocking)
    assert d.message == case.message


def test_a_model_gone_from_the_view_takes_its_reservations_along():
    """The what-if the retry plan and eviction ask: with x gone, its reserved pod holds nothing; y's still does."""
    x = Reservation("uid-x", "default/x", 60 * GI, NOW + 10, "gpu-2")
    y = Reservation("uid-y", "default/y", 40 * GI, NOW + 10, "gpu-2")
    view = cluster(TARGET, model("x", 60 * GI, 1), model("y", 40 * GI, 1), x, y)
    assert not decide_scale(view, "t", 1, NOW).allowed
    after = without(view, ["default/x"])
    assert after.reservations == (y,)
    assert decide_scale(after, "t", 1, NOW).allowed


def test_a_model_of_no_memory_lands_nowhere():
    """Admitted replicas of a model without memory take no room and are not placed anywhere."""
    view = cluster(TARGET, model("z", 0, 2), model("y", 40 * GI, 1))
    free, landed = free_after_admitted(view, NOW)
    assert landed == [("default/y", "gpu-2", 40 * GI)]
    assert free == {"gpu-2": {0: 88 * GI}}



# ---- the retry plan: which of the blocking models the 429 says must go, and when ----
@dataclass
class Plan:
    view: ClusterView
    needs_gi: int
    plan: list  # the models whose going lets t fit, in the order they go (plan_retry's answer)
    after: float | None  # plan_retry's time; None: one of them never goes on its own
    order: list  # the denial's `blocking` names: the plan first, then the rest, each part in display order
    retry_after: int


def nodes(*gi):
    return tuple(Node(f"gpu-{i}", A, size * GI) for i, size in enumerate(gi, start=2))


PLANS = {
    # a is the largest but frees only 60Gi on its full node; b, smaller, frees 70Gi beside gpu-3's 20Gi free.
    # Both are due at 500 s: the plan keeps only b, the one that is enough.
    "the-smaller-one-on-a-node-with-room-is-enough": Plan(
        cluster(model("a", 60 * GI, 1, idle=100), model("b", 50 * GI, 1, idle=100), model("q", 30 * GI, 1, idle=0,
                cooldown=0), pod("a", "gpu-2", 60 * GI), pod("b", "gpu-3", 50 * GI), pod("q", "gpu-3", 30 * GI),
                nodes=nodes(60, 100)),
        65, ["b"], 500.0, ["b", "a", "q"], 500),
    # a and b go on their own (at 10 s and 20 s) and together are enough; so is n alone, which never goes.
    "two-that-go-on-their-own-beat-one-that-never-does": Plan(
        cluster(model("b1", 30 * GI, 1, idle=590), model("a1", 30 * GI, 1, idle=580),
                model("n", 60 * GI, 1, idle=0, cooldown=0), pod("b1", "gpu-2", 30 * GI), pod("a1", "gpu-2", 30 * GI),
                pod("n", "gpu-2", 60 * GI), nodes=nodes(150)),
        85, ["b1", "a1"], 20.0, ["b1", "a1", "n"], 20),
    # e is past its cooldown (due now), p's grace period ends in half a second; either is enough: e, now.
    "due-now-goes-before-half-a-second": Plan(
        cluster(model("e", 100 * GI, 1, idle=100, cooldown=60.0), model("p", 100 * GI),
                pod("e", "gpu-2", 100 * GI), pod("p", "gpu-3", 100 * GI, state="stopping", free_by=NOW + 0.5),
                nodes=nodes(128, 128)),
        60, ["e"], 0.0, ["e", "p"], 1),
    # a and b are due together (500 s), c later; either of a and b is enough: the larger, b, is named.
    "due-together-the-larger-is-named": Plan(
        cluster(model("a", 40 * GI, 1, idle=100), model("b", 60 * GI, 1, idle=100), model("c", 20 * GI, 1, idle=0),
                pod("a", "gpu-2", 40 * GI), pod("b", "gpu-2", 60 * GI), pod("c", "gpu-2", 20 * GI)),
        45, ["b"], 500.0, ["b", "a", "c"], 500),
    # n never goes (no cooldown) and is needed with one of s1 and s2 (14Gi each): s1, due at 60 s, not s2
    # (620 s), though s2 holds memory longer (its pod is listed first).
    "one-that-never-goes-and-the-sooner-of-two-equals": Plan(
        cluster(model("s1", 14 * GI, 1, idle=540), model("s2", 14 * GI, 1, idle=0, cooldown=620.0),
                model("n", 32 * GI, 1, idle=0, cooldown=0), pod("s2", "gpu-2", 14 * GI), pod("s1", "gpu-2", 14 * GI),
                pod("n", "gpu-2", 32 * GI), nodes=nodes(70)),
        50, ["s1", "n"], None, ["s1", "n", "s2"], 30),
}


@pytest.mark.parametrize("case", list(PLANS.values()), ids=list(PLANS))
def test_the_retry_plan_names_the_fewest_that_free_room_soonest(case):
    view = ClusterView.build(nodes=case.view.nodes, models=[*case.view.models.values(), model("t", case.needs_gi * GI)],
                             placements=case.view.placements)
    d = decide_scale(view, "t", 1, NOW)
    assert (d.allowed, d.reason) == (False, "insufficient_memory"), d.message
    assert [b.model for b in d.blocking] == case.order
    assert (d.retry_after_seconds, d.retry_blocking) == (case.retry_after, len(case.plan))
    plan = plan_retry(view, view.models["default/t"], 1, NOW, d.blocking)
    assert ([b.model for b in plan.blockers], plan.after_seconds) == (case.plan, case.after)


def test_the_model_asked_about_is_not_its_own_ground():
    """free_after_admitted(exclude=) leaves out the missing replicas of the model being decided."""
    view = cluster(TARGET, model("y", 40 * GI, 1), model("x", 20 * GI, 2))
    free, landed = free_after_admitted(view, NOW, exclude="default/y")
    assert landed == [("default/x", "gpu-2", 20 * GI), ("default/x", "gpu-2", 20 * GI)]
    assert free == {"gpu-2": {0: 88 * GI}}


@pytest.mark.parametrize(
    ("devices", "says"),
    [
        pytest.param(2, "t cannot have 3 replica(s) of 60Gi on 2 devices each in pool pool=a even with nothing else "
                     "running (1 node(s), 80Gi in all); it can never fit without more nodes", id="tensor-parallel"),
        pytest.param(1, "t cannot have 3 replica(s) of 30Gi in pool pool=a even with nothing else "
                     "running (1 node(s), 80Gi in all); it can never fit without more nodes", id="one-device"),
    ],
)
def test_never_fits_the_pool_says_how_a_replica_is_split(devices, says):
    """A replica split over devices: the refusal says so, with the per-replica memory it was asked for."""
    node = Node("gpu-2", A, None, "devices-annotation", (Device(0, 40 * GI), Device(1, 40 * GI)))
    t = replace(model("t", 30 * GI * devices), devices=devices)
    d = decide_scale(ClusterView.build(nodes=[node], models=[t]), "t", 3, NOW)
    assert (d.reason, d.message) == ("exceeds_pool_capacity", says)
