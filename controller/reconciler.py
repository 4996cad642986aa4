"""One reconcile of one InferenceModel: workload, idle scale-to-zero, status, Events.

Why this module exists: it is the thin I/O layer around the pure parts (translate, idle, status,
advice, guard). It reads only from the watch cache, writes only through :class:`controller.kube.Kube`
(fenced by leadership), writes nothing when nothing changed, and feeds its own writes back into the
cache so the next reconcile does not act on a stale copy. A bad spec becomes a condition and an Event,
never an exception; API errors propagate so the worker retries with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from budget import BudgetError, format_duration, parse_quantity
from budget.advice import ModelMemory
from budget.objects import LABEL_MODEL, model_from_inferencemodel, rfc3339
from budget.view import model_key
from controller import translate as tr
from controller.advice import recommend, status_advice
from controller.errors import SpecError
from controller.events import EventRecorder, EventType
from controller.guard import FightGuard, digest
from controller.idle import idle_verdict
from controller.kube import Kube
from controller.metrics import ControllerMetrics
from controller.observations import ObservationStore
from controller.queue import WorkQueue
from controller.settings import ReconcileSettings
from controller.status import (
    Advice,
    LoadReport,
    Observed,
    Problem,
    desired_status,
    live_pods,
    pending_pods,
    status_patch,
    with_times,
)
from kubeview.api import DEPLOYMENTS, INFERENCE_MODELS, SERVICES, ApiError

log = logging.getLogger(__name__)


class Cache(Protocol):
    """The part of ``kubeview.ClusterCache`` the reconciler uses."""

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None: ...
    def objects(self, kind: str) -> list[dict[str, Any]]: ...
    def apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None: ...
    def view(self) -> Any: ...


@dataclass
class _Outcome:
    """What reconciling the workload found."""

    deployment: Mapping[str, Any] | None = None
    problem: Problem | None = None


class Reconciler:
    """Reconciles models by key (`namespace/name`)."""

    def __init__(
        self,
        kube: Kube,
        cache: Cache,
        recorder: EventRecorder,
        queue: WorkQueue,
        settings: ReconcileSettings,
        *,
        observations: ObservationStore | None = None,
        metrics: ControllerMetrics | None = None,
        source_name: str = "none",
        clock: Callable[[], float] = time.time,
        load_report: Callable[[str], LoadReport | None] = lambda key: None,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.recorder = recorder
        self.queue = queue
        self.settings = settings
        self.observations = observations or ObservationStore()
        self.metrics = metrics
        self.source_name = source_name
        self.clock = clock
        self.load_report = load_report  # the load loop's word on a model, for its status (controller/load.py)
        self.guard = FightGuard()
        self._lock = threading.Lock()
        self._awake_since: dict[str, float] = {}
        self._service_checked: dict[str, tuple[str, float]] = {}
        self._blocked: dict[str, tuple[int, int]] = {}  # a warm start the webhook refused: (wanted, allowed)

    # ------------------------------------------------------------------ entry point

    def reconcile(self, key: str) -> None:
        """Bring one model's workload and status in line with its spec."""
        namespace, name = key.split("/", 1)
        model = self.cache.get("InferenceModel", namespace, name)
        if model is None:
            self.forget(key)
            return
        if (model.get("metadata") or {}).get("deletionTimestamp"):
            return  # the garbage collector removes what it owns
        self.observations.seed(key, model.get("status"))
        now = self.clock()
        workload = tr.Workload("none")
        outcome = _Outcome()
        desired = 0
        try:
            workload = tr.workload_of(model)
            tr.memory_text(model)
            desired = tr.desired_replicas(model)
        except SpecError as exc:
            outcome.problem = Problem(exc.reason, str(exc))
        if outcome.problem is None:
            outcome = self._reconcile_workload(model, workload)
        if outcome.problem is not None:
            action = "Scale" if outcome.problem.reason == "ScaleDenied" else "Reconcile"
            self._event(model, "Warning", outcome.problem.reason, action, outcome.problem.message)
        elif workload.managed:
            self._warm(model, key, now)
            self._idle(model, key, now)
        self._write_status(model, key, workload, desired, outcome, now)

    def forget(self, key: str) -> None:
        """Drop everything remembered about a deleted model."""
        with self._lock:
            self._awake_since.pop(key, None)
            self._service_checked.pop(key, None)
            self._blocked.pop(key, None)
        self.guard.forget(key)
        self.observations.forget(key)

    # ------------------------------------------------------------------ workload

    def _reconcile_workload(self, model: Mapping[str, Any], workload: tr.Workload) -> _Outcome:
        namespace, name = tr.name_of(model)
        try:
            if workload.mode == "template":
                deployment = self._apply_owned_deployment(model)
                self._ensure_service(model)
                return _Outcome(deployment)
            if workload.mode == "deploymentRef":
                return _Outcome(self._adopt(model, str(workload.deployment_name)))
            self._remove_owned(model)
            return _Outcome()
        except SpecError as exc:
            return _Outcome(None, Problem(exc.reason, str(exc)))
        except ApiError as exc:
            live = self.cache.get("Deployment", namespace, workload.deployment_name or name)
            if exc.denied_by_webhook:
                self.queue.add_rate_limited(model_key(namespace, name), base_seconds=5.0, max_seconds=120.0)
                return _Outcome(live, Problem("ScaleDenied", exc.message))
            if exc.status in (400, 422) or (exc.status == 500 and "unable to convert" in exc.message):
                # 500 "unable to convert unstructured object": the apply configuration does not decode
                # into a Deployment (a bad quantity, a string where a number belongs). Retrying cannot help.
                message = f"the API server rejected Deployment {workload.deployment_name}: {exc.message}"
                return _Outcome(live, Problem("InvalidTemplate", message))
            raise

    def _apply_deployment(
        self, model: Mapping[str, Any], live: Mapping[str, Any] | None, config: dict[str, Any]
    ) -> Mapping[str, Any] | None:
        """Apply `config` unless the live Deployment has it already or another writer keeps undoing it."""
        namespace, name = tr.name_of(model)
        dep_name = config["metadata"]["name"]
        if live is not None and tr.contains(live, config):
            return live
        guard_key = f"{namespace}/{dep_name}"
        config_digest = digest(config)
        generation = None if live is None else int((live.get("metadata") or {}).get("generation") or 0)
        verdict = self.guard.check(guard_key, config_digest, generation, self.clock())
        if not verdict.write:
            if verdict.hold_seconds > 0:
                managers = sorted(
                    {
                        str(m.get("manager"))
                        for m in ((live or {}).get("metadata") or {}).get("managedFields") or []
                        if m.get("manager") and m.get("manager") != tr.FIELD_MANAGER
                    }
                )
                note = (
                    f"another writer ({', '.join(managers) or 'unknown'}) keeps changing Deployment {dep_name} "
                    f"fields this controller owns; holding off for {format_duration(verdict.hold_seconds)}"
                )
                self._event(model, "Warning", "WriteConflict", "Apply", note)
                self.queue.add(model_key(namespace, name), verdict.hold_seconds)
            return live
        old_replicas = None if live is None else (live.get("spec") or {}).get("replicas", 1)
        result = self.kube.apply(DEPLOYMENTS.path(namespace, dep_name), config)
        self._count_write("Deployment")
        self.cache.apply("Deployment", "MODIFIED", result)
        self.guard.applied(guard_key, config_digest, int((result.get("metadata") or {}).get("generation") or 0))
        new_replicas = int(config["spec"]["replicas"])
        before = 0 if old_replicas is None else int(old_replicas)
        if new_replicas != before:
            reason, action = ("ScaledUp", "ScaleUp") if new_replicas > before else ("ScaledDown", "ScaleDown")
            self._event(model, "Normal", reason, action, f"Deployment {dep_name}: {before} -> {new_replicas} replicas")
        elif live is None:
            self._event(model, "Normal", "DeploymentCreated", "Create", f"Deployment {dep_name} created")
        return result

    def _apply_owned_deployment(self, model: Mapping[str, Any]) -> Mapping[str, Any] | None:
        namespace, name = tr.name_of(model)
        config = tr.desired_deployment(model, scheduler_name=self.settings.scheduler_name)
        live = self.cache.get("Deployment", namespace, name)
        if live is not None and not tr.controlled_by(live, model):
            raise SpecError(
                f"Deployment {name} already exists and is not owned by this InferenceModel: adopt it with "
                "spec.deploymentRef, or delete it",
                reason="DeploymentConflict",
            )
        return self._apply_deployment(model, live, config)

    def _adopt(self, model: Mapping[str, Any], dep_name: str) -> Mapping[str, Any] | None:
        namespace, _ = tr.name_of(model)
        live = self.cache.get("Deployment", namespace, dep_name)
        if live is None:
            raise SpecError(
                f"spec.deploymentRef names Deployment {dep_name}, which does not exist in namespace {namespace}",
                reason="DeploymentNotFound",
            )
        config = tr.adoption_config(model, live, scheduler_name=self.settings.scheduler_name)
        return self._apply_deployment(model, live, config)

    def _ensure_service(self, model: Mapping[str, Any]) -> None:
        """Apply the model's Service when its config changed or the resync interval passed."""
        namespace, name = tr.name_of(model)
        config = tr.desired_service(model)
        if config is None:
            return
        key = model_key(namespace, name)
        config_digest = digest(config)
        now = self.clock()
        with self._lock:
            checked = self._service_checked.get(key)
        if checked and checked[0] == config_digest and now - checked[1] < self.settings.resync_seconds:
            return
        live = self.kube.get(SERVICES.path(namespace, name))
        if live is not None and not tr.controlled_by(live, model):
            raise SpecError(
                f"Service {name} already exists and is not owned by this InferenceModel", reason="ServiceConflict"
            )
        if live is None or not tr.contains(live, config):
            self.kube.apply(SERVICES.path(namespace, name), config)
            self._count_write("Service")
        with self._lock:
            self._service_checked[key] = (config_digest, now)

    def _remove_owned(self, model: Mapping[str, Any]) -> None:
        """An external model (or one whose template was removed) owns no Deployment or Service."""
        namespace, name = tr.name_of(model)
        live = self.cache.get("Deployment", namespace, name)
        if live is not None and tr.controlled_by(live, model):
            self.kube.delete(DEPLOYMENTS.path(namespace, name))
            self._count_write("Deployment")
            self._event(model, "Normal", "DeploymentDeleted", "Delete", f"Deployment {name} removed: no template")
            svc = self.kube.get(SERVICES.path(namespace, name))
            if svc is not None and tr.controlled_by(svc, model):
                self.kube.delete(SERVICES.path(namespace, name))
        with self._lock:
            self._service_checked.pop(model_key(namespace, name), None)

    # ------------------------------------------------------------------ warm replicas (spec.minReplicas)

    def _warm(self, model: Mapping[str, Any], key: str, now: float) -> None:
        """Fewer replicas than spec.minReplicas: one more through /scale, where the webhook decides as for every
        scale-up; when it refuses, a Warning Event says how many are wanted and allowed, in its words why."""
        try:
            m = model_from_inferencemodel(model)
        except BudgetError:
            return  # the spec problem is reported by the reconcile itself
        if m.replicas >= m.min_replicas:
            with self._lock:
                self._blocked.pop(key, None)
            return
        name = m.model_name or m.name
        try:
            self._scale(model, m.replicas + 1)
        except ApiError as exc:
            if exc.status == 409:
                self.queue.add(key)
            elif exc.status in (400, 403, 422):  # the webhook (the budget) refused
                seen = (m.min_replicas, m.replicas)
                with self._lock:
                    changed = self._blocked.get(key) != seen
                    self._blocked[key] = seen
                if changed:  # once per count: the refusal's idle times change every second
                    why = exc.webhook_denial or exc.message
                    note = f"{name} wants {m.min_replicas}, budget allows {m.replicas}: {why}"
                    log.info("%s: %s", key, note)
                    self._event(model, "Warning", "WarmScaleBlocked", "Scale", note)
                self.queue.add(key, self.settings.warm_recheck_seconds)
            elif exc.status != 404:
                raise
            return
        self._count_write("InferenceModel/scale")
        note = f"minReplicas {m.min_replicas}: replicas {m.replicas} -> {m.replicas + 1}"
        log.info("%s: kept warm: %s", key, note)
        self._event(model, "Normal", "WarmScaleUp", "ScaleUp", note)
        self.queue.add(key)

    def _scale(self, model: Mapping[str, Any], replicas: int) -> None:
        scale_model(self.kube, model, replicas)

    # ------------------------------------------------------------------ idle scale-to-zero

    def _idle(self, model: Mapping[str, Any], key: str, now: float) -> None:
        try:
            m = model_from_inferencemodel(model)
        except BudgetError as exc:
            log.warning("%s: cannot judge idleness: %s", key, exc)
            return
        with self._lock:
            if m.replicas > 0:
                awake = self._awake_since.setdefault(key, now)
            else:
                self._awake_since.pop(key, None)
                return
        placements = [p for p in self.cache.view().placements if p.model == key]
        verdict = idle_verdict(m, placements, now, awake_since=awake)
        if not verdict.scale_to_zero:
            if verdict.recheck_in_seconds is not None:
                self.queue.add(key, verdict.recheck_in_seconds + 0.05)
            return
        try:
            self._scale(model, 0)
        except ApiError as exc:
            if exc.status == 409:
                log.info("%s: changed while scaling to zero; looking again", key)
                self.queue.add(key)
                return
            if exc.status == 404:
                return
            raise
        self._count_write("InferenceModel/scale")
        if self.metrics:
            self.metrics.scale_to_zero.inc()
        note = (
            f"no request for {format_duration(verdict.idle_for_seconds)} "
            f"(cooldownPeriod {format_duration(m.cooldown_seconds)}): replicas {m.replicas} -> 0"
        )
        log.info("%s: idle, scaling to zero: %s", key, note)
        self._event(model, "Normal", "IdleScaleDown", "ScaleDown", note)
        self.queue.add(key)

    # ------------------------------------------------------------------ status

    def _advice(self, model: Mapping[str, Any], key: str, now: float) -> Advice | None:
        spec = model.get("spec") or {}
        if spec.get("memory") is None:
            return None
        declared_text = str(spec["memory"])
        try:
            declared = parse_quantity(spec["memory"], field="spec.memory")
        except BudgetError:
            return None
        obs = self.observations.get(key)
        if obs is None:
            return status_advice(declared_text, None, None, None)
        name = tr.name_of(model)[1]
        adv = recommend(name, declared, obs.peak_bytes, self.settings.headroom_percent)
        if (
            adv is not None
            and adv.hint
            and self.observations.should_hint(
                key,
                adv.hint,
                now,
                every_seconds=self.settings.hint_every_seconds,
                min_gap_seconds=self.settings.hint_min_gap_seconds,
            )
        ):
            over = obs.peak_bytes > declared
            (log.warning if over else log.info)(adv.hint)
        return status_advice(declared_text, adv, obs.peak_bytes, obs.published)

    def _write_status(
        self,
        model: Mapping[str, Any],
        key: str,
        workload: tr.Workload,
        desired_replicas: int,
        outcome: _Outcome,
        now: float,
    ) -> None:
        namespace, name = tr.name_of(model)
        pods = [
            p
            for p in self.cache.objects("Pod")
            if (p.get("metadata") or {}).get("namespace") == namespace
            and ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_MODEL) == name
        ]
        alive = live_pods(pods)
        pending = pending_pods(alive)
        dep_status = ((outcome.deployment or {}).get("status") or {}) if workload.managed else {}
        observed = Observed(
            workload=workload,
            generation=int((model.get("metadata") or {}).get("generation") or 0),
            desired_replicas=desired_replicas,
            replicas=int(dep_status.get("replicas") or 0),
            ready_replicas=int(dep_status.get("readyReplicas") or 0),
            pods_total=len(alive),
            pending=tuple(pending),
            problem=outcome.problem,
            advice=self._advice(model, key, now),
            load=self.load_report(key) if _load_scaled(model) else None,
            clear_load=not _load_scaled(model),
        )
        for pod in pending:
            if pod.reason:
                self._event(model, "Warning", "PodUnschedulable", "Schedule", f"{pod.reason}: {pod.message}")
        current = model.get("status") or {}
        desired = with_times(desired_status(name, observed), current, now)
        patch = status_patch(current, desired)
        if patch is None:
            return
        try:
            result = self.kube.merge_patch(INFERENCE_MODELS.path(namespace, name, "status"), {"status": patch})
        except ApiError as exc:
            if exc.status == 404:  # deleted meanwhile; the watch will say so
                return
            raise
        self._count_write("InferenceModel/status")
        self.cache.apply("InferenceModel", "MODIFIED", result)
        log.debug("%s: status updated: %s", key, sorted(patch))

    # ------------------------------------------------------------------ helpers

    def _event(self, model: Mapping[str, Any], event_type: EventType, reason: str, action: str, note: str) -> None:
        regarding = {"apiVersion": tr.API_VERSION, "kind": tr.KIND, **model}
        if self.recorder.emit(regarding, event_type, reason, action, note):
            self._count_write("Event")

    def _count_write(self, kind: str) -> None:
        if self.metrics:
            self.metrics.writes.labels(kind).inc()

    # ------------------------------------------------------------------ read side for /metrics

    def memory_records(self) -> list[ModelMemory]:
        """Per-model declared/observed memory from the cache and this process's observations."""
        out = []
        for model in self.cache.objects("InferenceModel"):
            namespace, name = tr.name_of(model)
            key = model_key(namespace, name)
            spec = model.get("spec") or {}
            status = model.get("status") or {}
            declared = _quantity(spec.get("memory"))
            obs = self.observations.get(key)
            peak = obs.peak_bytes if obs else _quantity(status.get("observedPeakMemory"))
            adv = recommend(name, declared, peak, self.settings.headroom_percent) if declared and peak else None
            last = rfc3339(obs.last_observed) if obs and obs.last_observed else status.get("lastObservation")
            out.append(
                ModelMemory(
                    namespace=namespace,
                    name=name,
                    model_name=str(spec.get("modelName") or name),
                    declared_bytes=declared,
                    observed_peak_bytes=peak,
                    utilization_percent=adv.utilization_percent if adv else None,
                    recommended_bytes=adv.recommendation_bytes if adv else None,
                    recommendation=adv.recommendation if adv else status.get("recommendation"),
                    last_observation=last,
                    replicas=int(status.get("replicas") or 0),
                    ready_replicas=int(status.get("readyReplicas") or 0),
                    source=self.source_name,
                )
            )
        return out


def _load_scaled(model: Mapping[str, Any]) -> bool:
    """spec.maxReplicas > 1: the load loop reports on it (status.replicasWanted and the rest)."""
    high = (model.get("spec") or {}).get("maxReplicas", 1)
    return isinstance(high, int) and not isinstance(high, bool) and high > 1


def scale_model(kube: Kube, model: Mapping[str, Any], replicas: int) -> None:
    """PATCH /scale with the resourceVersion judged: 409 if a request (lastRequestTime) or a scale raced us.
    The admission webhook decides an increase with the budget; its refusal comes back as an ApiError."""
    rv = (model.get("metadata") or {}).get("resourceVersion")
    patch: dict[str, Any] = {"spec": {"replicas": replicas}}
    if rv:
        patch["metadata"] = {"resourceVersion": rv}
    namespace, name = tr.name_of(model)
    kube.merge_patch(INFERENCE_MODELS.path(namespace, name, "scale"), patch)


def _quantity(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return parse_quantity(value)
    except BudgetError:
        return None
