"""The admission ledger: demand admitted but not yet visible in the objects, shared by every admitter.

Two admissions in flight do not see each other, and a watch cache lags the API server, so two scale-ups
that each fit alone could both be allowed and overcommit the pool. Upstream's ResourceQuota admission
solves this by committing the new usage to a shared object with optimistic concurrency *before*
allowing. We do the same: an admission reads the ledger, adds its unexpired entries to the view (a
model counts with max(spec.replicas, ledger replicas)), decides, and commits its own entry with the
resourceVersion it read; a conflict means someone else committed first, so it re-reads and re-decides.

This module holds the pure part (entries, their ConfigMap encoding, expiry and pruning) and
:class:`LocalLedger`, the in-process variant used with `--cluster-state` (offline, tests): a lock,
correct for one process only. The shared variant over a ConfigMap is :class:`webhook.kube.ConfigMapLedger`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from budget import ClusterView, Decision, Model
from webhook.review import Verdict

log = logging.getLogger(__name__)

# Long enough for the apiserver to persist the admitted write and for every cache to see it (normally
# milliseconds), short enough that a reservation whose write never happened (denied by a later webhook,
# a failed PATCH) does not hold memory for long.
DEFAULT_TTL_SECONDS = 60.0
# An entry the objects already reflect is kept this long anyway: another webhook process's cache may
# not have seen the new spec yet, and it relies on the entry until it does.
DEFAULT_PRUNE_GRACE_SECONDS = 10.0


# When the review being answered must be decided by (time.monotonic()); None outside a review. Set by the
# HTTP edge from the apiserver's `?timeout=` minus the time the review queued and a margin, read by every
# API call made for the review, so none of them outlives the apiserver's patience.
review_deadline: ContextVar[float | None] = ContextVar("review_deadline", default=None)


def seconds_left(cap: float) -> float:
    """The time an API call made now may take: at most `cap`, never past the review's deadline (<= 0: none)."""
    deadline = review_deadline.get()
    return cap if deadline is None else min(cap, deadline - time.monotonic())


class LedgerError(Exception):
    """Base of the ledger's failures; the app turns them into well-formed denials, never a 500."""


class LedgerBusy(LedgerError):
    """Every attempt lost the optimistic-concurrency race (409 Conflict): deny with "retry"."""

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class LedgerUnavailable(LedgerError):
    """The ledger object could not be read or written (API error, timeout, RBAC)."""


@dataclass(frozen=True)
class LedgerEntry:
    """Replicas admitted for one model and the memory they need, valid until `expires_at` (POSIX s)."""

    model: str  # model key, namespace/name
    replicas: int
    memory_bytes: int
    expires_at: float
    admitted_at: float
    node_selector: Mapping[str, str] = field(default_factory=dict)
    model_name: str = ""

    @property
    def namespace(self) -> str:
        return self.model.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.model.split("/", 1)[-1]


@dataclass(frozen=True)
class Outcome:
    """One decision inside a ledger transaction: the verdict and the entry to commit if allowed."""

    verdict: Verdict
    commit: LedgerEntry | None = None
    decision: Decision | None = None
    attempts: int = 1  # ledger reads it took (more than one: lost an optimistic-concurrency race)


Decide = Callable[[tuple[LedgerEntry, ...], float], Outcome]
Reflected = Callable[[LedgerEntry], bool]


class Ledger(Protocol):
    """Runs decide-then-commit atomically with respect to every other admitter sharing the ledger."""

    mode: str  # "configmap" or "in-process"

    def transact(self, decide: Decide, *, dry_run: bool, reflected: Reflected) -> Outcome:
        """Call decide(live_entries, now) (perhaps several times) and commit its entry unless dry_run."""
        ...

    def entries(self) -> tuple[LedgerEntry, ...]:
        """The live entries, for diagnostics and tests."""
        ...


# ----- ConfigMap encoding: data key per model, JSON value -----
def data_key(model_key: str) -> str:
    """ConfigMap data keys allow [-._a-zA-Z0-9]: `ns/name` becomes `ns.name` (namespaces have no dots)."""
    return model_key.replace("/", ".", 1)


def encode_entry(entry: LedgerEntry) -> str:
    value: dict[str, Any] = {
        "model": entry.model,
        "replicas": entry.replicas,
        "memory": entry.memory_bytes,
        "expires": round(entry.expires_at, 3),
        "admitted": round(entry.admitted_at, 3),
    }
    if entry.node_selector:
        value["nodeSelector"] = dict(entry.node_selector)
    if entry.model_name:
        value["modelName"] = entry.model_name
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def encode(entries: Iterable[LedgerEntry]) -> dict[str, str]:
    """The ConfigMap `data` for a set of entries."""
    return {data_key(e.model): encode_entry(e) for e in entries}


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def decode_entry(text: str) -> LedgerEntry:
    """One data value back into an entry; ValueError names what is wrong."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("entry must be a JSON object")
    model = value.get("model")
    if not isinstance(model, str) or "/" not in model:
        raise ValueError(f"model must be namespace/name, got {model!r}")
    selector = value.get("nodeSelector") or {}
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise ValueError("nodeSelector must map strings to strings")
    name = value.get("modelName") or ""
    return LedgerEntry(
        model=model,
        replicas=_int(value.get("replicas"), "replicas"),
        memory_bytes=_int(value.get("memory"), "memory"),
        expires_at=_float(value.get("expires"), "expires"),
        admitted_at=_float(value.get("admitted", 0.0), "admitted"),
        node_selector=selector,
        model_name=name if isinstance(name, str) else "",
    )


def decode(data: Mapping[str, Any] | None) -> tuple[LedgerEntry, ...]:
    """Entries from ConfigMap `data`; a malformed value is logged and skipped (only this code writes it)."""
    out = []
    for key, text in (data or {}).items():
        try:
            if not isinstance(text, str):
                raise ValueError("value must be a string")
            out.append(decode_entry(text))
        except ValueError as exc:
            log.warning("ignoring malformed admission ledger entry %r: %s", key, exc)
    return tuple(sorted(out, key=lambda e: e.model))


def live(entries: Iterable[LedgerEntry], now: float) -> tuple[LedgerEntry, ...]:
    """Entries not expired at `now`."""
    return tuple(e for e in entries if e.expires_at > now)


def merged(
    entries: Iterable[LedgerEntry],
    commit: LedgerEntry | None,
    now: float,
    reflected: Reflected,
    prune_grace_seconds: float = DEFAULT_PRUNE_GRACE_SECONDS,
) -> tuple[LedgerEntry, ...]:
    """The entries to write back: expired and long-reflected ones dropped, `commit` added (max replicas).

    An entry for the committed model keeps the larger replica count: a concurrent admission for the
    same object may still land with it, and every other admitter must keep counting it.
    """
    kept: dict[str, LedgerEntry] = {}
    for e in live(entries, now):
        if reflected(e) and now - e.admitted_at >= prune_grace_seconds:
            continue
        kept[e.model] = e
    if commit is not None:
        previous = kept.get(commit.model)
        if previous is not None and previous.replicas > commit.replicas:
            commit = replace(commit, replicas=previous.replicas)
        kept[commit.model] = commit
    return tuple(sorted(kept.values(), key=lambda e: e.model))


def view_with_entries(view: ClusterView, entries: Iterable[LedgerEntry], now: float) -> ClusterView:
    """The view with admitted demand added: replicas = max(spec, ledger); unseen models appear."""
    models = dict(view.models)
    changed = False
    for e in live(entries, now):
        existing = models.get(e.model)
        if existing is None:
            models[e.model] = Model(
                namespace=e.namespace,
                name=e.name,
                memory_bytes=e.memory_bytes,
                model_name=e.model_name or e.name,
                node_selector=dict(e.node_selector),
                cooldown_seconds=0.0,
                replicas=e.replicas,
                source="ledger",
            )
            changed = True
        elif e.replicas > existing.replicas:
            models[e.model] = replace(existing, replicas=e.replicas)
            changed = True
    return replace(view, models=models) if changed else view


class LocalLedger:
    """The in-process ledger for `--cluster-state` mode: one lock serializes decide+commit.

    Correct only for a single process (one gunicorn worker, any number of threads): several processes
    or replicas each have their own lock and would not see each other. Live clusters use the
    ConfigMap ledger.
    """

    mode = "in-process"

    def __init__(
        self,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        prune_grace_seconds: float = DEFAULT_PRUNE_GRACE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.prune_grace_seconds = prune_grace_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: tuple[LedgerEntry, ...] = ()
        self.commits = 0

    def transact(self, decide: Decide, *, dry_run: bool, reflected: Reflected) -> Outcome:
        with self._lock:
            now = self.clock()
            outcome = decide(live(self._entries, now), now)
            if outcome.commit is not None and not dry_run:
                self._entries = merged(self._entries, outcome.commit, now, reflected, self.prune_grace_seconds)
                self.commits += 1
            return outcome

    def entries(self) -> tuple[LedgerEntry, ...]:
        with self._lock:
            return live(self._entries, self.clock())
