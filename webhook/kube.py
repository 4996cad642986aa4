"""The webhook's doors to the API server: the shared ConfigMap ledger, parent lookups, the live cache.

Why this module exists: the admission logic (:mod:`webhook.admit`) and the ledger rules
(:mod:`webhook.ledger`) are pure; everything here does I/O through :mod:`kubeview.api`, the one
Kubernetes API layer (raw JSON on a kubernetes ``ApiClient``; resources know their paths).

:class:`ConfigMapLedger` is ResourceQuota admission's pattern applied to memory: read the ledger with a
fresh GET (never the cache), decide, then PUT with the resourceVersion read; a 409 means another
admitter (thread, worker or replica) committed first, so re-read and re-decide, a bounded number of
times. A process-wide lock keeps threads of one worker from racing each other, so conflicts only come
from other processes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from budget.objects import LABEL_MODEL
from kubeview.api import CONFIGMAPS, DEPLOYMENTS, INFERENCE_MODELS, ApiError, request_json
from kubeview.cache import ClusterCache
from webhook.admit import LookupFailed
from webhook.ledger import (
    DEFAULT_PRUNE_GRACE_SECONDS,
    DEFAULT_TTL_SECONDS,
    Decide,
    LedgerBusy,
    LedgerEntry,
    LedgerUnavailable,
    Outcome,
    Reflected,
    decode,
    encode,
    live,
    merged,
    seconds_left,
)

log = logging.getLogger(__name__)

LEDGER_LABELS = {"app.kubernetes.io/name": "ibc-webhook", "app.kubernetes.io/component": "admission-ledger"}


def webhook_cache(api: Any, namespace: str | None = None) -> ClusterCache:
    """The cache the webhook needs: nodes, model pods, model Deployments, InferenceModels."""
    return ClusterCache(
        api,
        kinds=("Node", "Pod", "Deployment", "InferenceModel"),
        namespace=namespace,
        label_selectors={"Pod": LABEL_MODEL, "Deployment": LABEL_MODEL},
    )


class ApiLookup:
    """Parents of `/scale` requests: the cache first, then a GET (a just-created object may not be cached)."""

    def __init__(self, cache: ClusterCache, api: Any, *, timeout_seconds: float = 2.0) -> None:
        self.cache = cache
        self.api = api
        self.timeout_seconds = timeout_seconds

    def _get(self, what: str, path: str) -> Mapping[str, Any] | None:
        timeout = seconds_left(self.timeout_seconds)
        if timeout <= 0:
            raise LookupFailed(f"{what}: no time left before the API server's webhook timeout")
        try:
            obj = request_json(self.api, "GET", path, timeout=timeout)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise LookupFailed(f"{what}: {exc.status or 'unreachable'} {exc.message}") from exc
        return obj if isinstance(obj, dict) else None

    def inference_model(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        cached = self.cache.get("InferenceModel", namespace, name)
        if cached is not None:
            return cached
        return self._get(f"InferenceModel {namespace}/{name}", INFERENCE_MODELS.path(namespace, name))

    def deployment(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        cached = self.cache.get("Deployment", namespace, name)
        if cached is not None:
            return cached
        # The cache holds only labelled (model) Deployments: anything else is read by name.
        return self._get(f"Deployment {namespace}/{name}", DEPLOYMENTS.path(namespace, name))


class _Conflict(Exception):
    """The ledger changed since it was read (409): re-read and re-decide."""


class ConfigMapLedger:
    """The admission ledger in a ConfigMap, committed with optimistic concurrency before allowing."""

    mode = "configmap"

    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        prune_grace_seconds: float = DEFAULT_PRUNE_GRACE_SECONDS,
        max_attempts: int = 8,
        deadline_seconds: float = 3.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.ttl_seconds = ttl_seconds
        self.prune_grace_seconds = prune_grace_seconds
        self.max_attempts = max_attempts
        self.deadline_seconds = deadline_seconds
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._last_rv: str | None = None  # resourceVersion of this process's latest write
        self.path = CONFIGMAPS.path(namespace, name)

    def _timeout(self, deadline: float, attempt: int) -> float:
        """The time left before the transaction's deadline (at most 2 s a call): no call outlives it."""
        left = min(2.0, deadline - time.monotonic())
        if left <= 0:
            raise LedgerBusy("the admission deadline passed before the ledger answered", attempts=attempt)
        return left

    def read(self, timeout: float = 2.0) -> tuple[tuple[LedgerEntry, ...], str | None]:
        """All entries (expired too) and the resourceVersion; (), None when the ConfigMap does not exist."""
        try:
            obj = request_json(self.api, "GET", self.path, timeout=timeout)
        except ApiError as exc:
            if exc.status == 404:
                return (), None
            raise LedgerUnavailable(
                f"reading ConfigMap {self.namespace}/{self.name}: {exc.status or 'unreachable'} {exc.message}"
            ) from exc
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        return decode(obj.get("data")), str(rv) if rv else None

    def write(self, entries: tuple[LedgerEntry, ...], resource_version: str | None, timeout: float = 2.0) -> str:
        """Replace the ledger if it is still at `resource_version` (create it when None); _Conflict if not.

        Returns the new resourceVersion."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": LEDGER_LABELS},
            "data": encode(entries),
        }
        try:
            if resource_version is None:
                stored = request_json(self.api, "POST", CONFIGMAPS.path(self.namespace), body=body, timeout=timeout)
            else:
                body["metadata"]["resourceVersion"] = resource_version
                stored = request_json(self.api, "PUT", self.path, body=body, timeout=timeout)
        except ApiError as exc:
            if exc.status == 409:  # Conflict on PUT, AlreadyExists on POST: someone else wrote first
                raise _Conflict() from exc
            raise LedgerUnavailable(
                f"writing ConfigMap {self.namespace}/{self.name}: {exc.status or 'unreachable'} {exc.message}"
            ) from exc
        return str((stored.get("metadata") or {}).get("resourceVersion") or "") if isinstance(stored, dict) else ""

    def transact(self, decide: Decide, *, dry_run: bool, reflected: Reflected) -> Outcome:
        """Read and decide without the process lock (denials and dry runs never wait for it); take the lock
        only to commit, so the threads of one worker do not race each other's writes."""
        deadline = time.monotonic() + seconds_left(self.deadline_seconds)
        locked = False
        try:
            attempt = 0
            while True:
                attempt += 1
                entries, rv = self.read(self._timeout(deadline, attempt))
                now = self.clock()
                outcome = decide(live(entries, now), now)
                if outcome.commit is None or dry_run:
                    return replace(outcome, attempts=attempt)
                if not locked:
                    if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                        raise LedgerBusy("timed out waiting for this process's other admissions", attempts=attempt)
                    locked = True
                    if attempt == 1 and self._committed_since(rv):
                        continue  # a thread of this process wrote after our read: read again, under the lock
                new = merged(entries, outcome.commit, now, reflected, self.prune_grace_seconds)
                try:
                    self._last_rv = self.write(new, rv, self._timeout(deadline, attempt))
                    return replace(outcome, attempts=attempt)
                except _Conflict:
                    log.debug("admission ledger conflict on attempt %d for %s", attempt, outcome.commit.model)
                if attempt >= self.max_attempts or time.monotonic() >= deadline:
                    raise LedgerBusy(f"lost the ledger race {attempt} times", attempts=attempt)
                # Jittered exponential backoff (2, 4, 8 ... ms, at most 50 ms) spreads the racers apart.
                self.sleep(random.uniform(0.5, 1.0) * min(0.05, 0.001 * 2**attempt))
        finally:
            if locked:
                self._lock.release()

    def _committed_since(self, rv: str | None) -> bool:
        """True when this process wrote the ledger after reading it at `rv`: a PUT with `rv` would conflict.

        resourceVersions are opaque; etcd's are integers, and when they are not this only saves a round
        trip, so anything else answers False and lets the PUT find out."""
        last = self._last_rv
        if rv is None:
            return last is not None
        return bool(last and last.isdigit() and rv.isdigit() and int(last) > int(rv))

    def entries(self) -> tuple[LedgerEntry, ...]:
        return live(self.read()[0], self.clock())
