"""Leader election on a Lease: one leader, a dead leader replaced after the lease, a racing write loses."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest

from controller.leader import LeaderElector, LeaseTimings
from kubeview.api import ApiError as KubeError

pytestmark = pytest.mark.unit

PATH = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/ctl"


class FakeLeaseApi:
    """One Lease with resourceVersion conflicts, like the API server."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.fail = False
        self.lock = threading.Lock()

    def _check(self) -> None:
        if self.fail:
            raise KubeError(0, "Unreachable", "connection refused")

    def get(self, path: str, timeout: float | None = None) -> dict[str, Any] | None:
        self._check()
        return copy.deepcopy(self.lease)

    def create(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self._check()
        with self.lock:
            if self.lease is not None:
                raise KubeError(409, "AlreadyExists", 'leases.coordination.k8s.io "ctl" already exists')
            self.rv += 1
            self.lease = copy.deepcopy(body)
            self.lease["metadata"]["resourceVersion"] = str(self.rv)
            return copy.deepcopy(self.lease)

    def replace(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self._check()
        with self.lock:
            assert self.lease is not None
            if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
                raise KubeError(409, "Conflict", "the object has been modified")
            self.rv += 1
            self.lease = copy.deepcopy(body)
            self.lease["metadata"]["resourceVersion"] = str(self.rv)
            return copy.deepcopy(self.lease)

    @property
    def holder(self) -> str | None:
        return None if self.lease is None else self.lease["spec"].get("holderIdentity")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeLeaseApi, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(api, "ns", "ctl", identity, LeaseTimings(10, 7, 2), clock=clock, wall_clock=clock)  # type: ignore[arg-type]


def test_first_candidate_creates_the_lease_and_others_wait() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert api.holder == "a"
    assert api.lease["spec"]["leaseDurationSeconds"] == 10  # type: ignore[index]
    assert not b.try_acquire_or_renew()
    clock.now += 2
    assert a.try_acquire_or_renew()  # renewal
    assert not b.try_acquire_or_renew()
    assert api.lease["spec"]["leaseTransitions"] == 0  # type: ignore[index]


def test_dead_leader_is_replaced_only_after_the_lease_duration_on_the_candidates_clock() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b first sees the record now
    clock.now += 9.9  # a was SIGKILLed: no more renewals
    assert not b.try_acquire_or_renew()
    clock.now += 0.2
    assert b.try_acquire_or_renew()
    assert api.holder == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1  # type: ignore[index]


def test_two_candidates_racing_for_an_expired_lease_cannot_both_win() -> None:
    api, clock = FakeLeaseApi(), Clock()
    assert elector(api, "dead", clock).try_acquire_or_renew()
    b, c = elector(api, "b", clock), elector(api, "c", clock)
    assert not b.try_acquire_or_renew()
    assert not c.try_acquire_or_renew()
    clock.now += 11
    record_both_read = api.get(PATH)
    assert b.try_acquire_or_renew()
    # c read the expired record before b's write landed: its replace carries the old resourceVersion
    api.get = lambda path, timeout=None: copy.deepcopy(record_both_read)  # type: ignore[method-assign]
    assert not c.try_acquire_or_renew()
    assert api.holder == "b"


def test_released_lease_is_taken_at_once() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert api.holder == ""
    assert b.try_acquire_or_renew()


def test_leader_steps_down_when_it_cannot_renew() -> None:
    api = FakeLeaseApi()
    timings = LeaseTimings(lease_duration_seconds=0.6, renew_deadline_seconds=0.3, retry_period_seconds=0.05)
    a = LeaderElector(api, "ns", "ctl", "a", timings)  # type: ignore[arg-type]
    stop = threading.Event()
    events: list[str] = []
    started = threading.Event()
    stopped = threading.Event()

    def on_started() -> None:
        events.append("started")
        started.set()

    def on_stopped() -> None:
        events.append("stopped")
        stopped.set()

    t = threading.Thread(target=a.run, args=(on_started, on_stopped, stop), daemon=True)
    t.start()
    assert started.wait(2)
    assert a.leading
    api.fail = True  # the API server becomes unreachable
    assert stopped.wait(2)
    assert not a.leading
    api.fail = False
    started.clear()
    assert started.wait(3)  # campaigns again and wins (its own lease)
    stop.set()
    t.join(timeout=3)
    assert events == ["started", "stopped", "started", "stopped"]
    assert api.holder == ""  # released on a clean stop


def test_may_write_only_until_the_renew_deadline_after_the_last_renewal() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a = elector(api, "a", clock)
    assert not a.may_write(), "not leading yet"
    assert a.try_acquire_or_renew()
    a._leading.set()  # what run() does after winning
    clock.now += 6.9
    assert a.may_write() and a.write_seconds_left() == pytest.approx(0.1)
    api.fail = True
    assert not a.try_acquire_or_renew()
    clock.now += 0.1
    assert not a.may_write() and a.write_seconds_left() == 0
    api.fail = False
    assert not a.try_acquire_or_renew(), "past the deadline a leader steps down and campaigns again"
    assert not a.may_write()


def test_each_call_gets_only_the_time_left_before_the_deadline() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a = elector(api, "a", clock)
    assert a.try_acquire_or_renew()
    a._leading.set()
    timeouts: list[float | None] = []
    real_get = api.get

    def slow_get(path: str, timeout: float | None = None) -> dict[str, Any] | None:
        timeouts.append(timeout)
        clock.now += 2.5  # each call takes 2.5 s
        return real_get(path)

    api.get = slow_get  # type: ignore[method-assign]
    clock.now += 4
    assert a.try_acquire_or_renew()  # get ends at 6.5 s: the replace still has 0.5 s
    assert timeouts == [pytest.approx(3)]
    clock.now += 4  # renewed at 104 + 7 = 111; now 110.5
    assert not a.try_acquire_or_renew(), "the get ends past the deadline: no time for the replace"
    assert timeouts[-1] == pytest.approx(0.5)
    assert not a.may_write()


@pytest.mark.parametrize(
    "timings",
    [
        pytest.param((10, 10, 2), id="deadline-not-below-duration"),
        pytest.param((10, 7, 7), id="retry-not-below-deadline"),
        pytest.param((10, 7, 0), id="zero-retry"),
    ],
)
def test_bad_timings_rejected(timings: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="lease timings"):
        LeaseTimings(*timings)
