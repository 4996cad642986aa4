"""The webhook's HTTP edge: `POST /validate` (AdmissionReview v1), `GET /livez`, `/readyz`, `/metrics`.

Every review gets a well-formed answer with its uid echoed: a decision, a 400 deny for a malformed
object, a 429 "retry" when the ledger stays contended or the cache has not synced, a 503 when the
ledger cannot be reached. Only a body with no uid to echo (not JSON, not an AdmissionReview) gets a
plain HTTP 400 JSON error. The decision itself is :mod:`webhook.admit`; the race-free commit is the
:class:`webhook.ledger.Ledger` handed in (the ConfigMap ledger live, an in-process lock offline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from flask import Flask, Response, request

from budget import BudgetError, ClusterView, parse_duration
from budget.objects import LABEL_MODEL
from serving.http import add_json_errors, add_metrics, add_probes, json_response
from webhook.admit import BUSY_CODE, Classifier, Demand, LookupFailed, ObjectLookup, decide
from webhook.ledger import Ledger, LedgerBusy, LedgerEntry, LedgerUnavailable, Outcome, review_deadline
from webhook.metrics import Metrics
from webhook.review import (
    AdmissionRequest,
    MalformedReview,
    ReviewError,
    Verdict,
    denied,
    parse_review,
    review_response,
)
from webhook.settings import WebhookSettings

log = logging.getLogger(__name__)

QUEUED_ENV = "ibc.queued_seconds"  # set by serving.runner's worker: how long the request waited for a thread


def apiserver_timeout(value: str | None, default: float) -> float:
    """The apiserver's `?timeout=5s` (its webhook timeoutSeconds, rounded up to whole seconds), else `default`."""
    if not value:
        return default
    try:
        seconds = parse_duration(value, field="timeout")
    except BudgetError:
        return default
    return seconds if 0 < seconds <= 30 else default  # the API allows 1..30 s


class ViewSource(Protocol):
    """Where the budget view comes from: `kubeview.ClusterCache` live, or one filled from a snapshot."""

    @property
    def synced(self) -> bool: ...

    def view(self) -> ClusterView: ...

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None: ...


class CacheLookup:
    """Parents of `/scale` requests from the cache only (offline mode and tests)."""

    def __init__(self, source: ViewSource) -> None:
        self.source = source

    def inference_model(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.source.get("InferenceModel", namespace, name)

    def deployment(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.source.get("Deployment", namespace, name)


def _error(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """The webhook's plain-HTTP error body (for requests that are not a review): message and status."""
    return json_response({"error": message, "code": status}, status, headers)


class Admitter:
    """Classify, decide on the view plus the ledger, commit: one review in, one Verdict out."""

    def __init__(
        self,
        settings: WebhookSettings,
        source: ViewSource,
        ledger: Ledger,
        lookup: ObjectLookup,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.source = source
        self.ledger = ledger
        self.metrics = metrics
        self.classifier = Classifier(lookup, warn_over_ratio=settings.warn_over_ratio)
        self.clock: Callable[[], float] = time.time  # observation times, compared with ledger admissions
        self._observed: dict[str, list[tuple[float, int]]] = {}
        self._observed_lock = threading.Lock()

    def _reflected(self, entry: LedgerEntry) -> bool:
        """True when the cached objects already ask for at least the entry's replicas."""
        model = self.source.view().models.get(entry.model)
        return model is not None and model.replicas >= entry.replicas

    def observe(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        """Cache listener: remember when this process saw each model ask for how many replicas."""
        if event_type == "DELETED" or kind not in ("InferenceModel", "Deployment"):
            return
        meta = obj.get("metadata") or {}
        name = meta.get("name") if kind == "InferenceModel" else (meta.get("labels") or {}).get(LABEL_MODEL)
        replicas = (obj.get("spec") or {}).get("replicas", 1)
        if not isinstance(name, str) or not isinstance(replicas, int):
            return
        key = f"{meta.get('namespace') or 'default'}/{name}"
        now = self.clock()
        horizon = now - self.settings.ledger_ttl_seconds
        with self._observed_lock:
            seen = [o for o in self._observed.get(key, []) if o[0] >= horizon]
            seen.append((now, replicas))
            self._observed[key] = seen

    def _seen_reflected(self, entry: LedgerEntry) -> bool:
        """Has this process's cache shown the entry's replicas since it was admitted? Then the spec rules.

        From that moment the object's own replicas are the truth: a later scale-down frees the memory at
        once instead of after the entry's TTL. A process whose cache has not caught up still counts the
        entry, which is what the ledger is for.
        """
        if self._reflected(entry):
            return True
        with self._observed_lock:
            return any(t >= entry.admitted_at and r >= entry.replicas for t, r in self._observed.get(entry.model, []))

    def admit(self, req: AdmissionRequest) -> Verdict:
        """The verdict for one parsed review; never raises for bad input or a busy ledger."""
        try:
            result = self.classifier.classify(req)
            if isinstance(result, Verdict):
                if result.reason == "unknown_model":  # a fresh model this worker's cache has not seen yet
                    return self._retry(result.code, result.reason, result.message)
                return result
            return self._decide(req, result)
        except ReviewError as exc:
            return denied(400, "invalid_object", exc.message)
        except BudgetError as exc:
            return denied(400, "invalid_object", str(exc))
        except LookupFailed as exc:
            return self._retry(503, "lookup_failed", f"the budget webhook cannot read {exc}; retry")

    def _retry(self, code: int, reason: str, message: str) -> Verdict:
        """A denial that asks the client to come back: the apiserver sends it with Retry-After."""
        return denied(code, reason, message, retry_after_seconds=self.settings.busy_retry_after_seconds)

    def busy(self, queued_seconds: float, timeout_seconds: float) -> Verdict:
        """The answer when no decision can be made before the apiserver's timeout."""
        return self._retry(
            BUSY_CODE,
            "busy",
            f"admission is busy: this review waited {queued_seconds:.1f}s for the budget webhook "
            f"(the API server waits {timeout_seconds:g}s); retry",
        )

    def _decide(self, req: AdmissionRequest, demand: Demand) -> Verdict:
        if self.settings.require_synced and not self.source.synced:
            return self._retry(BUSY_CODE, "not_synced", "the budget webhook has not synced its cluster view yet; retry")

        def attempt(entries: tuple[LedgerEntry, ...], now: float) -> Outcome:
            return decide(
                demand,
                self.source.view(),
                tuple(e for e in entries if not self._seen_reflected(e)),
                now,
                deny_code=self.settings.deny_code,
                ttl_seconds=self.settings.ledger_ttl_seconds,
            )

        try:
            outcome = self.ledger.transact(attempt, dry_run=req.dry_run, reflected=self._reflected)
        except LedgerBusy as exc:
            self.metrics.ledger_conflicts.inc(exc.attempts)
            log.warning("%s: ledger busy after %d attempts", demand.what, exc.attempts)
            return self._retry(
                BUSY_CODE,
                "busy",
                f"admission is busy: {exc.attempts} concurrent scale-ups changed the budget ledger while "
                "this one was decided, or the API server's timeout came near; retry",
            )
        except LedgerUnavailable as exc:
            log.error("%s: admission ledger unavailable: %s", demand.what, exc)
            return self._retry(
                503, "ledger_unavailable", f"the budget webhook cannot reach its admission ledger: {exc}"
            )
        if outcome.attempts > 1:
            self.metrics.ledger_conflicts.inc(outcome.attempts - 1)
        verdict = outcome.verdict
        log.log(
            logging.INFO if outcome.commit or not verdict.allowed else logging.DEBUG,
            "%s: %s (%s)%s",
            demand.what,
            "allowed" if verdict.allowed else "denied",
            verdict.reason,
            " [dry run]" if req.dry_run else "",
            extra={"uid": req.uid, "dry_run": req.dry_run, "attempts": outcome.attempts},
        )
        return verdict


def create_app(
    settings: WebhookSettings,
    source: ViewSource,
    ledger: Ledger,
    *,
    lookup: ObjectLookup | None = None,
    metrics: Metrics | None = None,
) -> Flask:
    """The webhook app: one admitter and one metrics registry per app (per worker process)."""
    app = Flask("webhook")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    metrics = metrics or Metrics()
    admitter = Admitter(settings, source, ledger, lookup or CacheLookup(source), metrics)
    app.extensions["ibc_webhook"] = admitter
    add_listener = getattr(source, "add_listener", None)
    if add_listener is not None:
        add_listener(admitter.observe)

    add_json_errors(app, _error, service="webhook", max_body_bytes=settings.max_request_bytes)
    add_probes(
        app,
        lambda: None if not settings.require_synced or source.synced else "the cluster view has not synced yet",
        lambda: {"ledger": ledger.mode},
    )
    add_metrics(app, metrics.registry)

    @app.post("/validate")
    def validate() -> Response:
        started = time.perf_counter()
        queued = float(request.environ.get(QUEUED_ENV) or 0.0)
        metrics.queue_seconds.observe(queued)
        timeout = apiserver_timeout(request.args.get("timeout"), settings.default_timeout_seconds)
        deadline = time.monotonic() - queued + timeout - settings.answer_margin_seconds
        length = request.content_length
        if length is not None and length > settings.max_request_bytes:
            limit = settings.max_request_bytes
            return _error(413, "request_too_large", f"request body is {length} bytes; the limit is {limit} bytes")
        body = request.get_data(cache=False)
        try:
            req = parse_review(body)
        except MalformedReview as exc:
            if not exc.uid:
                metrics.bad_requests.inc()
                log.info("refused a body that is not an AdmissionReview: %s", exc.message)
                return _error(400, "bad_request", exc.message)
            metrics.reviews.labels("unknown", "denied", "malformed").inc()
            answer = denied(400, "malformed", f"malformed AdmissionReview: {exc}")
            return json_response(review_response(exc.uid, answer))
        token = review_deadline.set(deadline)
        try:
            if time.monotonic() >= deadline:
                log.warning("%s: queued %.2fs of the API server's %gs: busy", req.target, queued, timeout)
                verdict = admitter.busy(queued, timeout)
            else:
                verdict = admitter.admit(req)
        except Exception as exc:  # a bug must still produce an answer the apiserver can read
            log.exception("unexpected error reviewing %s", req.target)
            verdict = denied(500, "internal_error", f"internal error in the inference budget webhook: {exc!r}")
        finally:
            review_deadline.reset(token)
        if verdict.reason == "lookup_failed" and time.monotonic() >= deadline:
            verdict = admitter.busy(queued, timeout)
        resource = req.resource + (f"/{req.sub_resource}" if req.sub_resource else "")
        metrics.reviews.labels(resource, "allowed" if verdict.allowed else "denied", verdict.reason).inc()
        response = json_response(review_response(req.uid, verdict))
        metrics.review_seconds.labels(resource).observe(time.perf_counter() - started)
        return response

    @app.get("/debug/ledger")
    def ledger_() -> Response:
        now = time.time()
        try:
            entries = ledger.entries()
        except LedgerUnavailable as exc:
            return _error(503, "ledger_unavailable", str(exc))
        return json_response(
            {
                "mode": ledger.mode,
                "entries": [
                    {
                        "model": e.model,
                        "replicas": e.replicas,
                        "memoryBytes": e.memory_bytes,
                        "expiresInSeconds": round(e.expires_at - now, 3),
                    }
                    for e in entries
                ],
            }
        )

    return app

