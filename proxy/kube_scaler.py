"""The Kubernetes Scaler: replicas come from InferenceModels' `/scale`, endpoints from ready model pods.

The proxy never decides alone in a cluster: a scale-up is a merge PATCH of `inferencemodels/<name>/scale`,
so the admission webhook answers with the same budget decision every other writer gets (a denial comes
back as a 403/429 whose message is the webhook's, and becomes :class:`ScaleDenied`). Everything the
request path reads per request (view, backends) comes from a list+watch cache and in-memory indexes
kept current by the cache's events, so the hot path never waits on the API server. Activity
(`status.lastRequestTime`, which drives idle scale-down) is written by a background thread, at most
once per model every `touch_interval_seconds`.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from budget import NEVER_REASONS, ClusterView, Decision, Model, UnknownModelError, decide_scale, parse_quantity
from budget.decide import DEFAULT_RETRY_AFTER_SECONDS, without
from budget.evict import Victim, evictable, plan_eviction
from budget.objects import LABEL_MODEL, rfc3339
from budget.quantity import format_duration
from kubeview.api import DEPLOYMENTS, EVENTS, INFERENCE_MODELS, ApiError, Kube
from kubeview.cache import ClusterCache
from kubeview.events import event_body
from proxy.evictions import BusySource, EvictionLog, nobody_busy
from proxy.scaler import ScaleDenied, ScalerUnavailable

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
# A stopping worker writes the activity not written yet within this long (gunicorn's graceful timeout is 30 s).
STOP_FLUSH_SECONDS = 5.0
# The longest a scale PATCH may take: the webhook behind it answers within its timeoutSeconds (5 s).
DEFAULT_REQUEST_TIMEOUT_SECONDS = 10.0
# How long a scale-up waits for the models stopped to make room to go away (their pods terminating).
DEFAULT_ROOM_TIMEOUT_SECONDS = 30.0
ROOM_POLL_SECONDS = 0.5  # ask the webhook again at least this often while room is being made
REPORTING_CONTROLLER = "inference.eh-ops.io/proxy"
KINDS = ("Node", "Pod", "Deployment", "InferenceModel")
# Container states that mean the replica will not become ready without someone fixing something.
FAILED_WAITING_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError", "InvalidImageName"}
)
_REASON_PREFIX = re.compile(r"^(?P<reason>[a-z][a-z_]*): (?P<rest>.*)$", re.S)
_RETRY_SUFFIX = re.compile(r"; retry after (?P<seconds>[0-9]+)s$")
_AVAILABLE = re.compile(r"; (?P<quantity>[0-9]+(?:[KMGTPE]i)?) available")


@dataclass(frozen=True)
class _Pod:
    """What routing needs from one model pod."""

    ip: str
    ready: bool
    failed: bool
    container_port: int | None


@dataclass(frozen=True)
class _ModelSpec:
    """What routing needs from one InferenceModel."""

    port: int
    backend_url: str | None
    ready_replicas: int
    desired_replicas: int


def _pod_info(obj: Mapping[str, Any]) -> _Pod:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions if isinstance(c, dict))
    ready = ready and not meta.get("deletionTimestamp") and status.get("phase") == "Running"
    failed = status.get("phase") == "Failed"
    for cs in status.get("containerStatuses") or []:
        waiting = ((cs or {}).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILED_WAITING_REASONS:
            failed = True
    port = None
    for container in spec.get("containers") or []:
        for p in (container or {}).get("ports") or []:
            if isinstance(p, dict) and isinstance(p.get("containerPort"), int):
                port = p["containerPort"]
                break
        if port is not None:
            break
    return _Pod(ip=str(status.get("podIP") or ""), ready=ready, failed=failed, container_port=port)


def _model_spec(obj: Mapping[str, Any]) -> _ModelSpec:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    port = spec.get("port", DEFAULT_PORT)
    backend = spec.get("backendUrl")
    ready = status.get("readyReplicas") or 0
    desired = spec.get("replicas", 1)
    return _ModelSpec(
        port=port if isinstance(port, int) and 0 < port < 65536 else DEFAULT_PORT,
        backend_url=backend.rstrip("/") if isinstance(backend, str) and backend else None,
        ready_replicas=ready if isinstance(ready, int) else 0,
        desired_replicas=desired if isinstance(desired, int) and not isinstance(desired, bool) else 1,
    )


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def denial_from(exc: ApiError) -> str | None:
    """The webhook's message when the API server refused a write because an admission webhook denied it."""
    if exc.status not in (400, 403, 409, 422, 429):
        return None
    return exc.webhook_denial


def denied_decision(
    local: Decision, webhook_message: str, default_retry_after_seconds: int, retry_after: int | None = None
) -> Decision:
    """The locally recomputed decision, refused, carrying the webhook's words (and its reason and retry hint:
    the message's "retry after Ns", else the apiserver's Retry-After header, as a busy webhook sends)."""
    message = webhook_message
    retry = local.retry_after_seconds
    suffix = _RETRY_SUFFIX.search(message)
    if suffix:
        retry = int(suffix.group("seconds"))
        message = message[: suffix.start()]
    elif retry_after is not None:
        retry = retry_after
    reason = local.reason if not local.allowed else "scale_denied"
    prefix = _REASON_PREFIX.match(message)
    if prefix:
        reason = prefix.group("reason")
        message = prefix.group("rest")
    available = local.available_bytes
    stated = _AVAILABLE.search(message)
    if stated:
        # The webhook saw more (admissions in flight): its figure, not our stale one, goes in the body.
        available = parse_quantity(stated.group("quantity"))
    return replace(
        local,
        allowed=False,
        reason=reason,
        message=message,
        available_bytes=available,
        # Waiting cannot help a request that never fits: no retry hint then.
        retry_after_seconds=retry if retry > 0 or reason in NEVER_REASONS else default_retry_after_seconds,
    )


class KubeScaler:
    """Implements :class:`proxy.scaler.Scaler` against the API server; every method is thread-safe."""

    def __init__(
        self,
        api: Any,
        *,
        namespace: str | None = None,
        cache: ClusterCache | None = None,
        touch_interval_seconds: float = 5.0,
        request_timeout_seconds: float = DEFAULT_REQUEST_TIMEOUT_SECONDS,
        default_retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.time,
        room_timeout_seconds: float = DEFAULT_ROOM_TIMEOUT_SECONDS,
        instance: str | None = None,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.cache = cache or ClusterCache(api, kinds=KINDS, namespace=namespace)
        self.touch_interval_seconds = touch_interval_seconds
        if touch_interval_seconds <= 0 or request_timeout_seconds <= 0:
            raise ValueError("touch_interval_seconds and request_timeout_seconds must be > 0")
        # A scale PATCH waits for the webhook (timeoutSeconds 5 s) and must end before the request that
        # asked for it gives up: the command line passes min(10 s, half the cold-start timeout).
        self.request_timeout_seconds = request_timeout_seconds
        self.default_retry_after_seconds = default_retry_after_seconds
        self._clock = clock
        self._kube = Kube(api, timeout_seconds=request_timeout_seconds)
        self._changed = threading.Condition()
        self._pods: dict[str, dict[str, _Pod]] = {}  # model key -> pod key -> info
        self._models: dict[str, _ModelSpec] = {}  # model key -> InferenceModel facts
        self._backends: dict[str, list[str]] = {}  # model key -> URLs (cache; dropped on change)
        self._touched: dict[str, float] = {}  # model key -> latest request time
        self._written: dict[str, float] = {}  # model key -> request time last written
        self._written_at: dict[str, float] = {}  # model key -> when it was written (monotonic)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.status_patches = 0
        self.room_timeout_seconds = room_timeout_seconds
        self.instance = instance or socket.gethostname()
        self.evictions = EvictionLog()
        self._busy_source: BusySource = nobody_busy
        self.cache.add_listener(self._on_event)
        for obj in self.cache.objects("InferenceModel"):
            self._on_event("InferenceModel", "ADDED", obj)
        for obj in self.cache.objects("Pod"):
            self._on_event("Pod", "ADDED", obj)

    # ----- lifecycle -----
    def start(self) -> KubeScaler:
        """Start the watches and the activity writer (call in each worker, after the fork)."""
        self.cache.start()
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="ibc-proxy-touch", daemon=True)
            self._flusher.start()
        return self

    def stop(self) -> None:
        """Stop the watches and the writer, then write the activity not written yet (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self.cache.stop()
        if self._flusher is not None:
            self._flusher.join(timeout=STOP_FLUSH_SECONDS)
            try:
                self.flush(force=True, deadline=time.monotonic() + STOP_FLUSH_SECONDS)
            except Exception as exc:  # the API server may be gone already
                log.warning("final lastRequestTime writes failed: %s", exc)

    def ready(self) -> bool:
        return self.cache.synced

    # ----- indexes kept by cache events -----
    def _on_event(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        name = meta.get("name")
        if kind == "Pod":
            label = (meta.get("labels") or {}).get(LABEL_MODEL)
            if not label or not name:
                return
            key = f"{namespace}/{label}"
            with self._changed:
                pods = self._pods.setdefault(key, {})
                if event_type == "DELETED":
                    pods.pop(name, None)
                else:
                    pods[name] = _pod_info(obj)
                self._backends.pop(key, None)
                self._changed.notify_all()
        elif kind == "InferenceModel" and name:
            key = f"{namespace}/{name}"
            with self._changed:
                if event_type == "DELETED":
                    self._models.pop(key, None)
                else:
                    self._models[key] = _model_spec(obj)
                self._backends.pop(key, None)
                self._changed.notify_all()

    def _compute_backends(self, key: str) -> list[str]:
        """Ready replicas' URLs: `spec.backendUrl` once a replica is ready, else `http://podIP:port` each."""
        spec = self._models.get(key)
        pods = self._pods.get(key, {})
        ready_ips = sorted({p.ip for p in pods.values() if p.ready and p.ip})
        if spec is not None and spec.backend_url:
            return [spec.backend_url] if ready_ips or spec.ready_replicas > 0 else []
        urls = []
        for ip in ready_ips:
            port = spec.port if spec is not None else None
            if port is None:
                port = next((p.container_port for p in pods.values() if p.ip == ip and p.container_port), None)
            urls.append(_url(ip, port or DEFAULT_PORT))
        return urls

    # ----- the Scaler protocol -----
    def view(self) -> ClusterView:
        return self.cache.view()

    def backends(self, model_key: str) -> list[str]:
        urls = self._backends.get(model_key)
        if urls is None:
            with self._changed:
                urls = self._compute_backends(model_key)
                self._backends[model_key] = urls
        return urls

    def details(self, model_key: str) -> dict[str, Any]:
        """The load layer's fields for `GET /v1/models` and `/status`, as local mode shows them: min and max from
        the spec, wanted/allowed and the last step or refusal from the status the controller writes."""
        model = self.cache.view().models.get(model_key)
        if model is None:
            return {}
        out: dict[str, Any] = {"minReplicas": model.min_replicas, "maxReplicas": model.max_replicas}
        namespace, name = model_key.split("/", 1)
        status = (self.cache.get("InferenceModel", namespace, name) or {}).get("status") or {}
        for field in ("replicasWanted", "replicasAllowed", "loadMessage"):
            if field in status:
                out[field] = status[field]
        return out

    def wait_backends(self, model_key: str, timeout_seconds: float) -> list[str]:
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            while True:
                urls = self._compute_backends(model_key)
                if urls:
                    return urls
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._changed.wait(remaining)

    def state(self, model_key: str) -> str:
        with self._changed:
            if self._compute_backends(model_key):
                return "ready"
            if any(p.failed for p in self._pods.get(model_key, {}).values()):
                return "failed"
        model = self.cache.view().models.get(model_key)
        return "starting" if model is not None and model.replicas > 0 else "stopped"

    def scale_up(self, model_key: str, replicas: int) -> None:
        """Ask for `replicas` through the webhook; when it refuses for memory, make room if policy allows:
        stop the cheapest set of idle models `budget.plan_eviction` names (each a conditional `/scale` to 0,
        with an Event on it), or wait for models already being stopped for someone else, and ask again.

        Bounded by `room_timeout_seconds`; the webhook still decides every scale-up, so two proxies racing
        for the same room cannot overcommit, and a victim's resourceVersion precondition means only one of
        them stops it (the other sees it stopping and waits instead of evicting more)."""
        namespace, _, name = model_key.partition("/")
        im = self.cache.get("InferenceModel", namespace, name)
        if im is not None and _model_spec(im).desired_replicas < replicas:
            self.evictions.forget(model_key)  # a new start: what was stopped for the last one is old news
        try:
            self._ask(model_key, replicas)
            return
        except ScaleDenied as exc:
            if exc.decision.reason != "insufficient_memory" or not self._has_policy(model_key):
                raise
            denied = exc
        deadline = time.monotonic() + self.room_timeout_seconds
        fits_tries = 0
        while True:
            acted = self._make_room(model_key, replicas)
            if acted is None:
                raise denied  # nothing is being stopped and nothing may be: the webhook's 429 stands
            if acted == "fits":
                fits_tries += 1  # fits as far as this proxy knows: ask once more; the webhook knows better
                if fits_tries > 1:
                    raise denied
            try:
                self._ask(model_key, replicas)
                return
            except ScaleDenied as exc:
                if exc.decision.reason != "insufficient_memory":
                    raise
                denied = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise denied
            with self._changed:  # a pod going away (or a model changing) is what can let the start fit
                self._changed.wait(min(remaining, ROOM_POLL_SECONDS))

    def can_make_room(self, model_key: str, replicas: int) -> bool:
        """Whether a start the budget refuses now would fit by evicting idle models, or once the models
        already being stopped to make room are gone (the proxy then asks `scale_up` instead of a 429)."""
        if not self._has_policy(model_key):
            return False
        now = self._clock()
        view, freeing = self._room_view(now)
        try:
            if freeing and decide_scale(without(view, freeing), model_key, replicas, now).allowed:
                return True
            plan = plan_eviction(without(view, freeing), model_key, replicas, now, busy=self._busy())
        except UnknownModelError:
            return False
        return plan is not None and bool(plan.victims)

    def note(self, model_key: str) -> str | None:
        """What was done to start the model (which models were stopped for it), for held streaming clients."""
        return self.evictions.note(model_key)

    def set_busy_source(self, source: BusySource) -> None:
        """Tell the scaler which backends serve requests and which models hold requests (never evicted)."""
        self._busy_source = source

    def _has_policy(self, model_key: str) -> bool:
        """Whether any model could ever be evicted (no `idleAfter` anywhere: no planning on the hot path)."""
        return any(
            m.evict_idle_after_seconds is not None and not m.pinned and m.key != model_key
            for m in self.cache.view().models.values()
        )

    def _busy(self) -> set[str]:
        """Models this worker serves (a request in flight or streaming) or holds requests for."""
        urls, held = self._busy_source()
        busy = set(held)
        if urls:
            in_flight = set(urls)
            with self._changed:
                for key in self._models:
                    if in_flight.intersection(self._compute_backends(key)):
                        busy.add(key)
        return busy

    def _room_view(self, now: float) -> tuple[ClusterView, set[str]]:
        """The view with this worker's latest requests as each model's last request (not all written yet),
        and the models being stopped: scaled to 0 while their pods still hold memory."""
        view = self.cache.view()
        touched = dict(self._touched)
        models = [
            replace(m, last_request_time=max(m.last_request_time or 0.0, touched[m.key]))
            if m.key in touched and touched[m.key] > (m.last_request_time or 0.0)
            else m
            for m in view.models.values()
        ]
        view = ClusterView.build(view.nodes, models, view.placements, view.reservations)
        holding = {p.model for p in view.placements}
        freeing = {m.key for m in view.models.values() if m.replicas == 0 and m.key in holding}
        return view, freeing

    def _make_room(self, model_key: str, replicas: int) -> Literal["evicted", "freeing", "fits"] | None:
        """One step: evict what the plan names, or wait for memory being freed, or ask again when the
        start fits as far as this proxy knows (a victim already gone); None when nothing can help."""
        now = self._clock()
        view, freeing = self._room_view(now)
        after = without(view, freeing)
        if freeing and decide_scale(after, model_key, replicas, now).allowed:
            return "freeing"  # someone's eviction (or a scale-down) frees enough: wait for it, evict nothing
        busy = self._busy()
        plan = plan_eviction(after, model_key, replicas, now, busy=busy)
        if plan is None:
            if not freeing:
                log.info(
                    "no eviction makes room for %s: evictable %s, busy %s",
                    model_key,
                    [v.describe() for v in evictable(after, model_key, now, busy=busy)] or "none",
                    sorted(busy) or "none",
                )
            return "freeing" if freeing else None
        if not plan.victims:
            return "freeing" if freeing else "fits"
        target = view.models[plan.decision.model_key]
        for victim in plan.victims:
            self._evict(victim, target, plan.message, now)
        return "evicted"

    def _evict(self, victim: Victim, target: Model, message: str, now: float) -> None:
        """Scale one victim to 0 if it is still what the plan saw (resourceVersion precondition): a 409 means
        someone changed it (another proxy evicted it, or a request was recorded): the next step re-plans."""
        namespace, _, name = victim.model.partition("/")
        for_label = target.model_name or target.name
        im = self.cache.get("InferenceModel", namespace, name)
        if im is None or _model_spec(im).desired_replicas == 0:
            return
        version = (im.get("metadata") or {}).get("resourceVersion")
        patch: dict[str, Any] = {"spec": {"replicas": 0}}
        if version:
            patch["metadata"] = {"resourceVersion": version}
        try:
            self._kube.merge_patch(INFERENCE_MODELS.path(namespace, name, "scale"), patch)
        except ApiError as exc:
            if exc.status == 409:
                log.info("%s changed before it could be stopped for %s; planning again", victim.model, for_label)
                return
            raise ScalerUnavailable(f"stopping {victim.name} to make room for {for_label} failed: {exc}") from exc
        note = f"stopped after {format_duration(victim.idle_for_seconds)} idle to make room for {for_label}"
        log.info("%s: %s", victim.model, note)
        target_key = next(
            (m.key for m in self.cache.view().models.values() if (m.model_name or m.name) == for_label), ""
        )
        self.evictions.record([victim.name], for_label, target_key, message)
        self._record_event(im, note, now)

    def _record_event(self, im: Mapping[str, Any], note: str, now: float) -> None:
        """An Event on the evicted model (`kubectl describe`); failing to write it is logged, not raised."""
        meta = im.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        regarding = {"apiVersion": im.get("apiVersion") or INFERENCE_MODELS.api_version, "kind": "InferenceModel"}
        body = event_body(
            {**regarding, "metadata": meta},
            reporting_controller=REPORTING_CONTROLLER,
            event_type="Normal",
            reason="Evicted",
            action="ScaleDown",
            note=note,
            instance=self.instance,
            now=now,
            name=f"{meta.get('name', 'model')}.{secrets.token_hex(8)}",
        )
        try:
            self._kube.create(EVENTS.path(namespace), body)
        except Exception as exc:  # the eviction happened; only its record is missing
            log.warning("the eviction Event on %s/%s was not written: %s", namespace, meta.get("name"), exc)

    def _ask(self, model_key: str, replicas: int) -> None:
        """PATCH the model's `/scale` to `replicas` unless it already asks for as many; the webhook decides."""
        namespace, _, name = model_key.partition("/")
        im = self.cache.get("InferenceModel", namespace, name)
        try:
            if im is not None:
                if _model_spec(im).desired_replicas >= replicas:
                    return
                path = INFERENCE_MODELS.path(namespace, name, "scale")
                self._kube.merge_patch(path, {"spec": {"replicas": replicas}})
            else:
                deployment = self._deployment_of(namespace, name)
                if deployment is None:
                    raise ScalerUnavailable(f"no InferenceModel or labelled Deployment for {model_key}")
                current = (deployment.get("spec") or {}).get("replicas", 1)
                if isinstance(current, int) and current >= replicas:
                    return
                path = DEPLOYMENTS.path(namespace, deployment["metadata"]["name"], "scale")
                self._kube.merge_patch(path, {"spec": {"replicas": replicas}})
        except ApiError as exc:
            webhook_message = denial_from(exc)
            if webhook_message is None:
                raise ScalerUnavailable(f"scaling {model_key} to {replicas} failed: {exc}") from exc
            log.info("scale-up of %s to %d denied: %s", model_key, replicas, webhook_message)
            raise ScaleDenied(self._denied(model_key, replicas, webhook_message, exc.retry_after_seconds)) from exc
        log.info("asked for %d replica(s) of %s", replicas, model_key)

    def _denied(self, model_key: str, replicas: int, webhook_message: str, retry_after: int | None = None) -> Decision:
        try:
            local = decide_scale(
                self.cache.view(),
                model_key,
                replicas,
                self._clock(),
                default_retry_after_seconds=self.default_retry_after_seconds,
            )
        except UnknownModelError as exc:
            raise ScalerUnavailable(f"{model_key} disappeared while scaling: {exc}") from exc
        return denied_decision(local, webhook_message, self.default_retry_after_seconds, retry_after)

    def _deployment_of(self, namespace: str, label: str) -> dict[str, Any] | None:
        for obj in self.cache.objects("Deployment"):
            meta = obj.get("metadata") or {}
            if meta.get("namespace") == namespace and (meta.get("labels") or {}).get(LABEL_MODEL) == label:
                return obj
        return None

    # ----- activity -----
    def touch(self, model_key: str, now: float) -> None:
        """Remember the request; the writer thread patches at most once per model per interval."""
        self._touched[model_key] = now
        written_at = self._written_at.get(model_key)
        if written_at is None or time.monotonic() - written_at >= self.touch_interval_seconds:
            self._wake.set()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(min(1.0, self.touch_interval_seconds))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except Exception:  # the writer must survive anything
                log.exception("writing lastRequestTime failed")

    def flush(self, *, force: bool = False, deadline: float | None = None) -> int:
        """Write every due `status.lastRequestTime` before `deadline` (monotonic; default: one touch
        interval from now, the writer's own period); returns how many were written."""
        if deadline is None:
            deadline = time.monotonic() + self.touch_interval_seconds
        written = 0
        for key, seen in list(self._touched.items()):
            left = min(self.request_timeout_seconds, deadline - time.monotonic())
            if left <= 0:
                log.warning("lastRequestTime writes left for later: out of time")
                break
            if seen <= self._written.get(key, float("-inf")):
                continue
            last = self._written_at.get(key)
            if not force and last is not None and time.monotonic() - last < self.touch_interval_seconds:
                continue
            namespace, _, name = key.partition("/")
            if self.cache.get("InferenceModel", namespace, name) is None:
                self._touched.pop(key, None)  # Deployment-only models have no status to write
                continue
            try:
                path = INFERENCE_MODELS.path(namespace, name, "status")
                self._kube.merge_patch(path, {"status": {"lastRequestTime": rfc3339(seen)}}, timeout=left)
            except ApiError as exc:
                if exc.status == 404:
                    self._touched.pop(key, None)
                    continue
                log.warning("lastRequestTime of %s not written: %s", key, exc)
                self._written_at[key] = time.monotonic()  # back off one interval
                continue
            self._written[key] = seen
            self._written_at[key] = time.monotonic()
            self.status_patches += 1
            written += 1
        return written
