"""The delay queue: a model wakes up exactly at its cooldown's end, and never runs twice at once."""

from __future__ import annotations

import threading
import time

import pytest

from controller.queue import WorkQueue

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delayed_key_is_due_only_at_its_time() -> None:
    clock = Clock()
    q = WorkQueue(clock)
    q.add("ns/a", 600)
    assert q.get(timeout=0) is None
    clock.now += 599.9
    assert q.get(timeout=0) is None
    clock.now += 0.1
    assert q.get(timeout=0) == "ns/a"


@pytest.mark.parametrize(
    ("delays", "due_in"),
    [
        pytest.param([600, 10], 10, id="earlier-wins"),
        pytest.param([10, 600], 10, id="later-ignored"),
        pytest.param([600, 0], 0, id="event-now-beats-cooldown"),
    ],
)
def test_one_entry_per_key_earliest_due(delays: list[float], due_in: float) -> None:
    clock = Clock()
    q = WorkQueue(clock)
    for d in delays:
        q.add("k", d)
    assert len(q) == 1
    assert q.due_in("k") == pytest.approx(due_in)


def test_key_in_progress_is_not_handed_out_again_until_done() -> None:
    clock = Clock()
    q = WorkQueue(clock)
    q.add("k")
    assert q.get(timeout=0) == "k"
    q.add("k")  # an event arrives while a worker reconciles k
    assert q.get(timeout=0) is None
    q.done("k")
    assert q.get(timeout=0) == "k"
    q.done("k")
    assert q.get(timeout=0) is None


def test_backoff_doubles_and_resets() -> None:
    clock = Clock()
    q = WorkQueue(clock)
    assert [q.add_rate_limited("k", 1, 8) for _ in range(5)] == [1, 2, 4, 8, 8]
    q.forget("k")
    assert q.add_rate_limited("k", 1, 8) == 1


def test_blocking_get_wakes_at_the_due_time() -> None:
    q = WorkQueue()
    q.add("k", 0.2)
    t0 = time.monotonic()
    assert q.get(timeout=5) == "k"
    assert 0.15 <= time.monotonic() - t0 < 1.0


def test_shutdown_releases_waiting_workers() -> None:
    q = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.shutdown()
    t.join(timeout=2)
    assert got == [None]
