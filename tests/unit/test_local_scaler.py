"""The local scaler decides like the cluster does: seed scenario, cooldown, crashes, and no overcommit under races.

A fake runtime stands in for processes, so these tests drive every phase change by hand.
"""

import random
import sys
import threading

import pytest

from budget import UnknownModelError, explain, metrics_body
from local.config import parse_config
from local.runtime import ManagedProcess, MemorySample, Phase, ProcessError
from local.scaler import LocalScaler, resolve_command
from proxy.scaler import ScaleDenied, ScalerUnavailable

pytestmark = pytest.mark.unit

GI = 2**30
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakePopen:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeRuntime:
    """Records spawns and stops; a test moves processes through their phases."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.listener = None
        self.spawned: list[ManagedProcess] = []
        self.stopped: list[ManagedProcess] = []
        self.fail_spawn: str | None = None
        self.rss: dict[str, int] = {}
        self.on_spawn = None
        self._pid = 1000
        self._lock = threading.Lock()

    def set_listener(self, listener):
        self.listener = listener

    def start(self):
        pass

    def spawn(self, spec):
        if self.fail_spawn:
            raise ProcessError(f"{spec.name}: cannot run {spec.argv[0]!r}: {self.fail_spawn}")
        with self._lock:
            self._pid += 1
            proc = ManagedProcess(spec, FakePopen(self._pid), started_at=self.clock())
            self.spawned.append(proc)
        if self.on_spawn:
            self.on_spawn(proc)
        return proc

    def stop(self, proc, *, grace_seconds=None):
        if proc.phase in (Phase.READY, Phase.STARTING):
            proc.phase = Phase.STOPPING
            self.stopped.append(proc)
            self.listener(proc)

    def shutdown(self, timeout_seconds=None):
        for proc in self.live():
            self.exit(proc, 0)

    def reap(self):
        for proc in self.live():
            if proc.popen.returncode is not None:
                self.exit(proc, proc.popen.returncode, failure=f"exited with code {proc.popen.returncode}")

    def sample_memory(self, procs):
        return {p.pid: MemorySample(self.rss.get(p.spec.name, 0), "rss") for p in procs}

    # helpers
    def live(self):
        return [p for p in self.spawned if p.phase is not Phase.EXITED]

    def ready(self, proc):
        proc.phase = Phase.READY
        self.listener(proc)

    def exit(self, proc, code, failure=None):
        if proc.phase is not Phase.STOPPING and failure is None:
            failure = f"exited with code {code}"
        proc.phase = Phase.EXITED
        proc.exit_code = code
        proc.failure = failure
        self.listener(proc)


SEED = {
    "nodes": [{"name": "shadow", "memory": "128Gi", "labels": {"inference-pool": "gpu-nodes"}}],
    "models": [
        {"name": "model-a", "memory": "80Gi", "cooldown": "10m", "command": "serve a --port {port}"},
        {"name": "model-b", "memory": "60Gi", "cooldown": "10m", "command": "serve b --port {port}"},
        {"name": "model-c", "memory": "16Gi", "cooldown": "0", "command": "serve c --port {port}"},
    ],
}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def runtime(clock):
    return FakeRuntime(clock)


@pytest.fixture
def scaler(runtime, clock):
    ports = iter(range(20000, 30000))
    return LocalScaler(parse_config(SEED), runtime=runtime, clock=clock, port_picker=lambda: next(ports))


def _start_ready(scaler, runtime, name):
    scaler.scale_up(name, 1)
    proc = runtime.spawned[-1]
    runtime.ready(proc)
    return proc


def test_cold_model_starts_with_its_command_and_serves_when_ready(scaler, runtime):
    assert scaler.state("model-a") == "stopped"
    scaler.scale_up("local/model-a", 1)
    (proc,) = runtime.spawned
    assert proc.spec.argv == ("serve", "a", "--port", "20000")
    assert proc.spec.health_url == "http://127.0.0.1:20000/health"
    assert proc.spec.node == "shadow"
    assert scaler.state("model-a") == "starting"
    assert scaler.backends("model-a") == []
    assert scaler.wait_backends("model-a", 0.01) == []  # still starting: the caller loops
    runtime.ready(proc)
    assert scaler.state("model-a") == "ready"
    assert scaler.wait_backends("model-a", 1) == ["http://127.0.0.1:20000"]
    scaler.scale_up("model-a", 1)  # already there: nothing new
    assert len(runtime.spawned) == 1


def test_seed_scenario_explains_the_429(scaler, runtime, clock):
    _start_ready(scaler, runtime, "model-a")
    clock.now += 120
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-b", 1)
    decision = info.value.decision
    assert decision.reason == "insufficient_memory"
    assert decision.retry_after_seconds == 480  # model-a's cooldown ends in 600 - 120 s
    body = explain(decision)
    assert body["requested"] == {"model": "model-b", "memory": "60Gi", "replicas": 1}
    assert body["available"] == "48Gi"
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]
    assert "blocked by model-a (80Gi, idle 120s)" in decision.message
    assert len(runtime.spawned) == 1  # nothing was started for model-b
    scaler.scale_up("model-c", 1)  # 16Gi fits beside model-a
    assert [p.spec.name for p in runtime.live()] == ["model-a", "model-c"]


def test_view_counts_every_live_process(scaler, runtime):
    proc = _start_ready(scaler, runtime, "model-a")
    view = scaler.view()
    assert [(p.model, p.node, p.memory_bytes, p.ready) for p in view.placements] == [
        ("local/model-a", "shadow", 80 * GI, True)
    ]
    assert view.models["local/model-a"].replicas == 1
    assert view.free_bytes(T0) == {"shadow": 48 * GI}
    runtime.exit(proc, 0)
    assert scaler.view().placements == ()


def test_cooldown_stops_idle_models_by_the_budget_idle_rule(scaler, runtime, clock):
    a = _start_ready(scaler, runtime, "model-a")
    c = _start_ready(scaler, runtime, "model-c")
    clock.now += 300
    scaler.touch("model-a", clock.now)  # a request restarts the idle clock
    clock.now += 599
    assert scaler.stop_idle() == []
    clock.now += 1
    assert scaler.stop_idle() == ["model-a"]
    assert runtime.stopped == [a]
    assert c.phase is Phase.READY  # cooldown 0 never stops
    clock.now += 10_000
    assert scaler.stop_idle() == []


def test_idle_clock_starts_at_the_process_start_not_at_an_old_request(scaler, runtime, clock):
    scaler.touch("model-a", clock.now)
    clock.now += 1000
    _start_ready(scaler, runtime, "model-a")
    clock.now += 599
    assert scaler.stop_idle() == []


def test_a_starting_model_is_not_stopped_for_idleness(scaler, runtime, clock):
    scaler.scale_up("model-a", 1)
    clock.now += 3600
    assert scaler.stop_idle() == []
    assert runtime.stopped == []


def test_a_stopping_process_still_holds_its_memory(scaler, runtime, clock):
    a = _start_ready(scaler, runtime, "model-a")
    clock.now += 600
    scaler.stop_idle()
    assert a.phase is Phase.STOPPING
    with pytest.raises(ScaleDenied):
        scaler.scale_up("model-b", 1)
    runtime.exit(a, 0)  # the reaper saw it go
    scaler.scale_up("model-b", 1)
    assert runtime.spawned[-1].spec.name == "model-b"


def test_restart_beside_its_own_stopping_process_needs_room_for_both(scaler, runtime, clock):
    c = _start_ready(scaler, runtime, "model-c")
    runtime.stop(c)
    scaler.scale_up("model-c", 1)  # 16Gi + 16Gi fit: a new process starts at once
    assert [p.phase for p in runtime.spawned] == [Phase.STOPPING, Phase.STARTING]


def test_crash_frees_memory_reports_failed_and_restarts_on_next_request(scaler, runtime):
    a = _start_ready(scaler, runtime, "model-a")
    runtime.exit(a, -9, failure="was killed by SIGKILL")
    assert scaler.state("model-a") == "failed"
    assert metrics_body(scaler.memory("model-a"))["lastFailure"] == "was killed by SIGKILL"
    assert scaler.view().placements == ()
    scaler.scale_up("model-b", 1)  # the memory is free for others at once
    runtime.exit(runtime.spawned[-1], 0, failure="exited with code 0")
    scaler.scale_up("model-a", 1)
    assert scaler.state("model-a") == "starting"
    runtime.ready(runtime.spawned[-1])
    assert scaler.state("model-a") == "ready"


def test_a_dead_process_is_noticed_by_the_next_request_not_the_next_reaper_tick(scaler, runtime):
    a = _start_ready(scaler, runtime, "model-a")
    a.popen.returncode = -9  # killed; the reaper has not looked yet
    assert scaler.backends("model-a") == []  # so the proxy starts it again rather than forwarding to a dead port
    assert scaler.state("model-a") == "failed"
    scaler.scale_up("model-a", 1)
    assert len(runtime.live()) == 1 and runtime.live()[0] is not a


def test_failed_start_ends_the_wait_with_the_reason(scaler, runtime):
    scaler.scale_up("model-a", 1)
    proc = runtime.spawned[-1]
    threading.Timer(0.05, runtime.exit, args=(proc, 1, "exited with code 1: CUDA out of memory")).start()
    with pytest.raises(ScalerUnavailable, match="^exited with code 1: CUDA out of memory") as info:
        scaler.wait_backends("model-a", 5)
    assert info.value.retry_after_seconds == 10  # the first failure waits 10 s before the next attempt


def test_waiters_wake_when_the_process_is_ready(scaler, runtime):
    scaler.scale_up("model-a", 1)
    threading.Timer(0.05, runtime.ready, args=(runtime.spawned[-1],)).start()
    assert scaler.wait_backends("model-a", 5) == ["http://127.0.0.1:20000"]


def test_spawn_failure_is_unavailable_and_holds_no_memory(scaler, runtime):
    runtime.fail_spawn = "No such file or directory"
    with pytest.raises(ScalerUnavailable, match="cannot run 'serve': No such file or directory"):
        scaler.scale_up("model-a", 1)
    assert scaler.state("model-a") == "failed"
    assert scaler.view().placements == ()
    runtime.fail_spawn = None
    scaler.scale_up("model-b", 1)


def test_unknown_model_and_shutdown(scaler):
    with pytest.raises(UnknownModelError):
        scaler.scale_up("model-z", 1)
    scaler.close()
    with pytest.raises(ScalerUnavailable, match="shutting down"):
        scaler.scale_up("model-a", 1)


def test_gpus_are_separate_budgets_and_pass_their_env(clock):
    config = parse_config(
        {
            "nodes": [
                {"name": "gpu0", "memory": "24Gi", "env": {"CUDA_VISIBLE_DEVICES": "0"}},
                {"name": "gpu1", "memory": "24Gi", "env": {"CUDA_VISIBLE_DEVICES": "1"}},
            ],
            "models": [
                {"name": "m", "memory": "20Gi", "command": "serve --port {port} --gpu {node}", "env": {"X": "1"}},
            ],
        }
    )
    runtime = FakeRuntime(clock)
    scaler = LocalScaler(config, runtime=runtime, clock=clock, port_picker=lambda: 7000)
    scaler.scale_up("m", 2)
    assert sorted((p.spec.node, p.spec.env["CUDA_VISIBLE_DEVICES"], p.spec.env["X"]) for p in runtime.spawned) == [
        ("gpu0", "0", "1"),
        ("gpu1", "1", "1"),
    ]
    assert runtime.spawned[0].spec.argv[-1] in {"gpu0", "gpu1"}
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("m", 3)  # two 20Gi replicas never fit one 24Gi GPU
    assert info.value.decision.available_bytes == 4 * GI


def test_concurrent_scale_ups_never_overcommit(clock):
    runtime = FakeRuntime(clock)
    scaler = LocalScaler(parse_config(SEED), runtime=runtime, clock=clock, port_picker=lambda: 7000)
    capacity = 128 * GI
    memory = {"model-a": 80 * GI, "model-b": 60 * GI, "model-c": 16 * GI}
    worst = []

    def check(_proc):
        held = sum(memory[p.spec.name] for p in runtime.live())
        worst.append(held)

    runtime.on_spawn = check
    barrier = threading.Barrier(30)
    outcomes = []

    def client(i):
        rng = random.Random(i)
        barrier.wait()
        for _ in range(20):
            name = rng.choice(list(memory))
            try:
                scaler.scale_up(name, 1)
                outcomes.append("started-or-running")
            except ScaleDenied:
                outcomes.append("denied")
            live = [p for p in runtime.live() if p.phase is not Phase.STOPPING]
            if live and rng.random() < 0.3:
                victim = rng.choice(live)
                runtime.stop(victim)
                runtime.exit(victim, 0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst and max(worst) <= capacity
    assert "denied" in outcomes and "started-or-running" in outcomes
    assert sum(memory[p.spec.name] for p in runtime.live()) <= capacity


def test_metrics_report_declared_observed_and_advice(scaler, runtime):
    _start_ready(scaler, runtime, "model-a")
    before = metrics_body(scaler.memory("model-a"))
    assert before["declaredMemory"] == "80Gi" and before["observedPeakMemory"] is None
    runtime.rss["model-a"] = 75 * GI
    scaler.sample_now()
    runtime.rss["model-a"] = 70 * GI
    scaler.sample_now()
    body = metrics_body(scaler.memory("model-a"))
    assert body["observedMemoryBytes"] == 70 * GI
    assert body["observedPeakMemory"] == "75Gi"
    assert body["utilizationPercent"] == 93
    assert body["recommendation"].startswith("Consider reducing memory to 78Gi")
    assert body["recommendedMemory"] == "78Gi" and body["readyReplicas"] == 1
    assert body["state"] == "ready" and body["replicas"] == 1 and body["source"] == "rss"
    assert body["lastObservation"].endswith("Z")


def test_ibc_commands_run_with_this_interpreter():
    assert resolve_command(["ibc", "mock-backend", "--model", "m"]) == [
        sys.executable,
        "-m",
        "ibc",
        "mock-backend",
        "--model",
        "m",
    ]
    assert resolve_command(["vllm", "serve"]) == ["vllm", "serve"]


def test_view_is_cached_until_something_a_decision_reads_changes(scaler, runtime, clock):
    scaler.touch("model-a", clock.now)
    first = scaler.view()
    assert first.models["local/model-a"].last_request_time == clock.now
    assert scaler.view() is first  # the proxy re-indexes models only for a new view object
    scaler.touch("model-a", clock.now + 0.5)
    assert scaler.view() is first  # sub-second idle changes do not matter to a 429
    scaler.touch("model-a", clock.now + 5)
    second = scaler.view()
    assert second is not first and second.models["local/model-a"].last_request_time == clock.now + 5
    scaler.scale_up("model-a", 1)
    third = scaler.view()
    assert third is not second and len(third.placements) == 1
    runtime.ready(runtime.spawned[-1])
    assert scaler.view().placements[0].ready


def test_state_says_stopping_while_the_memory_is_still_held(scaler, runtime):
    a = _start_ready(scaler, runtime, "model-a")
    runtime.stop(a)
    assert scaler.state("model-a") == "stopping"
    runtime.exit(a, 0)
    assert scaler.state("model-a") == "stopped"


def test_an_exit_seen_by_another_thread_counts_before_its_callback_runs(scaler, runtime):
    a = _start_ready(scaler, runtime, "model-a")
    # The reaper thread marked it exited and is still waiting for the scaler's lock to report it.
    a.phase, a.failure = Phase.EXITED, "was killed by SIGKILL"
    assert scaler.backends("model-a") == []
    scaler.scale_up("model-a", 1)  # must start a new process, not count the dead one as running
    assert runtime.spawned[-1] is not a and scaler.state("model-a") == "starting"
    assert [p.pid for p in scaler.processes("model-a")] == [runtime.spawned[-1].pid]


def test_a_spawn_in_flight_holds_memory_but_not_the_lock(scaler, runtime):
    _start_ready(scaler, runtime, "model-c")
    release = threading.Event()
    entered = threading.Event()

    def slow_fork(_proc):
        entered.set()
        release.wait(5)

    runtime.on_spawn = slow_fork
    starter = threading.Thread(target=scaler.scale_up, args=("model-a", 1))
    starter.start()
    assert entered.wait(5)
    # While model-a's process is being forked: other models are served, and its memory is already taken.
    assert scaler.backends("model-c") == ["http://127.0.0.1:20000"]
    assert scaler.state("model-a") == "starting"
    assert [p.phase for p in scaler.view().placements if p.model == "local/model-a"] == ["Pending"]
    with pytest.raises(ScaleDenied):
        scaler.scale_up("model-b", 1)
    scaler.scale_up("model-a", 1)  # a second burst does not start a second process
    release.set()
    starter.join(5)
    assert [p.spec.name for p in runtime.live()] == ["model-c", "model-a"]
    assert [p.phase for p in scaler.view().placements if p.model == "local/model-a"] == ["Running"]


def test_a_stopping_blocker_is_named_with_its_grace_period_left(scaler, runtime, clock):
    import time

    a = _start_ready(scaler, runtime, "model-a")
    runtime.stop(a)
    a.stop_deadline = time.monotonic() + 4  # SIGKILL in 4 s at the latest
    scaler._on_process_change(a)
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-b", 1)
    body = explain(info.value.decision)
    assert body["blocking"][0]["state"] == "stopping"
    assert info.value.decision.retry_after_seconds in (3, 4)  # not the 1 s it used to say, nor the cooldown
    assert "model-a (80Gi, stopping)" in body["message"]


def test_a_starting_blocker_waits_for_its_start_up_then_its_cooldown(scaler, runtime, clock):
    a = _start_ready(scaler, runtime, "model-a")
    a.ready_at = a.started_at + 25  # the last start took 25 s: the estimate for the next one
    scaler._on_process_change(a)
    runtime.exit(a, 0)
    scaler.scale_up("model-a", 1)  # starting again
    clock.now += 5
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-b", 1)
    body = explain(info.value.decision)
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "0s", "state": "starting"}]
    assert info.value.decision.retry_after_seconds == 20 + 600
    assert "model-a (80Gi, starting)" in body["message"]


def test_retry_after_waits_for_the_blocker_that_frees_enough_not_the_first_to_go(runtime, clock):
    config = {**SEED, "models": [dict(m, cooldown="10m") for m in SEED["models"]]}
    ports = iter(range(21000, 22000))
    scaler = LocalScaler(parse_config(config), runtime=runtime, clock=clock, port_picker=lambda: next(ports))
    _start_ready(scaler, runtime, "model-c")
    clock.now += 53
    _start_ready(scaler, runtime, "model-a")
    clock.now += 500  # model-c's cooldown ends in 47 s, model-a's in 100 s: only model-a frees enough
    with pytest.raises(ScaleDenied) as info:
        scaler.scale_up("model-b", 1)
    decision = info.value.decision
    assert decision.retry_after_seconds == 100
    assert [b.model for b in decision.blocking] == ["model-a", "model-c"]
    assert "it fits once model-a is gone, in 100s" in decision.message


def _fail_start(runtime, scaler, name, output=()):
    scaler.scale_up(name, 1)
    proc = runtime.spawned[-1]
    proc.tail.extend(output)
    runtime.exit(proc, 1, failure="exited with code 1" + (f": {output[-1]}" if output else ""))
    return proc


def test_a_retry_inside_the_backoff_does_not_run_the_process_again(scaler, runtime, clock):
    _fail_start(runtime, scaler, "model-a", ["loading weights", "CUDA out of memory"])
    for _ in range(3):
        with pytest.raises(ScalerUnavailable) as info:
            scaler.scale_up("model-a", 1)
        clock.now += 3
    assert len(runtime.spawned) == 1  # three retries, one process
    assert info.value.retry_after_seconds == 4  # 10 s backoff, 6 s gone when the last retry came
    assert str(info.value).startswith("exited with code 1: CUDA out of memory")
    clock.now += 4
    _fail_start(runtime, scaler, "model-a")  # the backoff is over: tried again, failed again
    with pytest.raises(ScalerUnavailable) as info:
        scaler.scale_up("model-a", 1)
    assert info.value.retry_after_seconds == 20  # doubled
    assert len(runtime.spawned) == 2


def test_the_failure_message_is_the_runtimes_quote_without_the_model_name(scaler, runtime):
    # What to quote (the last error-looking stderr lines, bounded) is the runtime's rule:
    # tests/unit/test_local_last_output.py. The scaler keeps it as it is and never repeats the name.
    _fail_start(runtime, scaler, "model-a", ["loading", "CUDA out of memory"])
    message = metrics_body(scaler.memory("model-a"))["lastFailure"]
    assert message == "exited with code 1: CUDA out of memory"
    assert "model-a" not in message  # the proxy names the model once, in front


def test_last_failure_and_its_history_survive_a_good_start(scaler, runtime, clock):
    _fail_start(runtime, scaler, "model-a", ["boom"])
    clock.now += 10
    _start_ready(scaler, runtime, "model-a")
    body = metrics_body(scaler.memory("model-a"))
    assert body["state"] == "ready"
    assert body["lastFailure"] == "exited with code 1: boom"
    assert body["lastFailureTime"] == "2023-11-14T22:13:20Z"
    assert body["nextStartAttempt"] is None
    assert [f["message"] for f in body["recentFailures"]] == ["exited with code 1: boom"]
    assert scaler.details("model-a")["lastFailure"] == body["lastFailure"]
    for _ in range(8):  # the history stays short
        runtime.exit(runtime.live()[-1], -9, failure="was killed by SIGKILL")
        _start_ready(scaler, runtime, "model-a")  # a crash after serving restarts at once: no backoff
    assert len(metrics_body(scaler.memory("model-a"))["recentFailures"]) == 5


def test_a_spawn_error_backs_off_and_names_the_model_once(scaler, runtime, clock):
    runtime.fail_spawn = "No such file or directory"
    with pytest.raises(ScalerUnavailable) as info:
        scaler.scale_up("model-a", 1)
    assert str(info.value) == "cannot run 'serve': No such file or directory (next start attempt in 10s)"
    runtime.fail_spawn = None
    with pytest.raises(ScalerUnavailable):
        scaler.scale_up("model-a", 1)  # inside the backoff even though the command would work now
    clock.now += 10
    scaler.scale_up("model-a", 1)
    assert scaler.state("model-a") == "starting"
