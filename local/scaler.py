"""The local scaler: the proxy's Scaler for one machine, where replicas are processes, not pods.

Local mode is the proxy with this scaler, not a second proxy. Where the Kubernetes scaler PATCHes
`/scale` and lets the webhook decide, this one decides itself, with the same function
(:func:`budget.decide_scale`), on a view built from the config's nodes and models and the processes
that are alive, under one lock, so concurrent cold requests can never overcommit. A denial is a
:class:`proxy.scaler.ScaleDenied` carrying the decision, which the proxy turns into the same 429.

A replica holds its declared memory from the moment the decision grants it (before the fork, which
runs outside the lock) until its exit has been seen, so a process that is still starting or still
shutting down keeps counting. Idle models are stopped by the same rule as
the budget's `idle_for`: idle since the later of the last request and the process start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import Flask, Response

from budget import (
    ClusterView,
    Eviction,
    ModelMemory,
    Placement,
    UnknownModelError,
    advise,
    decide_scale,
    format_bytes,
    idle_seconds,
    metrics_body,
    plan_eviction,
)
from budget.objects import format_device_indices, rfc3339
from local.config import DEVICE_ENV, NAMESPACE, LocalConfig, LocalModel
from local.control import add_control_routes
from local.runtime import (
    ManagedProcess,
    MemorySample,
    Phase,
    PortRange,
    ProcessError,
    ProcessRuntime,
    ProcessSpec,
    free_port,
)
from proxy.app import create_app, error_response, proxy_of
from proxy.evictions import BusySource, EvictionLog, nobody_busy
from proxy.scaler import ScaleDenied, ScalerUnavailable
from serving.metrics import MemoryCollector

if TYPE_CHECKING:
    from proxy.settings import ProxySettings

log = logging.getLogger(__name__)

DEFAULT_SUPERVISE_INTERVAL_SECONDS = 1.0
"""How often idle models are checked against their cooldown: cooldowns are minutes, 1 s is precise enough."""

VIEW_IDLE_RESOLUTION_SECONDS = 1.0
"""A request refreshes the cached view's idle clock at most this often (429 bodies show whole seconds)."""

ROOM_POLL_SECONDS = 0.5
"""While waiting for stopping processes to exit, re-check at least this often (exits also wake the wait)."""

STOP_REAP_MARGIN_SECONDS = 5.0
"""Beyond a model's stop grace period (then SIGKILL), the time its exit takes to be seen and reaped."""

DEFAULT_SAMPLE_INTERVAL_SECONDS = 5.0
"""How often observed memory is read from /proc (and nvidia-smi): a peak is a trend, not a spike hunt."""

BACKOFF_BASE_SECONDS = 10.0
"""Wait after a failed start before the next attempt, doubled per failure in a row (kubelet's CrashLoopBackOff)."""

BACKOFF_MAX_SECONDS = 300.0
"""The longest wait between attempts (kubelet's cap too): a fixed command is tried again within 5 minutes."""

FAILURE_HISTORY = 5
"""Failures kept per model for /v1/models and /models/{name}/metrics: enough to see a pattern."""


@dataclass(frozen=True)
class Failure:
    """One failed start or crash of a model's process: when, and why (exit and last output lines)."""

    at: float
    message: str


@dataclass
class CrashLoop:
    """A model's failures and when the next start may be tried; a ready replica ends the loop, not the history."""

    history: list[Failure] = field(default_factory=list)
    in_a_row: int = 0
    next_attempt: float = 0.0

    def crashed(self, at: float, message: str) -> None:
        """A replica that had been serving ended: kept in the history, no backoff."""
        self.history = [*self.history, Failure(at, message)][-FAILURE_HISTORY:]

    def failed(self, at: float, message: str, base_seconds: float, max_seconds: float) -> None:
        """A start failed: the next one waits base * 2^(failures in a row - 1), at most max."""
        self.crashed(at, message)
        self.in_a_row += 1
        self.next_attempt = at + min(max_seconds, base_seconds * 2 ** (self.in_a_row - 1))

    def started(self) -> None:
        self.in_a_row = 0
        self.next_attempt = 0.0

    @property
    def last(self) -> Failure | None:
        return self.history[-1] if self.history else None


@dataclass(frozen=True)
class _Pending:
    """Memory promised to a process being spawned: decided under the lock, spawned outside it."""

    serial: int
    node: str
    decided_at: float
    devices: tuple[int, ...] = ()


class LocalScaler:
    """Implements :class:`proxy.scaler.Scaler` with local processes; every method is thread-safe."""

    def __init__(
        self,
        config: LocalConfig,
        *,
        runtime: ProcessRuntime | None = None,
        clock: Callable[[], float] = time.time,
        port_picker: Callable[[], int] | None = None,
        log_dir: str | None = None,
        supervise_interval_seconds: float = DEFAULT_SUPERVISE_INTERVAL_SECONDS,
        sample_interval_seconds: float = DEFAULT_SAMPLE_INTERVAL_SECONDS,
        backoff_base_seconds: float = BACKOFF_BASE_SECONDS,
        backoff_max_seconds: float = BACKOFF_MAX_SECONDS,
    ) -> None:
        self.config = config
        self._runtime = runtime or ProcessRuntime()
        self._runtime.set_listener(self._on_process_change)
        self._clock = clock
        if port_picker is None and config.ports is not None:
            ports = PortRange(*config.ports)
            port_picker = lambda: ports.pick(self._ports_in_use())  # noqa: E731
        self._port_picker = port_picker or free_port
        self.log_dir = log_dir or config.logs  # each model's output in <log_dir>/<model>.log; None: ibc's log
        self._supervise_interval_seconds = supervise_interval_seconds
        self._sample_interval_seconds = sample_interval_seconds
        self._backoff = (backoff_base_seconds, backoff_max_seconds)
        self._nodes = tuple(n.to_node() for n in config.nodes)
        self._models = {m.key: m for m in config.models}
        # One lock guards everything below; the condition wakes requests waiting for a backend.
        self._cond = threading.Condition(threading.RLock())
        self._replicas: dict[str, list[ManagedProcess]] = {key: [] for key in self._models}
        self._pending: dict[str, list[_Pending]] = {key: [] for key in self._models}
        self._serial = 0
        self._last_request: dict[str, float] = {}
        self._failure: dict[str, str] = {}  # why the current start failed (cleared when a new one begins)
        self._crashes: dict[str, CrashLoop] = {key: CrashLoop() for key in self._models}
        self._been_ready: set[int] = set()  # pids of live replicas that were ready once (a later exit is a crash)
        self._startup_seconds: dict[str, float] = {}  # the last start's duration: the next start's estimate
        self._halted: set[str] = set()  # stopped by hand since their last start
        self._observed: dict[str, MemorySample] = {}
        self._peak_bytes: dict[str, int] = {}
        self._last_observation: dict[str, float] = {}
        self._last_hint: dict[str, str | None] = {}
        self._view: ClusterView | None = None  # cached until something a decision reads changes
        self._busy_source: BusySource = nobody_busy
        self._evictions = EvictionLog()
        self._evicted: list[ManagedProcess] = []  # stopped to make room, until their exit is seen
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> LocalScaler:
        """Start the runtime and the supervisor (cooldown, memory sampling); returns self."""
        self._runtime.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, name="ibc-local-supervisor", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_seconds: float | None = None) -> None:
        """Refuse new starts, stop every model process and wait for them (see ProcessRuntime.shutdown)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stop.set()
        self._runtime.shutdown(timeout_seconds)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- the Scaler protocol ----------------------------------------------------------------------

    def view(self) -> ClusterView:
        """The budget view: config nodes and models, with every live process as a placement (cached)."""
        with self._cond:
            self._prune_locked()
            if self._view is None:
                self._view = self._view_locked()
            return self._view

    def backends(self, model_key: str) -> list[str]:
        """Base URLs of ready replicas."""
        model = self._model(model_key)
        with self._cond:
            if any(p.popen.poll() is not None for p in self._replicas[model.key] if p.phase is Phase.READY):
                # Died since the reaper last looked (kill -9, OOM): notice it now, so this request
                # starts a new process instead of being sent to a dead port.
                self._runtime.reap()
            self._prune_locked()
            return self._ready_urls(model.key)

    def scale_up(self, model_key: str, replicas: int) -> None:
        """Start processes until `replicas` are running, if the budget allows; ScaleDenied if not.

        The decision and the memory it grants are taken under the lock; the spawn itself (tens of ms
        for a fork) happens outside it, so requests for running models never wait behind a start.
        When the start does not fit, idle models the policy allows are stopped to make room (see
        `budget.plan_eviction`), and memory an earlier eviction is freeing is waited for (bounded).
        """
        model = self._model(model_key)
        evicted: list[ManagedProcess] = []
        with self._cond:
            room_deadline: float | None = None
            while True:
                if self._closing:
                    raise ScalerUnavailable("ibc local is shutting down")
                self._prune_locked()
                alive = self._replicas[model.key]
                stopping = sum(1 for p in alive if p.phase is Phase.STOPPING)
                if replicas <= len(alive) - stopping + len(self._pending[model.key]):
                    return
                now = self._clock()
                crash = self._crashes[model.key]
                if now < crash.next_attempt:
                    # Inside the backoff: answer with the last failure, do not run the process again.
                    raise self._unavailable_locked(model.key, now)
                # A replica still shutting down holds its memory: ask for room beside it.
                decision = decide_scale(self._view_locked(), model.key, replicas + stopping, now)
                if decision.allowed:
                    self._evictions.forget(model.key)
                    break
                plan = plan_eviction(self._view_locked(), model.key, replicas + stopping, now, busy=self._busy_locked())
                if plan is not None and plan.victims:
                    evicted = self._evict_locked(plan, model)
                    decision = plan.decision
                    break
                # Memory an eviction for another request is freeing right now: wait for it, briefly.
                if room_deadline is None:
                    room_deadline = time.monotonic() + self._stop_wait_seconds_locked()
                remaining = room_deadline - time.monotonic()
                if remaining <= 0 or not self._freeing_helps_locked(model.key, replicas, now):
                    log.info("denied %s: %s", model.name, decision.message)
                    raise ScaleDenied(decision)
                self._cond.wait(min(remaining, ROOM_POLL_SECONDS))
            granted = []
            for slot in decision.device_placements:
                self._serial += 1
                granted.append(_Pending(self._serial, slot.node, now, slot.devices))
            self._pending[model.key].extend(granted)
            self._halted.discard(model.key)
            self._view = None
            if evicted:
                # The victims' memory is promised to this model already; start it once they have exited.
                self._await_exit_locked(evicted, model, granted)
        errors = []
        for pending in granted:
            try:
                proc: ManagedProcess | None = self._spawn(model, pending.node, pending.devices)
            except ProcessError as exc:
                proc = None
                errors.append(exc)
            with self._cond:
                # The promise becomes the process (or goes) in one step: the memory is never unheld.
                self._pending[model.key].remove(pending)
                if proc is not None:
                    self._failure.pop(model.key, None)
                    self._replicas[model.key].append(proc)
                else:
                    self._record_failure_locked(
                        model.key, _without_name(str(errors[-1]), model.name), failed_start=True
                    )
                self._view = None
                self._cond.notify_all()
        if errors:
            with self._cond:
                raise self._unavailable_locked(model.key, self._clock()) from errors[0]

    def can_make_room(self, model_key: str, replicas: int) -> bool:
        """Whether a start that does not fit now could: by evicting idle models, or memory being freed.

        The proxy's pre-check asks this before answering 429; `scale_up` decides for real under the lock.
        """
        model = self._model(model_key)
        with self._cond:
            self._prune_locked()
            now = self._clock()
            plan = plan_eviction(self._view_locked(), model.key, replicas, now, busy=self._busy_locked())
            return (plan is not None and bool(plan.victims)) or self._freeing_helps_locked(model.key, replicas, now)

    def note(self, model_key: str) -> str | None:
        """What was done to start this model, for held streaming clients ("stopping model-a ... for model-b")."""
        return self._evictions.note(self._model(model_key).key)

    def set_busy_source(self, source: BusySource) -> None:
        """Tell the scaler which backends serve requests and which models hold requests (never evicted)."""
        self._busy_source = source

    def wait_backends(self, model_key: str, timeout_seconds: float) -> list[str]:
        """Block until a replica is ready or `timeout_seconds` pass ([]); ScalerUnavailable if the start failed."""
        model = self._model(model_key)
        deadline = time.monotonic() + max(0.0, timeout_seconds)
        with self._cond:
            while True:
                self._prune_locked()
                urls = self._ready_urls(model.key)
                if urls:
                    return urls
                starting = self._pending[model.key] or any(p.phase is Phase.STARTING for p in self._replicas[model.key])
                if not starting and model.key in self._failure:
                    raise self._unavailable_locked(model.key, self._clock())
                if not starting and model.key in self._halted:
                    raise ScalerUnavailable(f"{model.name} was stopped by hand while it started")
                if self._closing:
                    raise ScalerUnavailable("ibc local is shutting down")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def touch(self, model_key: str, now: float) -> None:
        """Record a request: the idle clock restarts."""
        model = self._model(model_key)
        with self._cond:
            previous = self._last_request.get(model.key, 0.0)
            if now > previous:
                self._last_request[model.key] = now
                cached = self._view.models[model.key].last_request_time if self._view is not None else None
                if now - (cached or 0.0) >= VIEW_IDLE_RESOLUTION_SECONDS:
                    self._view = None  # idle times in a 429 are whole seconds; no need to rebuild per request

    def state(self, model_key: str) -> str:
        """`ready`, `starting`, `stopping` (memory not yet free), `stopped` or `failed`."""
        model = self._model(model_key)
        with self._cond:
            self._prune_locked()
            phases = {p.phase for p in self._replicas[model.key]}
            if Phase.READY in phases:
                return "ready"
            if Phase.STARTING in phases or self._pending[model.key]:
                return "starting"
            if Phase.STOPPING in phases:
                return "stopping"  # still holds its memory until the process has exited
            if model.key in self._failure:
                return "failed"
            return "stopped"

    # -- observation ------------------------------------------------------------------------------

    @property
    def evictions(self) -> EvictionLog:
        """Models stopped early to make room, by whom (for the `ibc_evictions_total` counter)."""
        return self._evictions

    def memory(self, model_ref: str) -> ModelMemory:
        """Declared and observed memory of one model, with the budget's advice (raises UnknownModelError)."""
        model = self._model(model_ref)
        state = self.state(model.key)
        with self._cond:
            sample = self._observed.get(model.key)
            peak = self._peak_bytes.get(model.key)
            observed_at = self._last_observation.get(model.key)
            advice = advise(model.name, model.memory_bytes, peak) if peak is not None else None
            crash = self._crashes[model.key]
            return ModelMemory(
                namespace=NAMESPACE,
                name=model.name,
                model_name=model.name,
                declared_bytes=model.memory_bytes,
                observed_peak_bytes=peak,
                utilization_percent=advice.utilization_percent if advice else None,
                recommended_bytes=advice.recommendation_bytes if advice else None,
                recommendation=advice.recommendation if advice else None,
                last_observation=rfc3339(observed_at) if observed_at is not None else None,
                replicas=sum(1 for p in self._replicas[model.key] if p.phase is not Phase.STOPPING)
                + len(self._pending[model.key]),
                ready_replicas=sum(1 for p in self._replicas[model.key] if p.phase is Phase.READY),
                source=sample.source if sample else "none",
                state=state,
                observed_bytes=sample.memory_bytes if sample else None,
                last_failure=crash.last.message if crash.last else None,
                last_failure_time=rfc3339(crash.last.at) if crash.last else None,
                next_start_attempt=rfc3339(crash.next_attempt) if crash.next_attempt > self._clock() else None,
                recent_failures=tuple((rfc3339(f.at), f.message) for f in crash.history),
                log=self.log_path(model.key),
            )

    def processes(self, model_ref: str) -> list[ManagedProcess]:
        """The live processes of one model (starting, ready or stopping)."""
        model = self._model(model_ref)
        with self._cond:
            return list(self._replicas[model.key])

    def sample_now(self) -> None:
        """Read observed memory of every live replica and update current and peak values."""
        with self._cond:
            procs = [p for plist in self._replicas.values() for p in plist]
        samples = self._runtime.sample_memory(procs)
        now = self._clock()
        with self._cond:
            for key, plist in self._replicas.items():
                mine = [samples[p.pid] for p in plist if p.pid in samples and p.alive]
                if not mine:
                    self._observed.pop(key, None)
                    continue
                biggest = max(mine, key=lambda s: s.memory_bytes)  # declared memory is per replica
                self._observed[key] = biggest
                self._last_observation[key] = now
                if biggest.memory_bytes > self._peak_bytes.get(key, 0):
                    self._peak_bytes[key] = biggest.memory_bytes
                    model = self._models[key]
                    advice = advise(model.name, model.memory_bytes, self._peak_bytes[key])
                    # Log when the advice changes, not at every new peak: a hint, not a stream.
                    if advice.hint and advice.recommendation != self._last_hint.get(key):
                        log.info("%s; %s", advice.hint, advice.recommendation)
                    self._last_hint[key] = advice.recommendation

    def stop_idle(self, now: float | None = None) -> list[str]:
        """Stop models idle for their cooldown; returns their names. Run by the supervisor every second."""
        now = self._clock() if now is None else now
        stopped = []
        with self._cond:
            self._prune_locked()
            for key, plist in self._replicas.items():
                model = self._models[key]
                ready = [p for p in plist if p.phase is Phase.READY]
                if model.cooldown_seconds <= 0 or not ready:
                    continue
                if self._pending[key] or any(p.phase is Phase.STARTING for p in plist):
                    continue  # a scale-up is in flight; someone is waiting for it
                view_model = model.to_model(last_request_time=self._last_request.get(key))
                idle_for = idle_seconds(view_model, [p.started_at for p in plist], now)
                if idle_for < model.cooldown_seconds:
                    continue
                why = f"idle for {int(idle_for)}s (cooldown {int(model.cooldown_seconds)}s)"
                self._stop_locked(model, ready, why)
                stopped.append(model.name)
        return stopped

    def stop_model(self, model_ref: str) -> int:
        """Stop a model by hand (`POST /models/{name}/stop`): its cooldown's stop path, now, for every
        replica that is starting or ready. Returns how many were asked to stop (0: nothing running)."""
        model = self._model(model_ref)
        with self._cond:
            self._prune_locked()
            live = [p for p in self._replicas[model.key] if p.phase in (Phase.STARTING, Phase.READY)]
            if live:
                self._halted.add(model.key)  # requests held for a start that is stopped now get told so
                self._stop_locked(model, live, "stopped by hand")
            return len(live)

    def _stop_locked(self, model: LocalModel, procs: list[ManagedProcess], why: str) -> None:
        """The one stop path: log what it frees, then SIGTERM (SIGKILL after the grace period)."""
        log.info("%s %s: stopping it to free %s", model.name, why, format_bytes(model.memory_bytes * len(procs)))
        for proc in procs:
            self._runtime.stop(proc)
        self._cond.notify_all()

    # -- internals --------------------------------------------------------------------------------

    def _model(self, ref: str) -> LocalModel:
        model = self._models.get(ref) or self.config.model(ref)
        if model is None:
            raise UnknownModelError(f"unknown model {ref!r}")
        return model

    def _ready_urls(self, key: str) -> list[str]:
        return [p.spec.base_url for p in self._replicas[key] if p.phase is Phase.READY]

    def _view_locked(self, *, exclude: Collection[ManagedProcess] = ()) -> ClusterView:
        models = []
        placements = []
        for key, model in self._models.items():
            plist = [p for p in self._replicas[key] if p not in exclude]
            pending = self._pending[key]
            models.append(
                model.to_model(
                    replicas=len(plist) + len(pending),
                    last_request_time=self._last_request.get(key),
                    startup_seconds=self._startup_seconds.get(key, 0.0),
                )
            )
            for p in plist:
                placements.append(
                    Placement(
                        pod=f"{key}-{p.pid}",
                        node=p.spec.node,
                        devices=p.spec.devices,
                        memory_bytes=model.memory_bytes,
                        model=key,
                        uid=f"pid-{p.pid}-{p.started_at}",
                        phase="Running",
                        started_at=p.started_at,
                        ready=p.phase is Phase.READY,
                        state=_PLACEMENT_STATES[p.phase],
                        free_by=_free_by(p, self._clock()),
                    )
                )
            for r in pending:
                placements.append(
                    Placement(
                        pod=f"{key}-spawning-{r.serial}",
                        node=r.node,
                        devices=r.devices,
                        memory_bytes=model.memory_bytes,
                        model=key,
                        uid=f"spawning-{r.serial}",
                        phase="Pending",
                        started_at=r.decided_at,
                        state="starting",
                    )
                )
        return ClusterView.build(nodes=self._nodes, models=models, placements=placements)

    def _ports_in_use(self) -> set[int]:
        with self._cond:
            return {p.spec.port for plist in self._replicas.values() for p in plist}

    def log_path(self, model_ref: str) -> str | None:
        """Where the model's processes write their output (None when it goes to ibc's log)."""
        model = self._model(model_ref)
        return os.path.join(self.log_dir, f"{model.name}.log") if self.log_dir else None

    def details(self, model_key: str) -> dict[str, Any]:
        """Local mode's extra fields in `GET /v1/models` and `GET /status`: the last failure (kept across good
        starts) with a short history, and the model's own log file."""
        body = metrics_body(self.memory(model_key))
        keep = ("lastFailure", "lastFailureTime", "nextStartAttempt", "recentFailures", "log")
        return {k: body[k] for k in keep}

    def _busy_locked(self) -> set[str]:
        """Models serving a request (a backend with requests in flight) or holding one for its start."""
        urls, held = self._busy_source()
        busy = set(held)
        for key, plist in self._replicas.items():
            if any(p.spec.base_url in urls for p in plist):
                busy.add(key)
        return busy

    def _evict_locked(self, plan: Eviction, model: LocalModel) -> list[ManagedProcess]:
        """Stop the plan's victims by the cooldown's stop path; their memory counts until they exit."""
        log.info("%s", plan.message)
        stopped = []
        for victim in plan.victims:
            ready = [p for p in self._replicas[victim.model] if p.phase is Phase.READY]
            why = f"idle for {int(victim.idle_for_seconds)}s, evicted to make room for {model.name}"
            self._stop_locked(self._models[victim.model], ready, why)
            stopped.extend(ready)
        self._evicted.extend(stopped)
        self._evictions.record([v.name for v in plan.victims], model.name, model.key, plan.message)
        self._view = None
        return stopped

    def _await_exit_locked(self, procs: list[ManagedProcess], model: LocalModel, granted: list[_Pending]) -> None:
        """Wait (lock released while waiting) until evicted processes have exited; give the promise back if not."""
        deadline = time.monotonic() + self._stop_wait_seconds_locked()
        while True:
            self._prune_locked()
            if not any(p in plist for plist in self._replicas.values() for p in procs):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                for pending in granted:
                    self._pending[model.key].remove(pending)
                self._view = None
                self._cond.notify_all()
                raise ScalerUnavailable(f"the models stopped to make room for {model.name} did not exit in time")
            self._cond.wait(min(remaining, ROOM_POLL_SECONDS))

    def _freeing_helps_locked(self, key: str, replicas: int, now: float) -> bool:
        """True when models evicted for another request are still stopping and the start fits once they
        have exited (memory a cooldown is freeing is not waited for: that 429 is as it always was)."""
        self._evicted = [p for p in self._evicted if p.phase is not Phase.EXITED]
        if not self._evicted:
            return False
        return decide_scale(self._view_locked(exclude=self._evicted), key, replicas, now).allowed

    def _stop_wait_seconds_locked(self) -> float:
        """How long stopping processes may take: the longest grace period, plus time to reap."""
        return max((m.stop_grace_seconds for m in self._models.values()), default=0.0) + STOP_REAP_MARGIN_SECONDS

    def _spawn(self, model: LocalModel, node_name: str, devices: tuple[int, ...] = ()) -> ManagedProcess:
        """Run one replica of `model` on `node_name`, on `devices` of it (called without the lock held)."""
        node = self.config.node(node_name)
        assert node is not None, node_name  # the decision only places on config nodes
        port = self._port_picker()
        chosen = {}
        if node.devices:  # a node of GPUs: the process sees only the devices the decision gave it
            chosen = dict.fromkeys(DEVICE_ENV, format_device_indices(devices))
        spec = ProcessSpec(
            owner=model.key,
            name=model.name,
            argv=tuple(resolve_command(model.argv(port=port, node=node.name))),
            port=port,
            health_url=model.health_url(port=port, node=node.name),
            node=node.name,
            env={**node.env, **model.env, **chosen},
            devices=devices if node.devices else (),
            startup_timeout_seconds=model.startup_timeout_seconds,
            stop_grace_seconds=model.stop_grace_seconds,
            log_path=self.log_path(model.key),
        )
        return self._runtime.spawn(spec)

    def _on_process_change(self, proc: ManagedProcess) -> None:
        """Runtime callback: a replica became ready, began stopping or exited."""
        with self._cond:
            if proc.phase is Phase.READY:
                self._crashes[proc.spec.owner].started()
                self._been_ready.add(proc.pid)
                if proc.ready_at is not None:
                    self._startup_seconds[proc.spec.owner] = max(0.0, proc.ready_at - proc.started_at)
            self._prune_locked()
            self._view = None
            self._cond.notify_all()

    def _prune_locked(self) -> None:
        """Forget replicas whose exit was seen (by any thread): their memory is free from now on.

        Whoever sees a process exit first marks it EXITED; the runtime's callback may still be waiting
        for this lock, so every reader prunes rather than trusting that the callback already ran.
        """
        for key, plist in self._replicas.items():
            for proc in [p for p in plist if p.phase is Phase.EXITED]:
                plist.remove(proc)
                crashed = proc.pid in self._been_ready or proc.ready_at is not None
                self._been_ready.discard(proc.pid)
                if proc.failure:
                    # Only a failed start backs off; a crash after serving restarts on the next request.
                    self._record_failure_locked(key, proc.failure, failed_start=not crashed)
                self._view = None

    def _record_failure_locked(self, key: str, message: str, *, failed_start: bool) -> None:
        now = self._clock()
        self._failure[key] = message
        crash = self._crashes[key]
        if not failed_start:
            crash.crashed(now, message)
            return
        base, cap = self._backoff
        crash.failed(now, message, base, cap)
        log.warning(
            "%s failed to start (%d in a row); next attempt in %.0fs at the earliest",
            self._models[key].name,
            crash.in_a_row,
            crash.next_attempt - now,
        )

    def _unavailable_locked(self, key: str, now: float) -> ScalerUnavailable:
        """The 503's cause: the last failure and when a new start will be tried (Retry-After)."""
        crash = self._crashes[key]
        message = self._failure.get(key) or (crash.last.message if crash.last else "failed to start")
        if crash.next_attempt <= now:
            return ScalerUnavailable(message)
        wait = max(1, math.ceil(crash.next_attempt - now))
        return ScalerUnavailable(f"{message} (next start attempt in {wait}s)", retry_after_seconds=wait)

    def _supervise(self) -> None:
        next_sample = 0.0
        while not self._stop.wait(self._supervise_interval_seconds):
            try:
                self.stop_idle()
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + self._sample_interval_seconds
                    self.sample_now()
            except Exception:
                log.exception("local supervisor iteration failed")


_PLACEMENT_STATES = {
    Phase.STARTING: "starting",
    Phase.READY: "running",
    Phase.STOPPING: "stopping",
    Phase.EXITED: "stopping",
}


def _free_by(proc: ManagedProcess, now: float) -> float | None:
    """For a stopping replica, the time of its SIGKILL: its memory is free by then at the latest."""
    if proc.phase is not Phase.STOPPING or proc.stop_deadline is None:
        return None
    return now + max(0.0, proc.stop_deadline - time.monotonic())


def _without_name(message: str, name: str) -> str:
    """A runtime error without the model name it starts with: the proxy's message names the model once."""
    return message.removeprefix(f"{name}: ")


def resolve_command(argv: list[str]) -> list[str]:
    """`ibc ...` runs as this interpreter's `python -m ibc ...`: the same install, with or without PATH."""
    if argv and argv[0] == "ibc":
        return [sys.executable, "-m", "ibc", *argv[1:]]
    return argv


def add_local_routes(app: Flask, scaler: LocalScaler) -> None:
    """Add `GET /models/{name}/metrics`, manual start/stop (`local.control`) and the memory gauges to an
    app built by `proxy.app.create_app`, through the proxy's public hooks: its API-key check and its
    metrics registry."""
    proxy = proxy_of(app)

    def model_metrics(name: str) -> Response:
        try:
            memory = scaler.memory(name)
        except UnknownModelError:
            return error_response(404, f"The model `{name}` does not exist.", "model_not_found", "model")
        return Response(json.dumps(metrics_body(memory)), 200, mimetype="application/json")

    app.add_url_rule("/models/<name>/metrics", "local_model_metrics", proxy.require_key(model_metrics), methods=["GET"])
    add_control_routes(app, scaler)
    proxy.metrics.registry.register(
        MemoryCollector(
            lambda: [scaler.memory(m.key) for m in scaler.config.models],
            declared_help="Memory declared in the local config (models[].memory)",
            current=True,
        )
    )
    app.extensions["ibc_local"] = scaler


def create_local_app(
    config: LocalConfig, settings: ProxySettings, *, scaler: LocalScaler | None = None, log_dir: str | None = None
) -> tuple[Flask, LocalScaler]:
    """The proxy's app with the local scaler (started here) and the local routes; the caller closes the scaler."""
    scaler = (scaler or LocalScaler(config, log_dir=log_dir)).start()
    app = create_app(settings, scaler, source="ibc local")
    add_local_routes(app, scaler)
    return app, scaler
