"""The load layer in a cluster: the leader reads each replica's load and steps `spec.replicas` through /scale.

Why this module exists: locally the scaler owns the whole loop (local/scaler.py); in a cluster only the
controller may write, and only its leader. Every `LoadSettings.interval_seconds` the leader reads, for each
InferenceModel with `maxReplicas > 1`, the `/metrics` of each of its ready pods (vLLM's queue, running
count and KV-cache use, :mod:`serving.signals`), feeds them to the pure rule (:func:`budget.load.desired_replicas`,
stabilization state kept here per model) and steps `spec.replicas` by one through the scale subresource.
The admission webhook then decides the step with the budget, as for every scale-up; its refusal is
quoted in a `LoadScaleBlocked` Event, the model's status (`replicasWanted`, `replicasAllowed`,
`loadMessage`) and the `ibc_model_replicas_*` gauges.

What it never does: act below `minReplicas` (the warm loop's), from or to zero (the proxy's and the idle
layer's), while a replica is starting, or on a pod whose metrics did not answer: no signal is not idle
load, so a failed scrape holds the model where it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from budget import BudgetError
from budget.load import LoadDecision, LoadState, ReplicaSignals, desired_replicas
from budget.objects import LABEL_MODEL, model_from_inferencemodel
from budget.view import model_key
from controller import translate as tr
from controller.errors import SpecError
from controller.events import EventRecorder, EventType
from controller.kube import Kube
from controller.metrics import ControllerMetrics
from controller.queue import WorkQueue
from controller.reconciler import scale_model
from controller.settings import LoadSettings
from controller.status import LoadReport
from kubeview.api import ApiError
from serving.signals import ReplicaMetrics, scrape, scrape_in_flight

log = logging.getLogger(__name__)

NO_SIGNAL = "no load signal from"  # the start of the message while a ready pod's /metrics says nothing

Scrape = Callable[[str], "ReplicaMetrics | None"]


@dataclass(frozen=True)
class Replica:
    """One live pod of a model: where its metrics are and whether it serves yet."""

    pod: str
    url: str
    ready: bool


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready and not being deleted: the pod serves requests."""
    status = pod.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ready and status.get("phase") == "Running" and not (pod.get("metadata") or {}).get("deletionTimestamp")


def pod_url(pod: Mapping[str, Any], port: Any) -> str | None:
    """`http://podIP:port` (spec.port, else the pod's first containerPort, else 8000); None without an IP."""
    ip = str((pod.get("status") or {}).get("podIP") or "")
    if not ip:
        return None
    if not (isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536):
        port = tr.DEFAULT_PORT
        for container in (pod.get("spec") or {}).get("containers") or []:
            found = [p["containerPort"] for p in (container or {}).get("ports") or [] if isinstance(p, Mapping)]
            ints = [p for p in found if isinstance(p, int)]
            if ints:
                port = ints[0]
                break
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def replicas_of(pods: Sequence[Mapping[str, Any]], port: Any) -> list[Replica]:
    """The model's live pods (not deleted, not finished), sorted by name."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        url = pod_url(pod, port)
        ready = pod_ready(pod) and url is not None
        out.append(Replica(str(meta.get("name") or "?"), url or "", ready))
    return sorted(out, key=lambda r: r.pod)


def signals_of(
    replicas: Sequence[Replica],
    metrics: Mapping[str, ReplicaMetrics | None],
    current: int,
    in_flight: Mapping[str, int] | None = None,
) -> tuple[list[ReplicaSignals], list[str]]:
    """The rule's input: one entry per pod (a starting one per pod not created yet), and the ready pods
    that gave no signal: those hold the model, they never count as idle.

    A pod's signal is its own vLLM gauges (`metrics`, by pod name) and, when `in_flight` is given (every
    proxy answered, summed per backend URL; the caller passes it only with `spec.load.concurrency` set, the
    rule's only use of it), the proxies' requests in flight to it. A pod with neither is silent.
    """
    signals, silent = [], []
    for r in replicas:
        got = metrics.get(r.pod) if r.ready else None
        if got == ReplicaMetrics():  # Prometheus text without vLLM's names says nothing about load
            got = None
        if r.ready and got is None and in_flight is None:
            silent.append(r.pod)
        signals.append(
            ReplicaSignals(
                r.pod,
                in_flight=in_flight.get(r.url, 0) if in_flight is not None and r.ready else 0,
                waiting=got.waiting if got else None,
                running=got.running if got else None,
                kv_cache_usage=got.kv_cache_usage if got else None,
                starting=not r.ready,
            )
        )
    signals += [ReplicaSignals("not created yet", starting=True)] * max(0, current - len(replicas))
    return signals, silent


class LoadLoop:
    """One pass per interval over every load-scaled model; run by the leader only (see controller/manager.py)."""

    def __init__(
        self,
        kube: Kube,
        cache: Any,  # kubeview.ClusterCache: objects(kind), get(kind, ns, name)
        recorder: EventRecorder,
        queue: WorkQueue,
        settings: LoadSettings,
        *,
        metrics: ControllerMetrics | None = None,
        scrape_fn: Scrape | None = None,
        scrape_proxy_fn: Callable[[str], dict[str, int] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.cache, self.recorder, self.queue, self.settings = kube, cache, recorder, queue, settings
        self.metrics = metrics
        timeout = settings.scrape_timeout_seconds
        self._scrape: Scrape = scrape_fn or (lambda url: scrape(url, timeout_seconds=timeout))
        self._scrape_proxy: Callable[[str], dict[str, int] | None] = scrape_proxy_fn or (
            lambda url: scrape_in_flight(url, timeout_seconds=timeout)
        )
        self._proxy_warned: dict[str, float] = {}
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, LoadState] = {}
        self._reports: dict[str, tuple[str, str, LoadReport]] = {}  # key -> (name, namespace, report)
        self._blocked: dict[str, tuple[int, int, float]] = {}  # key -> (wanted, allowed, asked at)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="load-scrape")

    # ------------------------------------------------------------------ read side (status, gauges)

    def report(self, key: str) -> LoadReport | None:
        with self._lock:
            entry = self._reports.get(key)
        return entry[2] if entry else None

    def gauge_rows(self) -> list[tuple[str, str, int, int]]:
        """(model, namespace, wanted, allowed) for serving.metrics.ReplicasCollector."""
        with self._lock:
            return [(name, ns, r.wanted, r.allowed) for name, ns, r in self._reports.values()]

    def forget(self, key: str) -> None:
        with self._lock:
            self._state.pop(key, None)
            self._reports.pop(key, None)
            self._blocked.pop(key, None)

    def reset(self) -> None:
        """Leadership ended: a standby shows nothing and starts its windows afresh when it leads."""
        with self._lock:
            self._state.clear()
            self._reports.clear()
            self._blocked.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the loop

    def run(self, session: threading.Event) -> None:
        """Until `session` is set: one pass, then wait out the interval."""
        while not session.is_set():
            try:
                self.run_once()
            except Exception:  # a bug must not end the loop; the next pass tries again
                log.exception("load pass failed")
            session.wait(self.settings.interval_seconds)

    def run_once(self) -> None:
        seen = set()
        pods: dict[str, list[Mapping[str, Any]]] = {}  # model key -> its pods, indexed once per pass
        for pod in self.cache.objects("Pod"):
            meta = pod.get("metadata") or {}
            label = (meta.get("labels") or {}).get(LABEL_MODEL)
            if label:
                pods.setdefault(model_key(str(meta.get("namespace") or "default"), str(label)), []).append(pod)
        in_flight = self._proxies_in_flight()
        for model in self.cache.objects("InferenceModel"):
            namespace, name = tr.name_of(model)
            key = model_key(namespace, name)
            seen.add(key)
            self.step(model, key, pods.get(key, []), in_flight)
        with self._lock:
            gone = [k for k in self._reports if k not in seen]
        for key in gone:
            self.forget(key)

    def _proxies_in_flight(self) -> dict[str, int] | None:
        """Requests in flight per backend URL, summed over every proxy (`--proxy-metrics-url`); None when
        none is configured or one does not answer: a partial sum would look like less load than there is."""
        urls = self.settings.proxy_metrics_urls
        if not urls:
            return None
        counts = list(self._pool.map(self._scrape_proxy, urls))
        total: dict[str, int] = {}
        for url, count in zip(urls, counts, strict=True):
            if count is None:
                self._note_silent_proxy(url)
                return None
            for backend, n in count.items():
                total[backend] = total.get(backend, 0) + n
        return total

    def _note_silent_proxy(self, url: str) -> None:
        now = self.clock()
        if now - self._proxy_warned.get(url, -1e9) >= 600:  # at most every 10 minutes per proxy
            self._proxy_warned[url] = now
            log.warning("no in-flight counts from the proxy at %s: models without vLLM metrics hold", url)

    def step(
        self,
        model: Mapping[str, Any],
        key: str,
        pods: Sequence[Mapping[str, Any]],
        in_flight: Mapping[str, int] | None = None,
    ) -> None:
        """One look at one model: maybe one /scale PATCH."""
        try:
            m = model_from_inferencemodel(model)
            managed = tr.workload_of(model).managed
        except (BudgetError, SpecError):
            managed = False
        if not managed or (model.get("metadata") or {}).get("deletionTimestamp") or m.max_replicas <= 1:
            self.forget(key)  # not load-scaled (maxReplicas 1 is today's behaviour), or the spec is the problem
            return
        current = m.replicas
        namespace, name = tr.name_of(model)
        if current == 0 or current < m.min_replicas:
            with self._lock:  # zero is the proxy's, below minReplicas the warm loop's: their windows start afresh
                self._state.pop(key, None)
                self._blocked.pop(key, None)
            why = "0 replicas: a request starts one" if current == 0 else f"below minReplicas {m.min_replicas}"
            self._hold(key, name, namespace, current, why)
            return
        replicas = replicas_of(pods, (model.get("spec") or {}).get("port"))
        ready = [r for r in replicas if r.ready]
        scraped = dict(zip([r.pod for r in ready], self._pool.map(lambda r: self._scrape(r.url), ready), strict=True))
        # The rule reads in-flight counts only with a concurrency; behind spec.backendUrl the proxies send to
        # that URL, not to the pods, so their counts say nothing per pod.
        direct = not (model.get("spec") or {}).get("backendUrl")
        counted = in_flight if m.load.concurrency is not None and direct else None
        signals, silent = signals_of(replicas, scraped, current, counted)
        label = m.model_name or m.name
        now = self.clock()
        if silent:
            more = f" (and {len(silent) - 1} more)" if len(silent) > 1 else ""
            with self._lock:
                self._state.pop(key, None)
            self._publish(
                key,
                name,
                namespace,
                LoadReport(
                    current,
                    current,
                    f"{NO_SIGNAL} {silent[0]}{more}: "
                    "neither vLLM's gauges at its /metrics nor the proxies' count (spec.load.concurrency and "
                    "--proxy-metrics-url); holding at "
                    f"{current} replica(s)",
                ),
            )
            return
        with self._lock:
            state = self._state.get(key, LoadState())
        decision = desired_replicas(
            signals,
            current=current,
            min_replicas=m.min_replicas,
            max_replicas=m.max_replicas,
            tuning=m.load,
            state=state,
            now=now,
        )
        with self._lock:
            # A step not taken yet (refused, raced, failed) stays due: tried again at the next pass (a refused
            # one after the recheck interval), not after a new stabilization window. A step taken resets it.
            if decision.direction == "up":
                self._state[key] = LoadState(pressure_since=now - m.load.scale_up_window_seconds)
            elif decision.direction == "down":
                self._state[key] = LoadState(slack_since=now - m.load.scale_down_window_seconds)
            else:
                self._state[key] = decision.state
        if decision.desired == current + 1:
            self._up(model, key, label, current, decision, now)
        elif decision.desired == current - 1 and current > max(m.min_replicas, 1):
            self._down(model, key, label, current, decision)
        else:
            with self._lock:
                self._blocked.pop(key, None)
            self._hold(key, name, namespace, current, decision.reason)

    def _hold(self, key: str, name: str, namespace: str, current: int, why: str) -> None:
        """No step: wanted = allowed = today's count; the message changes only with the count (no status
        write every second for a moving spare capacity)."""
        with self._lock:
            old = self._reports.get(key)
        if old is None or (old[2].wanted, old[2].allowed) != (current, current) or old[2].message.startswith(NO_SIGNAL):
            self._publish(key, name, namespace, LoadReport(current, current, why))

    def _up(
        self, model: Mapping[str, Any], key: str, label: str, current: int, decision: LoadDecision, now: float
    ) -> None:
        namespace, name = tr.name_of(model)
        wanted = current + 1
        with self._lock:
            blocked = self._blocked.get(key)
        if blocked and blocked[:2] == (wanted, current) and now - blocked[2] < self.settings.blocked_recheck_seconds:
            return  # refused moments ago: asked again after the recheck interval
        try:
            scale_model(self.kube, model, wanted)
        except ApiError as exc:
            if exc.status == 409:  # a request, a person or another loop changed the model: next pass
                return
            if exc.status not in (400, 403, 422):
                if exc.status != 404:
                    log.warning("%s: could not step up: %s", key, exc)
                return
            why = exc.webhook_denial or exc.message
            note = f"{label} wants {wanted}, budget allows {current}: {why}"
            with self._lock:
                changed = blocked is None or blocked[:2] != (wanted, current)
                self._blocked[key] = (wanted, current, now)
            if changed:  # once per count: the webhook's idle times change every second
                log.info("%s: %s", key, note)
                self._event(model, "Warning", "LoadScaleBlocked", "Scale", note)
                self._publish(key, name, namespace, LoadReport(wanted, current, note))
            return
        note = f"replicas {current} -> {wanted}: {decision.reason}"
        self._stepped(model, key, "LoadScaleUp", "ScaleUp", note, wanted)

    def _down(self, model: Mapping[str, Any], key: str, label: str, current: int, decision: LoadDecision) -> None:
        try:
            scale_model(self.kube, model, current - 1)
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("%s: could not step down: %s", key, exc)
            return
        self._stepped(
            model,
            key,
            "LoadScaleDown",
            "ScaleDown",
            f"replicas {current} -> {current - 1}: {decision.reason}",
            current - 1,
        )

    def _stepped(self, model: Mapping[str, Any], key: str, reason: str, action: str, note: str, replicas: int) -> None:
        namespace, name = tr.name_of(model)
        if self.metrics:
            self.metrics.writes.labels("InferenceModel/scale").inc()
        log.info("%s: load: %s", key, note)
        with self._lock:
            self._blocked.pop(key, None)
            self._state[key] = LoadState()
        self._event(model, "Normal", reason, action, note)
        self._publish(key, name, namespace, LoadReport(replicas, replicas, note))

    def _publish(self, key: str, name: str, namespace: str, report: LoadReport) -> None:
        """Keep the report for the gauges; a changed one is written to status by the next reconcile."""
        with self._lock:
            old = self._reports.get(key)
            self._reports[key] = (name, namespace, report)
        if old is None or old[2] != report:
            self.queue.add(key)

    def _event(self, model: Mapping[str, Any], event_type: EventType, reason: str, action: str, note: str) -> None:
        regarding = {"apiVersion": tr.API_VERSION, "kind": tr.KIND, **model}
        if self.recorder.emit(regarding, event_type, reason, action, note) and self.metrics:
            self.metrics.writes.labels("Event").inc()
