"""The load layer's rule: how many replicas the traffic needs, from per-replica signals (a table)."""

from dataclasses import dataclass, field

import pytest

from budget.load import LoadDecision, LoadState, LoadTuning, ReplicaSignals, desired_replicas, load, saturated, waiting

pytestmark = pytest.mark.unit

NOW = 1_000.0
NO_WINDOWS = LoadTuning(scale_up_window_seconds=0.0, scale_down_window_seconds=0.0)
CONC4 = LoadTuning(concurrency=4, scale_up_window_seconds=0.0, scale_down_window_seconds=0.0)


def r(
    in_flight: int = 0,
    *,
    waiting: int | None = None,
    running: int | None = None,
    kv: float | None = None,
    starting: bool = False,
) -> ReplicaSignals:
    return ReplicaSignals("http://127.0.0.1:1", in_flight, waiting, running, kv, starting)


@dataclass(frozen=True)
class Case:
    signals: list[ReplicaSignals]
    current: int
    want: int
    direction: str
    min_replicas: int = 0
    max_replicas: int = 3
    tuning: LoadTuning = NO_WINDOWS
    state: LoadState = field(default_factory=LoadState)
    reason: str = ""


CASES = {
    # -- saturation: KV >= 0.8 or waiting >= 5 (defaults) --
    "kv at threshold saturates": Case([r(kv=0.8)], 1, 2, "up"),
    "kv under threshold, spare under margin": Case([r(kv=0.7)], 1, 2, "up"),  # load 0.875, spare 0.125
    "kv with spare over margin holds": Case([r(kv=0.4)], 1, 1, "hold"),  # load 0.5
    "kv just keeps the margin": Case([r(kv=0.64)], 1, 1, "hold"),  # load 0.8, spare 0.2 == margin
    "waiting at threshold saturates": Case([r(waiting=5)], 1, 2, "up"),
    "waiting 4 is load 0.8, spare 0.2": Case([r(waiting=4)], 1, 1, "hold"),
    "waiting 5 on one of two, other idle": Case([r(waiting=5), r()], 2, 2, "hold"),  # spare of the idle one is 1
    "both saturated": Case([r(kv=0.9), r(waiting=7)], 2, 3, "up"),
    "no signal at all holds": Case([r(in_flight=50)], 1, 1, "hold"),
    # -- the proxy's in-flight count against the replica's concurrency --
    "in flight under concurrency": Case([r(2)], 1, 1, "hold", tuning=CONC4),  # load 0.5
    "in flight at concurrency": Case([r(4)], 1, 2, "up", tuning=CONC4),  # load 1.0, spare 0
    "in flight 9 of 4 is 5 waiting": Case([r(9)], 1, 2, "up", tuning=CONC4),
    "backend's own queue wins over the estimate": Case([r(9, waiting=0, running=2)], 1, 1, "hold", tuning=CONC4),
    "backend running at concurrency is full": Case([r(0, waiting=0, running=4)], 1, 2, "up", tuning=CONC4),
    # -- bounds --
    "at max it holds": Case([r(kv=0.95)] * 3, 3, 3, "hold", max_replicas=3, reason="at maxReplicas 3"),
    "max 1 (the default) never adds": Case([r(waiting=9)], 1, 1, "hold", max_replicas=1),
    "over max steps to max": Case([r()], 4, 3, "down", max_replicas=3),
    "under min starts the warm ones": Case([], 0, 2, "up", min_replicas=2, reason="kept warm: minReplicas is 2"),
    "zero stays zero (a request starts it)": Case([], 0, 0, "hold"),
    # -- starting replicas --
    "never steps while a replica starts": Case([r(waiting=9), r(starting=True)], 2, 2, "hold", reason="starting"),
    "a promised replica not reporting yet": Case([r(waiting=9)], 2, 2, "hold", reason="starting"),
    "a starting one does not block scale down either": Case([r(), r(starting=True)], 2, 2, "hold"),
    # -- scale down: only when N-1 keep the margin --
    "idle pair steps down": Case([r(), r()], 2, 1, "down"),
    "never below one by load": Case([r()], 1, 1, "hold"),
    "never below min": Case([r(), r()], 2, 2, "hold", min_replicas=2),
    "load spread over fewer keeps margin": Case([r(kv=0.32), r(kv=0.32)], 2, 1, "down"),  # 0.4+0.4 = 0.8
    "load spread over fewer breaks margin": Case([r(kv=0.4), r(kv=0.4)], 2, 2, "hold"),  # 0.5+0.5 = 1.0
    "three to two": Case([r(2), r(2), r(1)], 3, 2, "down", tuning=CONC4),  # (0.5+0.5+0.25)/2 = 0.625
    "three hold": Case([r(3), r(2), r(2)], 3, 3, "hold", tuning=CONC4),  # 7/4 over 2 = 0.875
    # -- stabilization windows --
    "pressure starts the window": Case(
        [r(kv=0.9)], 1, 1, "hold", tuning=LoadTuning(scale_up_window_seconds=5.0), reason="window"
    ),
    "pressure inside the window holds": Case(
        [r(kv=0.9)], 1, 1, "hold", tuning=LoadTuning(scale_up_window_seconds=5.0), state=LoadState(NOW - 4.9)
    ),
    "pressure past the window steps": Case(
        [r(kv=0.9)], 1, 2, "up", tuning=LoadTuning(scale_up_window_seconds=5.0), state=LoadState(NOW - 5.0)
    ),
    "slack inside the window holds": Case(
        [r(), r()], 2, 2, "hold", tuning=LoadTuning(scale_down_window_seconds=60.0), state=LoadState(None, NOW - 59)
    ),
    "slack past the window steps": Case(
        [r(), r()], 2, 1, "down", tuning=LoadTuning(scale_down_window_seconds=60.0), state=LoadState(None, NOW - 60)
    ),
    "pressure ends the slack window": Case([r(kv=0.9), r(kv=0.9)], 2, 3, "up", state=LoadState(None, NOW - 100)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_desired_replicas(case: Case) -> None:
    got = desired_replicas(
        case.signals,
        current=case.current,
        min_replicas=case.min_replicas,
        max_replicas=case.max_replicas,
        tuning=case.tuning,
        state=case.state,
        now=NOW,
    )
    assert (got.desired, got.direction) == (case.want, case.direction), got.reason
    assert case.reason in got.reason


STATES = {
    # what the caller keeps for next time
    "pressure remembered from its first sight": (
        [r(kv=0.9)],
        1,
        LoadTuning(scale_up_window_seconds=5.0),
        LoadState(),
        LoadState(NOW, None),
    ),
    "pressure kept, not restarted": (
        [r(kv=0.9)],
        1,
        LoadTuning(scale_up_window_seconds=5.0),
        LoadState(NOW - 2),
        LoadState(NOW - 2, None),
    ),
    "slack remembered": ([r(), r()], 2, LoadTuning(), LoadState(), LoadState(None, NOW)),
    "slack kept": ([r(), r()], 2, LoadTuning(), LoadState(None, NOW - 3), LoadState(None, NOW - 3)),
    "neither: both forgotten": ([r(kv=0.4)], 1, LoadTuning(), LoadState(NOW - 3, NOW - 3), LoadState()),
    "a step forgets": ([r(kv=0.9)], 1, NO_WINDOWS, LoadState(NOW - 3), LoadState()),
}


@pytest.mark.parametrize(("signals", "current", "tuning", "before", "after"), STATES.values(), ids=STATES.keys())
def test_state_carried(
    signals: list[ReplicaSignals], current: int, tuning: LoadTuning, before: LoadState, after: LoadState
) -> None:
    got = desired_replicas(
        signals, current=current, min_replicas=0, max_replicas=3, tuning=tuning, state=before, now=NOW
    )
    assert got.state == after


SIGNALS = {
    "nothing known": (r(3), LoadTuning(), None, 0.0, False),
    "kv only": (r(kv=0.4), LoadTuning(), None, 0.5, False),
    "kv threshold per model": (r(kv=0.5), LoadTuning(kv_saturation=0.5), None, 1.0, True),
    "queue only": (r(waiting=2), LoadTuning(), 2, 0.4, False),
    "queue threshold per model": (r(waiting=2), LoadTuning(waiting_saturation=2), 2, 1.0, True),
    "estimated queue": (r(6), LoadTuning(concurrency=4), 2, 1.4, False),
    "estimated queue is never negative": (r(1), LoadTuning(concurrency=4), 0, 0.25, False),
    "running counted from the backend": (r(1, running=3), LoadTuning(concurrency=4), 0, 0.75, False),
    "running capped at concurrency": (r(0, running=8, waiting=0), LoadTuning(concurrency=4), 0, 1.0, False),
    "the largest term wins": (r(waiting=1, kv=0.72), LoadTuning(), 1, 0.9, False),
}


@pytest.mark.parametrize(("signal", "tuning", "queue", "fullness", "full"), SIGNALS.values(), ids=SIGNALS.keys())
def test_signals(signal: ReplicaSignals, tuning: LoadTuning, queue: int | None, fullness: float, full: bool) -> None:
    assert waiting(signal, tuning) == queue
    assert load(signal, tuning) == pytest.approx(fullness)
    assert saturated(signal, tuning) is full


def test_decision_reports_saturation_and_spare() -> None:
    got: LoadDecision = desired_replicas(
        [r(kv=0.9), r(kv=0.4)], current=2, min_replicas=0, max_replicas=3, tuning=NO_WINDOWS, state=LoadState(), now=NOW
    )
    assert (got.saturated, got.spare) == (1, pytest.approx(0.5))
    assert got.direction == "hold"


UP5 = LoadTuning(scale_up_window_seconds=5.0, scale_down_window_seconds=60.0)
WHOLE = {
    # every way out of the rule, the whole decision: what the log, /v1/models and the next pass read
    "warm": ([], 0, 2, UP5, LoadState(), LoadDecision(2, "up", "kept warm: minReplicas is 2", LoadState(), 0, 1.0)),
    "over max": ([r()] * 4, 4, 0, UP5, LoadState(), LoadDecision(3, "down", "maxReplicas is 3", LoadState(), 0, 1.0)),
    "zero": ([], 0, 0, UP5, LoadState(NOW), LoadDecision(0, "hold", "no replica: a request starts one", LoadState())),
    "starting": (
        [r(), r(starting=True)],
        2,
        0,
        UP5,
        LoadState(NOW),
        LoadDecision(2, "hold", "a replica is starting", LoadState()),
    ),
    "at max, all saturated": (
        [r(kv=0.9)] * 3,
        3,
        0,
        UP5,
        LoadState(NOW - 9),
        LoadDecision(3, "hold", "3 of 3 saturated, spare 0.00; at maxReplicas 3", LoadState(), 3, 0.0),
    ),
    "window": (
        [r(kv=0.9), r(kv=0.72)],
        2,
        0,
        UP5,
        LoadState(NOW - 1),
        LoadDecision(2, "hold", "1 of 2 saturated, spare 0.10; waiting out the window", LoadState(NOW - 1), 1, 0.1),
    ),
    "up": (
        [r(kv=0.9), r(kv=0.72)],
        2,
        0,
        UP5,
        LoadState(NOW - 5),
        LoadDecision(3, "up", "1 of 2 saturated, spare 0.10 (margin 0.20)", LoadState(), 1, 0.1),
    ),
    "slack window": (
        [r(waiting=1), r()],
        2,
        0,
        UP5,
        LoadState(None, NOW - 1),
        LoadDecision(
            2, "hold", "0 of 2 saturated, spare 0.90; slack, waiting out the window", LoadState(None, NOW - 1), 0, 0.9
        ),
    ),
    "down": (
        [r(waiting=1)] * 3,
        3,
        0,
        UP5,
        LoadState(None, NOW - 60),
        LoadDecision(2, "down", "0 of 3 saturated, spare 0.80; 2 keep the margin", LoadState(), 0, 0.8),
    ),
    "hold": (
        [r(waiting=2)],
        1,
        0,
        UP5,
        LoadState(NOW - 3, NOW - 3),
        LoadDecision(1, "hold", "0 of 1 saturated, spare 0.60", LoadState(), 0, 0.6),
    ),
}


@pytest.mark.parametrize(("signals", "current", "low", "tuning", "state", "want"), WHOLE.values(), ids=WHOLE.keys())
def test_whole_decision(
    signals: list[ReplicaSignals], current: int, low: int, tuning: LoadTuning, state: LoadState, want: LoadDecision
) -> None:
    got = desired_replicas(
        signals, current=current, min_replicas=low, max_replicas=3, tuning=tuning, state=state, now=NOW
    )
    assert got.reason == want.reason
    assert got == LoadDecision(
        want.desired, want.direction, want.reason, want.state, want.saturated, pytest.approx(want.spare)
    )


EDGES = {
    # a replica past its concurrency but not saturated has no spare, not negative spare (1.8 counts as 1.0)
    "overfull is capped at full": ([r(8), r(2)], 2, CONC4, 2, "hold"),  # (1.0 + 0.5) / 2 = 0.75
    "all saturated is no spare, not less": ([r(kv=0.9)], 1, NO_WINDOWS, 2, "up"),
    "exactly the margin over fewer steps down": ([r(waiting=2), r(waiting=2)], 2, NO_WINDOWS, 1, "down"),  # 0.8 <= 0.8
    "a hair over the margin over fewer holds": ([r(waiting=2), r(waiting=2, kv=0.33)], 2, NO_WINDOWS, 2, "hold"),
}


@pytest.mark.parametrize(("signals", "current", "tuning", "want", "direction"), EDGES.values(), ids=EDGES.keys())
def test_edges(signals: list[ReplicaSignals], current: int, tuning: LoadTuning, want: int, direction: str) -> None:
    got = desired_replicas(
        signals, current=current, min_replicas=0, max_replicas=3, tuning=tuning, state=LoadState(), now=NOW
    )
    assert (got.desired, got.direction) == (want, direction), got.reason
