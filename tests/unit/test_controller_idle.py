"""Idle scale-to-zero: the budget's idle rule, and the exact moment to look again."""

from __future__ import annotations

from dataclasses import replace

import pytest

from budget import Model, Placement
from budget.decide import decide_scale
from budget.view import ClusterView, Node
from controller.idle import idle_for_seconds, idle_verdict

pytestmark = pytest.mark.unit

NOW = 10_000.0
KEY = "default/model-a"


def model(*, replicas: int = 1, cooldown: float = 600.0, last: float | None = None) -> Model:
    return Model("default", "model-a", 80 * 2**30, cooldown_seconds=cooldown, replicas=replicas, last_request_time=last)


def placement(started: float | None, model_key: str = KEY) -> Placement:
    return Placement("default/p", "n1", 80 * 2**30, model_key, uid="u", started_at=started)


@pytest.mark.parametrize(
    ("m", "placements", "awake", "scale", "recheck"),
    [
        pytest.param(model(last=NOW - 700), [], None, True, None, id="last-request-past-cooldown"),
        pytest.param(model(last=NOW - 100), [], None, False, 500.0, id="last-request-within-cooldown"),
        pytest.param(model(), [placement(NOW - 600)], None, True, None, id="no-request-replica-started-at-cooldown"),
        pytest.param(model(), [placement(NOW - 30)], None, False, 570.0, id="no-request-fresh-replica"),
        pytest.param(model(last=NOW - 900), [placement(NOW - 60)], None, False, 540.0, id="later-start-wins"),
        pytest.param(model(last=NOW - 60), [placement(NOW - 900)], None, False, 540.0, id="later-request-wins"),
        pytest.param(model(last=NOW - 9000), [], NOW - 10, False, 590.0, id="old-request-but-just-scaled-up-by-hand"),
        pytest.param(
            model(last=NOW - 9000), [placement(NOW - 700)], NOW - 10, True, None, id="awake-mark-ignored-once-started"
        ),
        pytest.param(model(), [], None, False, 600.0, id="nothing-known-yet"),
        pytest.param(model(cooldown=0, last=NOW - 1e6), [], None, False, None, id="cooldown-0-disables"),
        pytest.param(model(replicas=0, last=NOW - 1e6), [], None, False, None, id="already-zero"),
        pytest.param(
            model(), [placement(NOW - 30, "default/other")], None, False, 600.0, id="other-models-pods-ignored"
        ),
        pytest.param(model(cooldown=3, last=NOW - 3), [], None, True, None, id="exactly-at-cooldown"),
        pytest.param(
            replace(model(last=NOW - 1e6), min_replicas=1), [], None, False, None, id="min-replicas-kept-warm"
        ),
    ],
)
def test_idle_verdict(
    m: Model, placements: list[Placement], awake: float | None, scale: bool, recheck: float | None
) -> None:
    verdict = idle_verdict(m, placements, NOW, awake_since=awake)
    assert verdict.scale_to_zero is scale
    if recheck is None:
        assert verdict.recheck_in_seconds is None
    else:
        assert verdict.recheck_in_seconds == pytest.approx(recheck)


def test_idle_time_agrees_with_the_429_blocking_list() -> None:
    """The controller's idle clock and the proxy's `blocking[].idle_for` are one rule."""
    a = Model("default", "model-a", 80 * 2**30, cooldown_seconds=600, replicas=1, last_request_time=NOW - 120)
    b = Model("default", "model-b", 60 * 2**30, cooldown_seconds=600, replicas=0)
    view = ClusterView.build(
        nodes=[Node("n1", capacity_bytes=128 * 2**30)],
        models=[a, b],
        placements=[Placement("default/a-1", "n1", 80 * 2**30, "default/model-a", "u1", "Running", NOW - 3600)],
    )
    decision = decide_scale(view, "default/model-b", 1, NOW)
    assert not decision.allowed
    assert decision.blocking[0].idle_for_seconds == idle_for_seconds(a, view.placements, NOW) == 120
