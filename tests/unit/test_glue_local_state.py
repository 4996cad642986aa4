"""What `ibc local` says about a model while its processes come and go: its state, the wait for a backend, the 503.

These are the words `/v1/models`, `/status` and a held request see (`state`, `wait_backends`), and the view the
budget decides on (every live process and every start in flight, as placements). A fake runtime stands in for
processes (tests/unit/test_local_scaler.py); each case drives the phases by hand.
"""

import time

import pytest

from budget import Placement
from local.config import parse_config
from local.scaler import LocalScaler
from proxy.scaler import ScaleDenied, ScalerUnavailable
from tests.unit.test_local_scaler import SEED, T0, Clock, FakeRuntime

pytestmark = pytest.mark.unit

GI = 2**30


class OutlivingRuntime(FakeRuntime):
    """Processes that outlive the scaler's close (still exiting when it returns): the test ends them."""

    def shutdown(self, timeout_seconds=None):
        pass


def refusal(call, *args):
    """The 503 a call ends in: its message and Retry-After."""
    with pytest.raises(ScalerUnavailable) as info:
        call(*args)
    return str(info.value), info.value.retry_after_seconds


def make_scaler(config=SEED, runtime=None, **kwargs):
    """A scaler over the fake runtime; ports 20000, 20001, ... in the order processes are spawned."""
    runtime = runtime or FakeRuntime(Clock())
    ports = iter(range(20000, 30000))
    scaler = LocalScaler(
        parse_config(config), runtime=runtime, clock=runtime.clock, port_picker=lambda: next(ports), **kwargs
    )
    return scaler, runtime


def put_in_phases(runtime, procs, phases):
    """Move each process to its phase: starting, ready, stopping, gone (stopped, exited), failed (exited while
    starting), crashed (exited after serving)."""
    for proc, phase in zip(procs, phases, strict=True):
        if phase in ("ready", "stopping", "gone", "crashed"):
            runtime.ready(proc)
        if phase in ("stopping", "gone"):
            runtime.stop(proc)
        if phase == "gone":
            runtime.exit(proc, 0)
        if phase == "failed":
            runtime.exit(proc, 1, failure="exited with code 1: CUDA out of memory")
        if phase == "crashed":
            runtime.exit(proc, -9, failure="was killed by SIGKILL")


STATES = [
    ("never-started", (), "stopped"),
    ("starting", ("starting",), "starting"),
    ("ready", ("ready",), "ready"),
    ("stopping-still-holds-its-memory", ("stopping",), "stopping"),
    ("stopped-and-exited", ("gone",), "stopped"),
    ("failed-to-start", ("failed",), "failed"),
    ("crashed-after-serving", ("crashed",), "failed"),
    ("ready-beside-a-stopping-one", ("stopping", "ready"), "ready"),
    ("ready-beside-a-starting-one", ("starting", "ready"), "ready"),
    ("starting-beside-a-stopping-one", ("stopping", "starting"), "starting"),
    ("stopping-beside-a-failed-start", ("stopping", "failed"), "stopping"),
    ("starting-beside-a-failed-start", ("starting", "failed"), "starting"),
    ("ready-beside-a-crash", ("ready", "crashed"), "ready"),
]


@pytest.mark.parametrize("phases, state", [c[1:] for c in STATES], ids=[c[0] for c in STATES])
def test_the_state_a_model_is_shown_in(phases, state):
    scaler, runtime = make_scaler()
    if phases:
        scaler.scale_up("model-c", len(phases))
    put_in_phases(runtime, runtime.spawned, phases)
    assert scaler.state("model-c") == state
    assert scaler.memory("model-c").state == state
    assert scaler.state("model-a") == "stopped"  # another model's processes are not this one's


def test_a_start_being_forked_is_starting_already():
    scaler, runtime = make_scaler()
    seen = []
    runtime.on_spawn = lambda _proc: seen.append(scaler.state("model-a"))
    scaler.scale_up("model-a", 1)
    assert seen == ["starting"]


WAITS = [
    # (id, phases of model-c's processes, how the wait ends: URLs or the 503's message and Retry-After)
    ("one-ready", ("ready",), ["http://127.0.0.1:20000"]),
    ("two-ready-in-start-order", ("ready", "ready"), ["http://127.0.0.1:20000", "http://127.0.0.1:20001"]),
    ("ready-beside-a-stopping-one", ("stopping", "ready"), ["http://127.0.0.1:20001"]),
    ("still-starting-the-caller-loops", ("starting",), []),
    ("starting-beside-a-failed-start", ("starting", "failed"), []),
    ("nothing-running-nothing-failed", (), []),
    ("failed-to-start", ("failed",), ("exited with code 1: CUDA out of memory (next start attempt in 10s)", 10)),
    ("crashed-after-serving-no-backoff", ("crashed",), ("was killed by SIGKILL", None)),
    ("only-a-stopping-one", ("stopping",), []),
]


@pytest.mark.parametrize("phases, outcome", [c[1:] for c in WAITS], ids=[c[0] for c in WAITS])
def test_waiting_for_a_backend(phases, outcome):
    scaler, runtime = make_scaler()
    if phases:
        scaler.scale_up("model-c", len(phases))
    put_in_phases(runtime, runtime.spawned, phases)
    if isinstance(outcome, list):
        assert scaler.wait_backends("model-c", 0) == outcome
        assert scaler.wait_backends("model-c", -5) == outcome  # a deadline already past: no wait, no error
        return
    assert refusal(scaler.wait_backends, "model-c", 0) == outcome


def test_a_start_stopped_by_hand_ends_the_wait_with_that_reason():
    scaler, runtime = make_scaler()
    scaler.scale_up("model-a", 1)
    assert scaler.stop_model("model-a") == 1
    assert refusal(scaler.wait_backends, "model-a", 5) == ("model-a was stopped by hand while it started", None)
    # A request starts it again: the wait is for the new process, no longer "stopped by hand".
    runtime.exit(runtime.spawned[0], 0)
    scaler.scale_up("model-a", 1)
    assert scaler.wait_backends("model-a", 0) == []
    runtime.ready(runtime.spawned[-1])
    assert scaler.wait_backends("model-a", 0) == ["http://127.0.0.1:20001"]


def test_a_failure_is_named_before_a_stop_by_hand():
    scaler, runtime = make_scaler()
    scaler.scale_up("model-a", 1)
    scaler.stop_model("model-a")
    runtime.exit(runtime.spawned[0], 1, failure="exited with code 1: bad flag")
    assert refusal(scaler.wait_backends, "model-a", 5) == (
        "exited with code 1: bad flag (next start attempt in 10s)",
        10,
    )


def test_shutting_down_ends_the_wait():
    scaler, _ = make_scaler(runtime=OutlivingRuntime(Clock()))
    scaler.scale_up("model-a", 1)
    scaler.close()  # the start is still in flight
    assert refusal(scaler.wait_backends, "model-a", 5) == ("ibc local is shutting down", None)


UNAVAILABLE = [
    # (id, seconds after the failure, message, Retry-After)
    ("at-once", 0, "exited with code 1: CUDA out of memory (next start attempt in 10s)", 10),
    ("a-fraction-rounds-up", 0.2, "exited with code 1: CUDA out of memory (next start attempt in 10s)", 10),
    ("one-second-left", 9, "exited with code 1: CUDA out of memory (next start attempt in 1s)", 1),
    ("under-a-second-left-is-1s", 9.9, "exited with code 1: CUDA out of memory (next start attempt in 1s)", 1),
    ("backoff-over-no-retry-after", 10, "exited with code 1: CUDA out of memory", None),
    ("long-after", 3600, "exited with code 1: CUDA out of memory", None),
]


@pytest.mark.parametrize("later, message, retry_after", [c[1:] for c in UNAVAILABLE], ids=[c[0] for c in UNAVAILABLE])
def test_the_503_after_a_failed_start(later, message, retry_after):
    scaler, runtime = make_scaler()
    scaler.scale_up("model-a", 1)
    runtime.exit(runtime.spawned[0], 1, failure="exited with code 1: CUDA out of memory")
    runtime.clock.now += later
    assert refusal(scaler.wait_backends, "model-a", 0) == (message, retry_after)


class FirstSpawnFails(FakeRuntime):
    """The first spawn fails (the command cannot run yet); every later one works."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.attempts = 0

    def spawn(self, spec):
        self.attempts += 1
        self.fail_spawn = "Text file busy" if self.attempts == 1 else None
        return super().spawn(spec)


def test_of_two_replicas_one_fails_to_spawn_and_the_503_still_names_it():
    scaler, runtime = make_scaler(runtime=FirstSpawnFails(Clock()))
    during = []

    def another_request(_proc):  # while the second is forked, inside the first one's backoff
        scaler.scale_up("model-c", 1)  # one is promised already: nothing to start, nothing to refuse
        during.append(scaler.state("model-c"))

    runtime.on_spawn = another_request
    message = "cannot run 'serve': Text file busy (next start attempt in 10s)"
    assert refusal(scaler.scale_up, "model-c", 2) == (message, 10)
    assert during == ["starting"]
    assert [p.spec.name for p in runtime.live()] == ["model-c"]  # the second one started
    runtime.on_spawn = None
    scaler.scale_up("model-c", 1)  # one is running: served, not refused for the other's backoff
    runtime.clock.now += 4
    assert refusal(scaler.scale_up, "model-c", 2) == (
        "cannot run 'serve': Text file busy (next start attempt in 6s)",
        6,
    )
    assert len(runtime.spawned) == 1  # inside the backoff: not tried again


def _placement(proc, key, state, *, ready=False, free_by=None):
    return Placement(
        pod=f"{key}-{proc.pid}",
        node="shadow",
        memory_bytes=proc_memory(key),
        model=key,
        uid=f"pid-{proc.pid}-{proc.started_at}",
        phase="Running",
        started_at=proc.started_at,
        ready=ready,
        state=state,
        free_by=free_by,
    )


def proc_memory(key):
    return {"local/model-a": 80 * GI, "local/model-b": 60 * GI, "local/model-c": 16 * GI}[key]


def test_the_view_holds_every_live_process_and_every_start_in_flight():
    scaler, runtime = make_scaler()
    scaler.scale_up("model-c", 3)
    starting, ready, stopping = runtime.spawned
    runtime.ready(ready)
    runtime.ready(stopping)
    runtime.clock.now += 7
    runtime.stop(stopping)
    stopping.stop_deadline = time.monotonic() - 100  # its grace period is over: free now at the latest
    scaler.scale_up("model-b", 1)
    (b,) = runtime.live()[3:]
    runtime.clock.now += 2
    seen = []
    runtime.on_spawn = lambda _proc: seen.append(scaler.view())
    scaler.scale_up("model-c", 3)  # the stopping one still counts: a fourth is spawned beside it
    (view,) = seen
    assert list(view.placements) == [
        _placement(b, "local/model-b", "starting"),
        _placement(starting, "local/model-c", "starting"),
        _placement(ready, "local/model-c", "running", ready=True),
        _placement(stopping, "local/model-c", "stopping", free_by=T0 + 9),
        Placement(
            pod="local/model-c-spawning-5",
            node="shadow",
            memory_bytes=16 * GI,
            model="local/model-c",
            uid="spawning-5",
            phase="Pending",
            started_at=T0 + 9,
            ready=False,
            state="starting",
            devices=(0,),
        ),
    ]
    assert {k: m.replicas for k, m in view.models.items()} == {
        "local/model-a": 0,
        "local/model-b": 1,
        "local/model-c": 4,
    }


@pytest.mark.parametrize(
    "grace_left, free_in",
    [(4.0, (3.9, 4.0)), (-100.0, (0.0, 0.0)), (None, None)],
    ids=["sigkill-in-4s", "grace-period-over", "no-deadline-known"],
)
def test_a_stopping_process_is_free_by_its_sigkill(grace_left, free_in):
    scaler, runtime = make_scaler()
    scaler.scale_up("model-a", 1)
    (a,) = runtime.spawned
    runtime.ready(a)
    runtime.stop(a)
    if grace_left is not None:
        a.stop_deadline = time.monotonic() + grace_left
    scaler._on_process_change(a)
    (placement,) = scaler.view().placements
    if free_in is None:
        assert placement.free_by is None
    else:
        assert free_in[0] <= placement.free_by - T0 <= free_in[1]


def test_a_ready_process_with_a_deadline_is_not_free_by_it():
    scaler, runtime = make_scaler()
    scaler.scale_up("model-a", 1)
    (a,) = runtime.spawned
    runtime.ready(a)
    a.stop_deadline = time.monotonic() + 4  # left from an earlier stop that did not happen: only stopping counts
    scaler._on_process_change(a)
    assert [(p.state, p.free_by) for p in scaler.view().placements] == [("running", None)]


def test_a_good_start_clears_the_failure():
    scaler, runtime = make_scaler()
    scaler.scale_up("model-a", 1)
    runtime.exit(runtime.spawned[0], 1, failure="exited with code 1: boom")
    runtime.clock.now += 10
    scaler.scale_up("model-a", 1)
    runtime.ready(runtime.spawned[1])
    runtime.stop(runtime.spawned[1])
    runtime.exit(runtime.spawned[1], 0)  # stopped as asked: not a failure
    assert scaler.state("model-a") == "stopped"
    assert scaler.wait_backends("model-a", 0) == []


def test_a_closed_scaler_starts_nothing():
    scaler, runtime = make_scaler()
    scaler.close()
    assert refusal(scaler.scale_up, "model-a", 1) == ("ibc local is shutting down", None)
    assert runtime.spawned == []


def test_a_first_start_blocks_for_its_cooldown_alone():
    scaler, _ = make_scaler()
    scaler.scale_up("model-a", 1)  # never started before: no start-up time known
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-b", 1)
    assert info.value.decision.retry_after_seconds == 600
