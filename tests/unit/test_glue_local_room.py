"""`ibc local` making room: which idle models a request stops, what it tells the held client, and when it waits.

The proxy asks `can_make_room` before it answers 429 and `scale_up` then decides for real under the lock: both
must agree. Who may be stopped is the budget's rule (`budget.plan_eviction`, tests/unit/test_evict.py); these
tests hold the local scaler to acting on it: the victims' processes stopped (and only theirs), the note a held
streaming client gets, the eviction counted, the wait for memory another request's eviction is freeing.
"""

import logging
import threading

import pytest

from local.runtime import Phase
from proxy.scaler import ScaleDenied, ScalerUnavailable
from tests.unit.test_glue_local_state import OutlivingRuntime, make_scaler
from tests.unit.test_local_scaler import Clock
from tests.waiting import wait_until

pytestmark = pytest.mark.unit

GI = 2**30


class WatchedClock(Clock):
    """The test's clock, which also notes the threads that read it (a request reads it under the scaler's lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[str] = set()

    def __call__(self) -> float:
        self.readers.add(threading.current_thread().name)
        return self.now


class ExitingRuntime(OutlivingRuntime):
    """Processes exit as soon as they are stopped, unless the test holds them (`slow`: they ignore SIGTERM)."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.slow = False

    def stop(self, proc, *, grace_seconds=None):
        super().stop(proc, grace_seconds=grace_seconds)
        if not self.slow and proc.phase is Phase.STOPPING:
            self.exit(proc, 0)


def _model(name, memory, extra=None):
    command = f"serve {name} --port {{port}}"
    return {"name": name, "memory": memory, "cooldown": "10m", "command": command, **(extra or {})}


ROOM = {
    "nodes": [{"name": "shadow", "memory": "128Gi"}],
    "models": [
        _model("model-a", "80Gi", {"evict_idle_after": "60s"}),
        _model("model-b", "60Gi"),
        _model("model-c", "16Gi", {"evict_idle_after": "60s"}),
        _model("model-p", "80Gi", {"evict_idle_after": "60s", "pinned": True}),
        _model("model-h", "80Gi", {"evict_idle_after": "60s", "priority": 5}),
        _model("model-e", "16Gi", {"evict_idle_after": "60s"}),
        _model("model-g", "48Gi"),
        _model("model-f", "64Gi"),
    ],
}


def room_scaler(*, slow=False, config=ROOM):
    runtime = ExitingRuntime(WatchedClock())
    runtime.slow = slow
    return make_scaler(config, runtime)


def run_idle(scaler, runtime, names, idle_seconds):
    """Start and ready each model, then let `idle_seconds` pass; returns their processes by name."""
    procs = {}
    for name in names:
        scaler.scale_up(name, 1)
        procs[name] = runtime.spawned[-1]
        runtime.ready(procs[name])
    runtime.clock.now += idle_seconds
    return procs


def refused(blocker, idle):
    """The 429's message for model-b (60Gi) beside one 80Gi model that may not be stopped."""
    return f"model-b needs 60Gi in the whole cluster; 48Gi available; blocked by {blocker} (80Gi, idle {idle}s)"


def request_in_background(scaler, name, *, thread_name=None):
    """`scale_up(name, 1)` in a thread, as a held request would; returns the thread and its outcome ("started", or
    the message it was refused with), filled when it ends."""
    outcome = []

    def run():
        try:
            scaler.scale_up(name, 1)
            outcome.append("started")
        except (ScaleDenied, ScalerUnavailable) as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=run, name=thread_name, daemon=True)
    thread.start()
    return thread, outcome


MAKING_ROOM = [
    # (id, running (idle for `idle`), idle, busy: (model names serving a request, model keys held), request,
    #  the models stopped for it or, when none may be, the 429's message)
    ("idle-past-evict-after-is-stopped", ["model-a"], 61, ((), ()), "model-b", ["model-a"]),
    ("idle-exactly-evict-after-is-stopped", ["model-a"], 60, ((), ()), "model-b", ["model-a"]),
    ("idle-a-second-short-is-kept", ["model-a"], 59, ((), ()), "model-b", refused("model-a", 59)),
    ("serving-a-request-is-kept", ["model-a"], 61, (["model-a"], ()), "model-b", refused("model-a", 61)),
    (
        "holding-a-request-for-its-start-is-kept",
        ["model-a"],
        61,
        ((), ["local/model-a"]),
        "model-b",
        refused("model-a", 61),
    ),
    (
        "another-model-busy-does-not-shield-it",
        ["model-a", "model-c"],
        61,
        (["model-c"], ["local/model-e"]),
        "model-b",
        ["model-a"],
    ),
    ("pinned-is-kept", ["model-p"], 61, ((), ()), "model-b", refused("model-p", 61)),
    ("higher-priority-is-kept", ["model-h"], 61, ((), ()), "model-b", refused("model-h", 61)),
    (
        "two-small-ones-for-one-large",
        ["model-c", "model-e", "model-g"],
        61,
        ((), ()),
        "model-a",
        ["model-c", "model-e"],
    ),
]


@pytest.mark.parametrize(
    "running, idle, busy, wanted, outcome", [c[1:] for c in MAKING_ROOM], ids=[c[0] for c in MAKING_ROOM]
)
def test_a_request_that_does_not_fit_stops_idle_models_the_policy_allows(running, idle, busy, wanted, outcome, caplog):
    scaler, runtime = room_scaler()
    procs = run_idle(scaler, runtime, running, idle)
    serving, held = busy
    urls = [procs[name].spec.base_url for name in serving]
    scaler.set_busy_source(lambda: (urls, held))
    before = len(runtime.spawned)
    if isinstance(outcome, str):
        assert scaler.can_make_room(wanted, 1) is False
        with pytest.raises(ScaleDenied) as info, caplog.at_level(logging.INFO, logger="local.scaler"):
            scaler.scale_up(wanted, 1)
        assert info.value.decision.message == outcome
        assert [r.getMessage() for r in caplog.records] == [f"denied {wanted}: {outcome}"]
        assert runtime.stopped == [] and len(runtime.spawned) == before
        assert scaler.note(wanted) is None
        assert scaler.evictions.snapshot() == {}
        return
    assert scaler.can_make_room(wanted, 1) is True
    assert runtime.stopped == []  # asking is not doing
    scaler.scale_up(wanted, 1)
    assert [p.spec.name for p in runtime.stopped] == outcome
    assert [p.spec.name for p in runtime.spawned[before:]] == [wanted]
    assert scaler.state(wanted) == "starting"
    assert scaler.evictions.snapshot() == {(name, wanted): 1 for name in outcome}
    stopped = ", ".join(f"{name} ({'80Gi' if name == 'model-a' else '16Gi'}, idle {idle}s)" for name in outcome)
    assert scaler.note(wanted) == f"stopping {stopped} to make room for {wanted}"


def test_a_start_that_fits_needs_no_room():
    scaler, runtime = room_scaler()
    run_idle(scaler, runtime, ["model-a"], 61)
    assert scaler.can_make_room("model-c", 1) is False  # it fits as it is: nothing to stop
    scaler.scale_up("model-c", 1)
    assert runtime.stopped == [] and scaler.note("model-c") is None


def test_every_replica_of_the_victim_is_stopped_and_logged_with_what_it_frees(caplog):
    config = {
        "nodes": [{"name": "shadow", "memory": "128Gi"}],
        "models": [_model("model-c", "16Gi", {"evict_idle_after": "60s"}), _model("model-b", "120Gi")],
    }
    scaler, runtime = room_scaler(config=config)
    scaler.scale_up("model-c", 2)
    for proc in runtime.spawned:
        runtime.ready(proc)
    runtime.clock.now += 90
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        scaler.scale_up("model-b", 1)
    assert runtime.stopped == runtime.spawned[:2]
    assert [p.spec.name for p in runtime.live()] == ["model-b"]
    assert [r.getMessage() for r in caplog.records] == [
        "stopping model-c (32Gi, idle 90s) to make room for model-b",
        "model-c idle for 90s, evicted to make room for model-b: stopping it to free 32Gi",
    ]


def test_the_note_is_forgotten_when_the_next_start_needs_no_room():
    scaler, runtime = room_scaler()
    run_idle(scaler, runtime, ["model-a"], 61)
    scaler.scale_up("model-b", 1)
    assert scaler.note("model-b") == "stopping model-a (80Gi, idle 61s) to make room for model-b"
    (b,) = runtime.live()
    runtime.stop(b)  # model-b goes; the next start of it fits without stopping anyone
    scaler.scale_up("model-b", 1)
    assert scaler.note("model-b") is None
    assert scaler.evictions.snapshot() == {("model-a", "model-b"): 1}


def test_a_second_request_waits_for_the_memory_an_eviction_is_freeing():
    scaler, runtime = room_scaler(slow=True)
    procs = run_idle(scaler, runtime, ["model-a"], 61)
    first, first_outcome = request_in_background(scaler, "model-b")
    wait_until(lambda: runtime.stopped, message="model-a asked to stop for model-b")
    # model-a (80Gi) is stopping, model-b's 60Gi is promised: model-c's 16Gi fits once model-a has exited.
    assert scaler.can_make_room("model-c", 1) is True
    assert scaler.can_make_room("model-h", 1) is False  # 80Gi would not fit beside model-b even then
    with pytest.raises(ScaleDenied):
        scaler.scale_up("model-h", 1)  # so it is refused at once, not after a wait
    beside = []  # model-a's phase when each start is forked: its memory must be free by then
    runtime.on_spawn = lambda proc: beside.append((proc.spec.name, procs["model-a"].phase))
    waiter, outcome = request_in_background(scaler, "model-c", thread_name="second")
    wait_until(lambda: "second" in runtime.clock.readers, message="the second request deciding")
    # The exit's callback takes the scaler's lock: it runs once the second request waits (or has answered).
    runtime.exit(procs["model-a"], 0)  # the memory is free now: both starts go ahead
    first.join(5)
    waiter.join(5)
    assert (first_outcome, outcome) == (["started"], ["started"])
    assert sorted(p.spec.name for p in runtime.live()) == ["model-b", "model-c"]
    assert sorted(beside) == [("model-b", Phase.EXITED), ("model-c", Phase.EXITED)]


def test_a_second_request_waits_for_freed_memory_no_longer_than_the_victims_may_take(monkeypatch):
    monkeypatch.setattr("local.scaler.STOP_REAP_MARGIN_SECONDS", 0.2)
    config = {**ROOM, "models": [dict(m, stop_grace_period="0s") for m in ROOM["models"]]}
    scaler, runtime = room_scaler(slow=True, config=config)
    run_idle(scaler, runtime, ["model-a"], 61)
    first, first_outcome = request_in_background(scaler, "model-b")
    wait_until(lambda: runtime.stopped, message="model-a asked to stop for model-b")
    assert scaler.can_make_room("model-f", 1) is True  # it would fit once model-a has exited: so it waits
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-f", 1)  # model-a never exits: refused once its 0.2 s are over, not held for ever
    assert info.value.decision.reason == "insufficient_memory"
    first.join(5)
    assert first_outcome == ["the models stopped to make room for model-b did not exit in time"]
    assert [p.spec.name for p in runtime.spawned] == ["model-a"]


def test_a_model_restarting_beside_its_own_stopping_replica_makes_room_for_both():
    config = {
        "nodes": [{"name": "shadow", "memory": "128Gi"}],
        "models": [_model("model-a", "80Gi", {"evict_idle_after": "60s"}), _model("model-b", "40Gi")],
    }
    scaler, runtime = room_scaler(slow=True, config=config)
    procs = run_idle(scaler, runtime, ["model-a", "model-b"], 61)
    runtime.stop(procs["model-b"])  # still exiting: its 40Gi are held
    thread, outcome = request_in_background(scaler, "model-b")
    wait_until(lambda: procs["model-a"] in runtime.stopped, message="model-a stopped for model-b's new replica")
    runtime.exit(procs["model-a"], 0)
    thread.join(5)
    assert outcome == ["started"]
    assert scaler.note("model-b") == "stopping model-a (80Gi, idle 61s) to make room for model-b"
    assert [(p.spec.name, p.phase) for p in runtime.spawned] == [
        ("model-a", Phase.EXITED),
        ("model-b", Phase.STOPPING),
        ("model-b", Phase.STARTING),
    ]


def test_memory_a_cooldown_is_freeing_is_not_waited_for():
    scaler, runtime = room_scaler(slow=True)
    procs = run_idle(scaler, runtime, ["model-b"], 0)
    runtime.clock.now += 600
    assert scaler.stop_idle() == ["model-b"]
    assert procs["model-b"].phase is Phase.STOPPING
    assert scaler.can_make_room("model-a", 1) is False
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-a", 1)
    assert info.value.decision.reason == "insufficient_memory"


def test_victims_that_do_not_exit_in_time_give_the_memory_back(monkeypatch):
    monkeypatch.setattr("local.scaler.STOP_REAP_MARGIN_SECONDS", 0.2)
    config = {**ROOM, "models": [dict(m, stop_grace_period="0s") for m in ROOM["models"]]}
    scaler, runtime = room_scaler(slow=True, config=config)
    run_idle(scaler, runtime, ["model-a"], 61)
    with pytest.raises(ScalerUnavailable) as info:
        scaler.scale_up("model-b", 1)
    assert str(info.value) == "the models stopped to make room for model-b did not exit in time"
    assert scaler.state("model-b") == "stopped"
    assert [(p.model, p.state) for p in scaler.view().placements] == [("local/model-a", "stopping")]
    assert [p.spec.name for p in runtime.spawned] == ["model-a"]


def test_closing_while_victims_exit_ends_the_wait_at_once():
    scaler, runtime = room_scaler(slow=True)
    run_idle(scaler, runtime, ["model-a"], 61)
    thread, outcome = request_in_background(scaler, "model-b")
    wait_until(lambda: runtime.stopped, message="model-a asked to stop")
    scaler.close(timeout_seconds=0)
    thread.join(10)  # the victims' own wait is 35 s (grace period and reaping): not that
    assert not thread.is_alive()
    assert outcome == ["the models stopped to make room for model-b did not exit in time"]
    assert scaler.state("model-b") == "stopped"
