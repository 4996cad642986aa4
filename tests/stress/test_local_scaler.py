"""Local mode's scaler under concurrent cold starts: 1,000 randomized trials never overcommit a node.

Why: in `ibc local` every cold request may call `LocalScaler.scale_up` at the same moment; the scaler
decides with `budget.decide_scale` under one lock and starts processes. A lost update there shows up as
two models started into the same hole, which a unit test with one thread never sees. Each trial draws a
random pool (1-3 nodes, labels) and random models (some too large for any node, some for a pool with no
node), then 8 threads call `scale_up` with random models and replica counts while chaos calls kill,
ready and stop replicas. The runtime checks the invariant continuously: at every spawn, the declared
memory of the replicas it holds on that node (including the new one) must fit the node. Every denial
must explain itself (the 429 body of `budget.explain`: requested, available, blocking, a message) and
tell the truth about the room left.

The first test swaps the process runtime for a recording stub (the scaler's runtime is injectable), so
1,000 trials run in seconds; the second runs a smaller number of trials with the real runtime and real
(trivial) processes, checking the invariant from the processes that are alive.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from budget import NEVER_REASONS, Decision, explain, format_bytes
from local.config import LocalConfig, LocalModel, LocalNode
from local.runtime import ManagedProcess, ProcessRuntime, ProcessSpec
from local.scaler import LocalScaler
from proxy.scaler import ScaleDenied
from tests.stress.support import RecordingRuntime

GI = 2**30
TRIALS = 1000
THREADS = 8
OPS_PER_THREAD = 6
REASONS = {"insufficient_memory", "no_matching_nodes", "exceeds_node_capacity", "exceeds_pool_capacity"}


# ----------------------------------------------------------------------------- random worlds


def stress_seed() -> int:
    """A fresh seed per run (printed with any failure); IBC_STRESS_SEED replays one."""
    return int(os.environ.get("IBC_STRESS_SEED") or random.randrange(2**32))


def random_config(rng: random.Random) -> LocalConfig:
    """1-3 nodes in pools `a`/`b`, 2-6 models; a few never fit (too large, or a pool with no node)."""
    nodes = tuple(
        LocalNode(f"n{i}", rng.randrange(16, 161, 8) * GI, labels={"pool": rng.choice("ab")})
        for i in range(rng.randint(1, 3))
    )
    models = []
    for i in range(rng.randint(2, 6)):
        selector = rng.choice([{}, {}, {"pool": "a"}, {"pool": "b"}, {"pool": "c"}])
        memory = rng.choice([rng.randrange(4, 97, 4), rng.randrange(4, 49, 4), 200]) * GI
        models.append(LocalModel(f"m{i}", memory, ("true",), node_selector=selector, stop_grace_seconds=0.1))
    return LocalConfig(nodes=nodes, models=tuple(models), source="<stress>")


def check_denial(decision: Decision) -> None:
    """A denial carries the 429 body a user reads, and its numbers are true."""
    body = explain(decision)
    assert not decision.allowed
    assert decision.reason in REASONS, decision
    assert body["error"] == decision.reason
    assert body["message"] and decision.model in body["message"], body
    assert body["requested"] == {
        "model": decision.model,
        "memory": format_bytes(decision.memory_bytes),
        "replicas": decision.replicas_to,
    }
    assert isinstance(body["available"], str) and body["available"], body
    assert isinstance(body["blocking"], list)
    for blocker in body["blocking"]:
        assert set(blocker) - {"state"} == {"model", "memory", "idle_for"}, blocker
        assert blocker.get("state", "starting") in ("starting", "stopping"), blocker
    if decision.reason in NEVER_REASONS:  # waiting cannot help: no retry hint
        assert body["retry_after_seconds"] is None, body
    else:
        assert body["retry_after_seconds"] >= 1, body
    if decision.reason == "insufficient_memory":
        # Nothing of the pool could have taken the new replicas: the largest hole is smaller than them.
        new = decision.replicas_to - decision.replicas_from
        assert new >= 1 and decision.available_bytes < decision.memory_bytes * new, decision


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every 10 us instead of 5 ms: many more interleavings per trial."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run_trial(rng: random.Random, stats: Counter[str]) -> None:
    config = random_config(rng)
    runtime = RecordingRuntime(config)
    scaler = LocalScaler(config, runtime=runtime, port_picker=lambda: 9)  # type: ignore[arg-type]
    keys = [m.key for m in config.models]
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    plans = [
        [(rng.random(), rng.choice(keys), rng.choice([1, 1, 1, 2, 3]), rng.random()) for _ in range(OPS_PER_THREAD)]
        for _ in range(THREADS)
    ]

    lock = threading.Lock()

    def chaos_once(roll: float, chaos: random.Random) -> str | None:
        """Kill, ready, stop or reap a random replica, as the runtime's own threads would."""
        proc = runtime.random_live(chaos)
        if proc is None:
            return None
        action = ("kill", "ready", "stop", "reap")[min(3, int((roll - 0.7) / 0.075))]
        if action == "kill":
            runtime.kill(proc)
        elif action == "ready":
            runtime.make_ready(proc)
        elif action == "stop":
            runtime.stop(proc)
            if chaos.random() < 0.5:
                runtime.finish_stops()
        else:
            runtime.reap()
        return action

    def worker(plan: list[tuple[float, str, int, float]]) -> None:
        local = Counter[str]()
        chaos = random.Random(plan[0][3])
        try:
            barrier.wait()
            for roll, key, replicas, _ in plan:
                if roll < 0.7:
                    try:
                        scaler.scale_up(key, replicas)
                        local["allowed"] += 1
                    except ScaleDenied as exc:
                        check_denial(exc.decision)
                        local[f"denied:{exc.decision.reason}"] += 1
                    scaler.backends(key)  # a request's read path: reaps a killed replica
                elif (action := chaos_once(roll, chaos)) is not None:
                    local[f"chaos:{action}"] += 1
        except BaseException as exc:
            errors.append(exc)
        with lock:
            stats.update(local)

    threads = [threading.Thread(target=worker, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a scale_up call never returned (deadlock?)"
    if errors:
        raise errors[0]
    assert runtime.violations == [], runtime.violations
    # What the scaler believes agrees with the runtime: its view places nothing beyond any node.
    view = scaler.view()
    for node, free in view.free_bytes(time.time()).items():
        assert free >= 0, (node, free, view)
    stats["spawns"] += runtime.spawns


def test_randomized_concurrent_scale_ups_never_overcommit_and_every_denial_explains_itself(
    fast_switching: None,
) -> None:
    seed = stress_seed()
    rng = random.Random(seed)
    stats: Counter[str] = Counter()
    started = time.monotonic()
    for trial in range(TRIALS):
        try:
            run_trial(rng, stats)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial} (seed {seed}): {exc}") from exc
    elapsed = time.monotonic() - started
    print(f"{TRIALS} trials in {elapsed:.1f}s (seed {seed}): {dict(sorted(stats.items()))}")
    # The trials exercised what they claim to: starts, each kind of denial, and the chaos.
    assert stats["spawns"] > TRIALS
    assert stats["allowed"] > TRIALS
    for reason in REASONS:
        assert stats[f"denied:{reason}"] > 10, (reason, stats)
    assert stats["chaos:kill"] > 100 and stats["chaos:stop"] > 100


# ----------------------------------------------------------------------------- real processes

REAL_TRIALS = 25


class CountingRuntime(ProcessRuntime):
    """The real runtime, counting the processes it started."""

    spawned = 0

    def spawn(self, spec: ProcessSpec) -> ManagedProcess:
        proc = super().spawn(spec)
        CountingRuntime.spawned += 1
        return proc


def run_real_trial(rng: random.Random, violations: list[str]) -> None:
    """One trial with the real runtime: 6 threads scale up and SIGKILL replicas; a sampler checks /proc."""
    base = random_config(rng)
    models = tuple(
        LocalModel(m.name, m.memory_bytes, ("sleep", "30"), node_selector=m.node_selector, stop_grace_seconds=1)
        for m in base.models
    )
    config = LocalConfig(nodes=base.nodes, models=models, source="<stress>")
    memory = {m.key: m.memory_bytes for m in models}
    capacity = {n.name: n.memory_bytes for n in config.nodes}
    runtime = CountingRuntime(probe=lambda _url: True, forward_output=False, poll_interval_seconds=0.02)
    scaler = LocalScaler(config, runtime=runtime).start()
    keys = [m.key for m in models]
    stop = threading.Event()
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def sample() -> None:
        while not stop.is_set():
            held: Counter[str] = Counter()
            for proc in runtime.processes():
                if proc.popen.poll() is None:  # alive: it holds its memory, whatever its phase
                    held[proc.spec.node] += memory[proc.spec.owner]
            violations.extend(
                f"{node} holds {format_bytes(used)} of {format_bytes(capacity[node])}"
                for node, used in held.items()
                if used > capacity[node]
            )
            time.sleep(0.002)

    def worker(seed: int) -> None:
        local = random.Random(seed)
        try:
            barrier.wait()
            for _ in range(4):
                if local.random() < 0.8:
                    try:
                        scaler.scale_up(local.choice(keys), local.choice([1, 1, 2]))
                    except ScaleDenied as exc:
                        check_denial(exc.decision)
                else:
                    procs = [p for k in keys for p in scaler.processes(k)]
                    if procs:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(local.choice(procs).pid, signal.SIGKILL)
                time.sleep(local.random() * 0.01)
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    threads = [threading.Thread(target=worker, args=(rng.randrange(2**32),)) for _ in range(6)]
    sampler.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        sampler.join(timeout=5)
        scaler.close(timeout_seconds=1)
    if errors:
        raise errors[0]
    assert runtime.processes() == [], "processes left after close"


def test_concurrent_scale_ups_with_real_processes_never_overcommit() -> None:
    """The real runtime starting `sleep` processes, 6 threads at once, with SIGKILLs in between.

    A sampler reads the runtime's processes every few milliseconds and checks, from the operating
    system's point of view (a process counts while it is alive), that no node holds more declared
    memory than it has.
    """
    seed = stress_seed()
    rng = random.Random(seed)
    violations: list[str] = []
    CountingRuntime.spawned = 0
    for trial in range(REAL_TRIALS):
        try:
            run_real_trial(rng, violations)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial} (seed {seed}): {exc}") from exc
        assert violations == [], f"trial {trial} (seed {seed}): {violations[:5]}"
    print(f"{REAL_TRIALS} trials with real processes (seed {seed}): {CountingRuntime.spawned} started")
    assert CountingRuntime.spawned > REAL_TRIALS, "the trials started too few processes to prove anything"
