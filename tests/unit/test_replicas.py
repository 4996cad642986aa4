"""What the budget allows of what the load layer wants, and the sentence that says so."""

from dataclasses import replace

import pytest

from budget import ClusterView, Model, Node, Placement
from budget.replicas import budget_for

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 10_000.0


def view(node_gi: int, replicas: int, *, other_gi: int = 0) -> ClusterView:
    """chat (20Gi per replica) with `replicas` running; `other` (idle 40 s) holding `other_gi`."""
    models = [Model("default", "chat", 20 * GI, "chat", replicas=replicas, max_replicas=3)]
    placements = [
        Placement(f"default/chat-{i}", "n1", 20 * GI, "default/chat", uid=f"c{i}", phase="Running", started_at=0)
        for i in range(replicas)
    ]
    if other_gi:
        models.append(Model("default", "other", other_gi * GI, "other", replicas=1, last_request_time=NOW - 40))
        placements.append(
            Placement("default/other-0", "n1", other_gi * GI, "default/other", uid="o", phase="Running", started_at=0)
        )
    return ClusterView.build(nodes=[Node("n1", {}, node_gi * GI)], models=models, placements=placements)


CASES = {
    "fits": (view(80, 2), 3, 3, "chat wants 3, budget allows it"),
    "blocked by an idle model": (
        view(80, 2, other_gi=30),
        3,
        2,
        "chat wants 3, budget allows 2, blocked by other (30Gi, idle 40s)",
    ),
    "two short, one fits": (view(60, 1, other_gi=10), 3, 2, "chat wants 3, budget allows 2, blocked by other"),
    "never fits: the reason instead": (
        view(50, 2),
        3,
        2,
        "chat wants 3, budget allows 2 (chat cannot have 3 replica(s)",
    ),
    "a decrease is always allowed": (view(20, 2), 1, 1, "chat wants 1, budget allows it"),
}


@pytest.mark.parametrize(("v", "wanted", "allowed", "message"), CASES.values(), ids=CASES.keys())
def test_budget_for(v: ClusterView, wanted: int, allowed: int, message: str) -> None:
    got = budget_for(v, "default/chat", wanted, NOW)
    assert got.allowed == allowed
    assert got.blocked is (allowed < wanted)
    assert got.message.startswith(message), got.message


def test_allowed_never_below_today() -> None:
    v = view(40, 2)
    v = v.with_model(replace(v.models["default/chat"], replicas=2))
    assert budget_for(v, "chat", 3, NOW).allowed == 2
