"""Which idle models are stopped to make room: the policy (idleAfter, priority, pinned, busy) as a table."""

from dataclasses import dataclass

import pytest

from budget import ClusterView, Model, Node, Placement
from budget.evict import plan_eviction

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
