"""Which idle models are stopped to make room: the policy (idleAfter, priority, pinned, busy) as a table."""

from dataclasses import dataclass, replace

import pytest

from budget import ClusterView, Model, Node, Placement, Reservation
from budget.errors import UnknownModelError
from budget.evict import evictable, plan_eviction

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 10_000.0


@dataclass(frozen=True)
class Running:
    """A model with one ready replica on the node, idle `idle` seconds, with an eviction policy."""

    name: str
    memory_gi: int
    idle: float = 90.0
    idle_after: float | None = 60.0
    priority: int = 0
    pinned: bool = False
    ready: bool = True


def view(running: list[Running], *, capacity_gi: int = 128, requester_priority: int = 0) -> ClusterView:
    models = [
        Model(
            "default",
            r.name,
            r.memory_gi * GI,
            r.name,
            replicas=1,
            last_request_time=NOW - r.idle,
            evict_idle_after_seconds=r.idle_after,
            priority=r.priority,
            pinned=r.pinned,
        )
        for r in running
    ]
    models.append(Model("default", "model-b", 60 * GI, "model-b", priority=requester_priority))
    placements = [
        Placement(
            f"default/{r.name}-0",
            "node-1",
            r.memory_gi * GI,
            f"default/{r.name}",
            uid=r.name,
            phase="Running",
            started_at=NOW - 1000,
            ready=r.ready,
        )
        for r in running
    ]
    return ClusterView.build(nodes=[Node("node-1", {}, capacity_gi * GI)], models=models, placements=placements)


CASES = [
    # id, running models, requester priority, busy, expected victims (None: no eviction, 429 as today)
    ("seed-idle-90s-evicted", [Running("model-a", 80, idle=90)], 0, (), ["model-a"]),
    ("seed-idle-30s-none", [Running("model-a", 80, idle=30)], 0, (), None),
    ("idle-exactly-idle-after", [Running("model-a", 80, idle=60)], 0, (), ["model-a"]),
    ("no-idle-after-never", [Running("model-a", 80, idle=10_000, idle_after=None)], 0, (), None),
    ("pinned-never", [Running("model-a", 80, idle=10_000, pinned=True)], 0, (), None),
    ("higher-priority-never", [Running("model-a", 80, priority=5)], 0, (), None),
    ("equal-priority-evicted", [Running("model-a", 80, priority=5)], 5, (), ["model-a"]),
    ("lower-priority-evicted", [Running("model-a", 80, priority=-1)], 0, (), ["model-a"]),
    ("busy-never", [Running("model-a", 80)], 0, ("default/model-a",), None),
    ("starting-never", [Running("model-a", 80, ready=False)], 0, (), None),
    ("fits-already-empty", [Running("model-c", 16)], 0, (), []),
    (
        "fewest-bytes-beyond-need",
        [Running("model-a", 80), Running("model-c", 16), Running("model-d", 32)],
        0,
        (),
        ["model-a"],  # c+d free 48Gi: not enough; a alone frees 80Gi, less than a+c or a+d
    ),
    (
        "two-small-rather-than-one-big",
        [Running("model-a", 70), Running("model-c", 32), Running("model-d", 28)],
        0,
        (),
        ["model-c", "model-d"],  # node of 130Gi, full: c+d free exactly 60Gi, a alone 70Gi
    ),
    (
        "tie-lowest-priority",
        [Running("model-a", 64, priority=0), Running("model-c", 32, priority=-1), Running("model-d", 32, priority=-1)],
        0,
        (),
        ["model-c", "model-d"],
    ),
    (
        "tie-longest-idle",
        [Running("model-a", 64, idle=100), Running("model-c", 64, idle=500)],
        0,
        (),
        ["model-c"],
    ),
    (
        "not-enough-even-with-all",
        [Running("model-a", 40), Running("model-c", 88, idle_after=None)],
        0,
        (),
        None,  # only a (40Gi) may go: 40 < 60
    ),
]


@pytest.mark.parametrize(("running", "priority", "busy", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_eviction(running, priority, busy, expected):
    capacity = max(128, sum(r.memory_gi for r in running))  # the node is full when they add up to more
    plan = plan_eviction(view(running, capacity_gi=capacity, requester_priority=priority), "model-b", 1, NOW, busy=busy)
    if expected is None:
        assert plan is None
        return
    assert plan is not None
    assert [v.name for v in plan.victims] == expected
    assert plan.decision.allowed


def test_message_names_victim_idle_time_and_requester():
    plan = plan_eviction(view([Running("model-a", 80, idle=90)]), "model-b", 1, NOW)
    assert plan is not None
    assert plan.message == "stopping model-a (80Gi, idle 90s) to make room for model-b"
    assert plan.freed_bytes == 80 * GI


def test_larger_than_any_node_never_evicts():
    v = view([Running("model-a", 40)], capacity_gi=50)
    assert plan_eviction(v, "model-b", 1, NOW) is None


# ----- who may be stopped: one pool of two GPUs beside a Mac, every policy rule at once -----

GPU = {"pool": "gpu"}
MAC = {"pool": "mac"}


@dataclass(frozen=True)
class Held:
    """A model and where its replicas sit: (node, Gi) pairs; `reserved`: a live reservation of it."""

    name: str
    on: tuple[tuple[str, int], ...]
    idle: float | None = 300.0  # seconds since its last request; None: never asked (idle since its start)
    started_ago: float = 1000.0
    replicas: int | None = None  # desired; default: one per placement
    priority: int = 0
    model_name: str = ""
    reserved: float | None = None  # a reservation of this model expiring this many seconds from now


# (id, model, its victim as (label, held Gi, idle seconds, priority), or None when policy keeps it)
WHO = [
    ("asked-too-recently", Held("k", (("g1", 3),), idle=30), None),
    ("idle-on-one-gpu", Held("a", (("g1", 10),), idle=900), ("a", 10, 900.0, 0)),
    ("lower-priority", Held("b", (("g2", 20),), idle=100, priority=-1), ("b", 20, 100.0, -1)),
    ("named-by-model-name", Held("c", (("g1", 4),), model_name="org/c"), ("org/c", 4, 300.0, 0)),
    ("a-replica-still-to-come", Held("d", (("g1", 8),), replicas=2), None),
    ("only-on-another-pool", Held("e", (("mac", 16),)), None),
    ("half-in-the-pool-counts-half", Held("f", (("g2", 8), ("mac", 8))), ("f", 8, 300.0, 0)),
    ("live-reservation-is-starting", Held("g", (("g1", 2),), reserved=30.0), None),
    ("expired-reservation-is-not", Held("h", (("g2", 2),), reserved=-1.0), ("h", 2, 300.0, 0)),
    ("never-asked-idle-since-start", Held("i", (("g1", 6),), idle=None, started_ago=700), ("i", 6, 700.0, 0)),
    ("never-asked-started-just-now", Held("j", (("g1", 6),), idle=None, started_ago=30), None),
]


def _pool_view(held: list[Held]) -> ClusterView:
    nodes = [Node("g1", GPU, 100 * GI), Node("g2", GPU, 100 * GI), Node("cpu", GPU), Node("mac", MAC, 100 * GI)]
    models = [Model("ns", "want", 60 * GI, "", GPU)]
    placements, reservations = [], []
    for h in held:
        models.append(
            Model(
                "ns",
                h.name,
                h.on[0][1] * GI,
                h.model_name,
                GPU,
                replicas=len(h.on) if h.replicas is None else h.replicas,
                last_request_time=None if h.idle is None else NOW - h.idle,
                evict_idle_after_seconds=60.0,
                priority=h.priority,
            )
        )
        for i, (node, gi) in enumerate(h.on):
            pod = f"ns/{h.name}-{i}"
            placements.append(
                Placement(pod, node, gi * GI, f"ns/{h.name}", uid=pod, started_at=NOW - h.started_ago, ready=True)
            )
        if h.reserved is not None:
            expires = NOW + h.reserved
            reservations.append(Reservation(f"r-{h.name}", f"ns/{h.name}", GI, expires, "g2", f"ns/{h.name}-r"))
    return ClusterView.build(nodes=nodes, models=models, placements=placements, reservations=reservations)


def _victims(held: list[Held]) -> list[tuple[str, int, float, int]]:
    victims = evictable(_pool_view(held), "want", NOW)
    return [(v.name, v.memory_bytes // GI, v.idle_for_seconds, v.priority) for v in victims]


@pytest.mark.parametrize(("held", "victim"), [w[1:] for w in WHO], ids=[w[0] for w in WHO])
def test_who_may_be_stopped(held, victim):
    assert _victims([held]) == ([] if victim is None else [victim])


def test_who_may_be_stopped_all_at_once_lowest_priority_then_most_idle_first():
    """The whole table in one pool: the same verdicts, listed lowest priority first, then most idle."""
    expected = [w[2] for w in WHO if w[2] is not None]
    expected.sort(key=lambda v: (v[3], -v[2], v[1], v[0]))
    assert _victims([w[1] for w in WHO]) == expected
    assert [v[0] for v in expected] == ["b", "a", "i", "h", "org/c", "f"]  # equal idle: the smaller first


def test_a_model_of_one_byte_still_frees_its_byte():
    view = _pool_view([Held("tiny", (("g1", 1),))])
    tiny = replace(view.placements[0], memory_bytes=1)
    (victim,) = evictable(replace(view, placements=(tiny,)), "want", NOW)
    assert (victim.name, victim.memory_bytes) == ("tiny", 1)


def test_evicting_for_an_unknown_model_names_it():
    with pytest.raises(UnknownModelError, match="^unknown model 'nope'$"):
        evictable(_pool_view([]), "nope", NOW)


def test_plan_eviction_in_a_pool_with_an_unbudgeted_node_and_a_reservation():
    """The pool's CPU node has no budget and a live reservation holds room: the plan still adds up."""
    held = [
        Held("a", (("g1", 70),), idle=900),
        Held("b", (("g2", 60),), idle=100),
        Held("r", (("g1", 1),), reserved=30),
    ]
    plan = plan_eviction(_pool_view(held), "want", 1, NOW)
    assert plan is not None
    # g1 has 29Gi free (a 70Gi, r 1Gi), g2 39Gi (b 60Gi, r's reservation 1Gi): stopping b (60Gi) or a (70Gi)
    # makes room; the fewest bytes beyond the need wins, and the 60Gi replica lands where b was.
    assert [(v.name, v.memory_bytes // GI) for v in plan.victims] == [("b", 60)]
    decision = plan.decision
    assert (decision.allowed, decision.placements, decision.available_bytes) == (True, {"g2": 1}, 99 * GI)


def _scale_up_view(own_reserved: bool, *, n1_gi: int = 40) -> ClusterView:
    """n1: want's three 10Gi replicas (the third only reserved when `own_reserved`) and b (5Gi); n2: a (80Gi)."""
    def idle_model(name: str, gi: int) -> Model:
        return Model("ns", name, gi * GI, "", replicas=1, last_request_time=NOW - 300, evict_idle_after_seconds=60)

    models = [Model("ns", "want", 10 * GI, "", replicas=3), idle_model("a", 80), idle_model("b", 5)]
    placed = [("want", "n1", 10), ("want", "n1", 10), ("b", "n1", 5), ("a", "n2", 80)]
    if not own_reserved:
        placed.append(("want", "n1", 10))
    placements = [
        Placement(f"ns/{m}-{i}", node, gi * GI, f"ns/{m}", uid=f"{m}-{i}", started_at=NOW - 1000, ready=True)
        for i, (m, node, gi) in enumerate(placed)
    ]
    reservations = [Reservation("r-want", "ns/want", 10 * GI, NOW + 30, "n1", "ns/want-r")] if own_reserved else []
    nodes = [Node("n1", {}, n1_gi * GI), Node("n2", {}, 80 * GI)]
    return ClusterView.build(nodes=nodes, models=models, placements=placements, reservations=reservations)


@pytest.mark.parametrize("own_reserved", [False, True], ids=["three-placed", "two-placed-one-reserved"])
def test_a_scale_up_counts_the_replicas_it_already_holds(own_reserved):
    """want has 3 replicas and asks for a 4th (10Gi); n1 has 5Gi free. Stopping b (5Gi) is enough: only the
    4th replica needs room, however its first three hold theirs (placed or reserved)."""
    plan = plan_eviction(_scale_up_view(own_reserved), "want", 4, NOW)
    assert plan is not None
    assert [v.name for v in plan.victims] == ["b"]
    assert (plan.decision.allowed, plan.decision.placements) == (True, {"n1": 1})


def test_room_split_across_nodes_is_made_on_one_node():
    """40Gi free in all, 20Gi on each node: no node takes a 40Gi replica until one model on it stops."""
    models = [
        Model("ns", "want", 40 * GI, ""),
        *(Model("ns", m, 30 * GI, "", replicas=1, last_request_time=NOW - 300, evict_idle_after_seconds=60)
          for m in ("a", "b")),
    ]
    placements = [
        Placement(f"ns/{m}-0", node, 30 * GI, f"ns/{m}", uid=m, started_at=NOW - 1000, ready=True)
        for m, node in (("a", "n1"), ("b", "n2"))
    ]
    view = ClusterView.build(nodes=[Node("n1", {}, 50 * GI), Node("n2", {}, 50 * GI)], models=models,
                             placements=placements)
    plan = plan_eviction(view, "want", 1, NOW)
    assert plan is not None
    assert ([v.name for v in plan.victims], plan.decision.placements) == (["a"], {"n1": 1})  # a tie: by name
