"""The order of a denial's `blocking` list: the models whose going lets the request fit first, and within
each part idle before stopping before starting, longest idle first, then the largest, then by name."""

from dataclasses import dataclass

import pytest

from budget import ClusterView, Model, Node, Placement, decide_scale

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_000_000.0
POOL = {"inference-pool": "gpu-nodes"}


@dataclass(frozen=True)
class Other:
    name: str
    memory_gi: int
    idle_seconds: float
    cooldown_seconds: float = 600.0


@dataclass(frozen=True)
class Case:
    target_gi: int
    others: tuple[Other, ...]
    order: list[str]  # the `blocking` names, in order
    retry_blocking: int


CASES = {
    # Both are needed and equally idle: the larger first, though its name sorts after.
    "equally-idle-both-needed-larger-first": Case(
        100, (Other("alpha", 30, 100), Other("zulu", 40, 100)), ["zulu", "alpha"], 2
    ),
    "equally-idle-both-needed-given-in-the-other-order": Case(
        100, (Other("zulu", 40, 100), Other("alpha", 30, 100)), ["zulu", "alpha"], 2
    ),
    # Longer idle comes first even when smaller.
    "longest-idle-first": Case(100, (Other("big", 40, 50), Other("small", 30, 300)), ["small", "big"], 2),
    # The one that frees first suffices: it leads, though longer-idle `late` would be listed first.
    "the-one-that-suffices-leads": Case(
        60, (Other("late", 50, 100), Other("soon", 20, 50, cooldown_seconds=100)), ["soon", "late"], 1
    ),
    "equal-size-and-idle-by-name": Case(100, (Other("b", 35, 100), Other("a", 35, 100)), ["a", "b"], 2),
}


def _view(case: Case) -> ClusterView:
    models = [Model("default", "target", case.target_gi * GI, "target", POOL, 600.0, 0, None)]
    placements = []
    for o in case.others:
        models.append(
            Model("default", o.name, o.memory_gi * GI, o.name, POOL, o.cooldown_seconds, 1, NOW - o.idle_seconds)
        )
        placements.append(
            Placement(
                f"default/{o.name}-0", "gpu", o.memory_gi * GI, f"default/{o.name}", uid=o.name, started_at=NOW - 3600
            )
        )
    return ClusterView.build(nodes=[Node("gpu", POOL, 128 * GI)], models=models, placements=placements)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_blocking_order(case: Case) -> None:
    decision = decide_scale(_view(case), "target", 1, NOW)
    assert decision.reason == "insufficient_memory"
    assert [b.model for b in decision.blocking] == case.order
    assert decision.retry_blocking == case.retry_blocking
    # The message lists them in the same order.
    listed = decision.message.split("; blocked by ", 1)[1]
    assert [listed.index(name + " ") for name in case.order] == sorted(listed.index(name + " ") for name in case.order)
