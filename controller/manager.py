"""The running controller: watch cache, leader election, workers, resync, observation, metrics server.

Why this module exists: it wires the parts together and owns their threads. Every replica keeps a
warm cache and serves metrics; only the leader reconciles, scales and writes. Nothing is acted upon
before the cache has listed every kind, so a restarted controller starts from the whole truth and
converges without flapping (it writes nothing when nothing changed).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from budget.objects import LABEL_MODEL
from budget.view import model_key
from controller import translate as tr
from controller.errors import ControllerError, NotLeader, ObservationError
from controller.events import EventRecorder
from controller.kube import Kube
from controller.leader import LeaderElector, default_identity
from controller.load import LoadLoop
from controller.metrics import ControllerMetrics, MetricsSettings, create_app
from controller.observations import ObservationStore
from controller.observe import MemorySource, MetricsApiSource, NoSource, PrometheusSource
from controller.queue import WorkQueue
from controller.reconciler import Reconciler
from controller.settings import ControllerSettings
from kubeview import ApiError, ClusterCache, load_api_client
from serving.metrics import MemoryCollector, ReplicasCollector
from serving.runner import ThreadedServer, serve_in_thread

log = logging.getLogger(__name__)

KINDS = ("InferenceModel", "Deployment", "Pod")
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_lease_namespace(settings: ControllerSettings) -> str:
    """The configured one, else the pod's own namespace in-cluster, else --namespace, else `default`."""
    if settings.leader.lease_namespace:
        return settings.leader.lease_namespace
    if IN_CLUSTER_NAMESPACE.exists():
        return IN_CLUSTER_NAMESPACE.read_text().strip()
    return settings.namespace or "default"


def make_source(settings: ControllerSettings, kube: Kube) -> MemorySource:
    """The observed-memory source the flags ask for."""
    obs = settings.observe
    if obs.source == "prometheus":
        return PrometheusSource(obs.prometheus_url, obs.prometheus_query)
    if obs.source == "metrics-api":
        return MetricsApiSource(kube)
    return NoSource()


class Controller:
    """One controller process; ``run()`` blocks until ``stop()``."""

    def __init__(
        self, settings: ControllerSettings, *, api_client: Any = None, source: MemorySource | None = None
    ) -> None:
        self.settings = settings
        self.api = api_client if api_client is not None else load_api_client(settings.kubeconfig)
        self.identity = settings.leader.identity or default_identity()
        self.registry = CollectorRegistry()
        self.metrics = ControllerMetrics(self.registry)
        self.cache = ClusterCache(self.api, kinds=KINDS, namespace=settings.namespace)
        self.queue = WorkQueue()
        self._leading = threading.Event()
        lead = settings.leader
        self.elector: LeaderElector | None = None
        if lead.enabled:
            lease_ns = default_lease_namespace(settings)
            self.elector = LeaderElector(Kube(self.api), lease_ns, lead.lease_name, self.identity, lead.timings)
        self.kube = Kube(self.api, may_write=self.may_write, write_seconds_left=self.write_seconds_left)
        self.source = source or make_source(settings, Kube(self.api))
        self.observations = ObservationStore(settings.observe.publish_every_seconds)
        self.recorder = EventRecorder(self.kube, self.identity)
        self.load = LoadLoop(self.kube, self.cache, self.recorder, self.queue, settings.load, metrics=self.metrics)
        self.reconciler = Reconciler(
            self.kube,
            self.cache,
            self.recorder,
            self.queue,
            settings.reconcile,
            observations=self.observations,
            metrics=self.metrics,
            source_name=self.source.name,
            load_report=self.load.report,
        )
        self.registry.register(MemoryCollector(self.reconciler.memory_records))
        self.registry.register(ReplicasCollector(self.load.gauge_rows))
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        self._refs: dict[tuple[str, str], set[str]] = {}  # (namespace, deployment) -> models referencing it
        self._refs_lock = threading.Lock()
        self._stop = threading.Event()
        self._session: threading.Event | None = None
        self._threads: list[threading.Thread] = []
        self._observe_errors: dict[str, float] = {}
        self.server: ThreadedServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        if self.settings.metrics_bind:
            app = create_app(
                MetricsSettings(
                    models=self.reconciler.memory_records,
                    registry=self.registry,
                    ready=lambda: self.cache.synced,
                    leader=self.may_write,
                )
            )
            self.server = serve_in_thread(app, self.settings.metrics_bind, access_log=False, name="metrics-http")
            log.info("metrics and model memory served on %s", self.server.url)
        self.cache.add_listener(self._on_event)
        self.cache.start()
        t0 = last_warning = time.monotonic()
        while not self.cache.wait_synced(timeout=0.5):
            if self._stop.is_set():
                return self._shutdown()
            if time.monotonic() - last_warning >= 10:
                last_warning = time.monotonic()
                log.warning("still waiting for the first list of %s (%.0fs)", ", ".join(KINDS), last_warning - t0)
        log.info("cache synced in %.2fs: %d models", time.monotonic() - t0, len(self.cache.objects("InferenceModel")))
        if self.elector is not None:
            self.elector.run(self._start_leading, self._stop_leading, self._stop)
        else:
            self._start_leading()
            self._stop.wait()
            self._stop_leading()
        return self._shutdown()

    def write_seconds_left(self) -> float:
        """How long this replica may still write: until the lease's renew deadline (forever without one)."""
        if not self._leading.is_set():
            return 0.0
        return math.inf if self.elector is None else self.elector.write_seconds_left()

    def may_write(self) -> bool:
        """Leading, and (with leader election) renewed less than the renew deadline ago."""
        return self.write_seconds_left() > 0

    def stop(self) -> None:
        """Ask `run()` to return (signal handlers call this)."""
        self._stop.set()

    def _shutdown(self) -> int:
        self.cache.stop()
        self.load.close()
        if self.server is not None:
            self.server.stop()
        close = getattr(self.source, "close", None)
        if close:
            close()
        log.info("controller stopped")
        return 0

    def _start_leading(self) -> None:
        session = threading.Event()
        self._session = session
        self._leading.set()
        self.metrics.leader.set(1)
        self.enqueue_all()
        threads = [
            threading.Thread(target=self._worker, args=(session,), name=f"reconcile-{i}", daemon=True)
            for i in range(max(1, self.settings.workers))
        ]
        threads.append(threading.Thread(target=self._resync, args=(session,), name="resync", daemon=True))
        if self.source.name != "none":
            threads.append(threading.Thread(target=self._observe_loop, args=(session,), name="observe", daemon=True))
        if self.settings.load.interval_seconds > 0:
            threads.append(threading.Thread(target=self.load.run, args=(session,), name="load", daemon=True))
        for t in threads:
            t.start()
        self._threads = threads
        log.info("leading: reconciling %d models", len(self.cache.objects("InferenceModel")))

    def _stop_leading(self) -> None:
        self._leading.clear()
        self.metrics.leader.set(0)
        if self._session is not None:
            self._session.set()
        for t in self._threads:
            t.join(timeout=35)
        self._threads = []
        self.load.reset()

    # ------------------------------------------------------------------ threads

    def _worker(self, session: threading.Event) -> None:
        while not session.is_set():
            key = self.queue.get(timeout=0.5)
            if key is None:
                continue
            t0 = time.perf_counter()
            try:
                self.reconciler.reconcile(key)
                self.queue.forget(key)
                self.metrics.reconciles.labels("ok").inc()
            except NotLeader:
                self.metrics.reconciles.labels("not_leader").inc()
            except (ControllerError, ApiError) as exc:
                delay = self.queue.add_rate_limited(key)
                self.metrics.reconciles.labels("error").inc()
                log.warning("reconcile %s failed (retry in %.0fs): %s", key, delay, exc)
            except Exception:  # a bug must not stop the controller; retry with backoff
                delay = self.queue.add_rate_limited(key)
                self.metrics.reconciles.labels("error").inc()
                log.exception("reconcile %s crashed (retry in %.0fs)", key, delay)
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - t0)
                self.queue.done(key)

    def _resync(self, session: threading.Event) -> None:
        while not session.wait(self.settings.reconcile.resync_seconds):
            self.enqueue_all()

    def _observe_loop(self, session: threading.Event) -> None:
        interval = self.settings.observe.interval_seconds
        while not session.is_set():
            self.observe_once()
            session.wait(interval)

    def observe_once(self) -> None:
        """Measure every managed model's running pods once; enqueue models whose status should change."""
        pods_by_model: dict[str, list[str]] = {}
        for pod in self.cache.objects("Pod"):
            meta = pod.get("metadata") or {}
            label = (meta.get("labels") or {}).get(LABEL_MODEL)
            if label and (pod.get("status") or {}).get("phase") == "Running" and not meta.get("deletionTimestamp"):
                pods_by_model.setdefault(model_key(str(meta.get("namespace")), label), []).append(str(meta["name"]))
        for model in self.cache.objects("InferenceModel"):
            namespace, name = tr.name_of(model)
            key = model_key(namespace, name)
            pods = sorted(pods_by_model.get(key, []))
            if not pods:
                continue
            try:
                used = self.source.observe(namespace, name, pods)
            except ObservationError as exc:
                self.metrics.observation_errors.labels(self.source.name).inc()
                self._log_observe_error(str(exc))
                continue
            if used and self.observations.record(key, max(used.values()), time.time()):
                self.queue.add(key)

    def _log_observe_error(self, text: str) -> None:
        now = time.monotonic()
        if now - self._observe_errors.get(text, -1e9) >= 600:
            self._observe_errors[text] = now
            log.warning("observed memory (%s): %s", self.source.name, text)

    # ------------------------------------------------------------------ events -> keys

    def enqueue_all(self) -> None:
        for model in self.cache.objects("InferenceModel"):
            self.queue.add(model_key(*tr.name_of(model)))

    def _on_event(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> None:
        """Map a watch event to the model keys it concerns."""
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        if kind == "InferenceModel":
            key = model_key(namespace, str(meta.get("name")))
            self._index_ref(key, obj, deleted=event_type == "DELETED")
            self.queue.add(key)
            return
        label = (meta.get("labels") or {}).get(LABEL_MODEL)
        if label:
            self.queue.add(model_key(namespace, label))
        if kind == "Deployment":
            for ref in meta.get("ownerReferences") or []:
                if ref.get("kind") == tr.KIND:
                    self.queue.add(model_key(namespace, str(ref.get("name"))))
            with self._refs_lock:
                keys = list(self._refs.get((namespace, str(meta.get("name"))), ()))
            for key in keys:
                self.queue.add(key)

    def _index_ref(self, key: str, model: Mapping[str, Any], *, deleted: bool) -> None:
        """Remember which Deployment a model adopts, so that Deployment's events reach the model."""
        ref = ((model.get("spec") or {}).get("deploymentRef") or {}) if not deleted else {}
        target = ref.get("name") if isinstance(ref, Mapping) else None
        namespace = key.split("/", 1)[0]
        with self._refs_lock:
            for keys in self._refs.values():
                keys.discard(key)
            if isinstance(target, str) and target:
                self._refs.setdefault((namespace, target), set()).add(key)
