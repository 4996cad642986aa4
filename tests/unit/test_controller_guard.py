"""Never fight another writer in a loop, and never re-apply what the API server merely normalized."""

from __future__ import annotations

import pytest

from controller.guard import FightGuard, digest

pytestmark = pytest.mark.unit


def test_first_apply_and_changed_config_write() -> None:
    g = FightGuard()
    assert g.check("d", "v1", None, 0).write
    g.applied("d", "v1", 2)
    assert g.check("d", "v2", 2, 1).write  # the model changed


def test_normalized_value_is_not_reapplied() -> None:
    g = FightGuard()
    g.applied("d", "v1", 2)
    verdict = g.check("d", "v1", 2, 10)  # contains() failed but nobody touched the spec (generation 2)
    assert not verdict.write and verdict.hold_seconds == 0


def test_repeated_reverts_back_off_exponentially_then_try_again() -> None:
    g = FightGuard(window_seconds=300, max_reverts=3, hold_seconds=60, max_hold_seconds=900)
    g.applied("d", "v1", 1)
    now, generation, log = 0.0, 1, []
    for _ in range(8):
        generation += 1  # someone else changed the spec again
        v = g.check("d", "v1", generation, now)
        log.append((v.write, v.hold_seconds))
        if v.write:
            generation += 1
            g.applied("d", "v1", generation)
        now += v.hold_seconds or 1
    assert log[:3] == [(True, 0), (True, 0), (True, 0)]  # a person's one-off change is undone at once
    assert log[3] == (False, 60)  # then the controller steps back and says so
    assert log[4] == (True, 0)  # one more try after the hold
    assert log[5] == (False, 120)  # losing again doubles the hold


def test_digest_is_order_independent() -> None:
    assert digest({"a": 1, "b": {"c": 2}}) == digest({"b": {"c": 2}, "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
