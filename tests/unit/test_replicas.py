"""What the budget allows of what the load layer wants, and the sentence that says so."""

from dataclasses import replace

import pytest

from budget import ClusterView, Model, Node, Placement, Reservation
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


def served_as(v: ClusterView, model_name: str) -> ClusterView:
    return v.with_model(replace(v.models["default/chat"], model_name=model_name))


def with_expired_reservation(v: ClusterView) -> ClusterView:
    return v.with_reservations([Reservation("r1", "default/other", 50 * GI, NOW - 1, "n1")])


MORE = {
    # (view, wanted, leaving, allowed, message)
    "named as clients call it": (served_as(view(80, 2), "chat-v2"), 3, 0, 3, "chat-v2 wants 3, budget allows it"),
    "blocked, named as clients call it": (
        served_as(view(80, 2, other_gi=30), "chat-v2"),
        3,
        0,
        2,
        "chat-v2 wants 3, budget allows 2, blocked by other",
    ),
    "a leaving replica holds its room: fits beside it": (view(80, 3), 3, 1, 3, "chat wants 3, budget allows it"),
    "a leaving replica holds its room: not beside it": (view(70, 3), 3, 1, 2, "chat wants 3, budget allows 2"),
    "nothing allowed from zero": (view(40, 0, other_gi=30), 1, 0, 0, "chat wants 1, budget allows 0, blocked by other"),
    "the next one does not fit: today's count": (view(40, 1, other_gi=10), 3, 0, 1, "chat wants 3, budget allows 1"),
    "four more of five fit, one by one": (view(100, 1), 6, 0, 5, "chat wants 6, budget allows 5"),
    "an expired reservation holds nothing": (with_expired_reservation(view(80, 2)), 3, 0, 3, "budget allows it"),
    "an expired reservation, blocked": (
        with_expired_reservation(view(70, 1)),
        4,
        0,
        3,
        "chat wants 4, budget allows 3",
    ),
}


@pytest.mark.parametrize(("v", "wanted", "leaving", "allowed", "message"), MORE.values(), ids=MORE.keys())
def test_budget_for_more(v: ClusterView, wanted: int, leaving: int, allowed: int, message: str) -> None:
    got = budget_for(v, "default/chat", wanted, NOW, leaving=leaving)
    assert (got.wanted, got.allowed) == (wanted, allowed)
    assert got.message.endswith(message) or got.message.startswith(message), got.message
    assert got.decision.allowed is (allowed == wanted)
    assert got.decision.replicas_to == wanted + leaving
