"""The admission ledger: entry encoding, expiry and pruning, and the ConfigMap ledger's optimistic
concurrency against an in-memory stand-in for the API server (resourceVersion checks, 409s).

What a user would notice: two admitters sharing one ledger never both admit memory that only one of
them can have; a lost race is decided again with the winner's reservation counted; a ledger that
stays contended or unreachable denies rather than allows; a dry run writes nothing.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from budget import ClusterView, Model, Node
from webhook.admit import Demand, decide
from webhook.kube import ConfigMapLedger
from webhook.ledger import (
    LedgerBusy,
    LedgerEntry,
    LedgerUnavailable,
    LocalLedger,
    Outcome,
    data_key,
    decode,
    encode,
    merged,
    view_with_entries,
)
from webhook.review import allowed

pytestmark = pytest.mark.unit

GI = 2**30
NOW = 1_800_000_000.0
POOL = {"pool": "gpu"}


def entry(model: str, replicas: int, *, memory_gi: int = 16, expires_in: float = 60, age: float = 0,
          selector: dict[str, str] | None = None) -> LedgerEntry:
    return LedgerEntry(model, replicas, memory_gi * GI, NOW + expires_in, NOW - age, selector or POOL, "")


def view(free_gi: int = 48, **models: int) -> ClusterView:
    return ClusterView.build(
        nodes=[Node("n1", POOL, free_gi * GI, "annotation")],
        models=[Model("default", name, 16 * GI, name, POOL, 600.0, replicas) for name, replicas in models.items()],
    )


# ----- encoding -----
def test_entries_round_trip_through_configmap_data():
    entries = (entry("default/a", 2, selector={"pool": "gpu", "zone": "x"}), entry("team-b/b.v2", 1, memory_gi=60))
    data = encode(entries)
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", k) for k in data)  # valid ConfigMap data keys
    assert data_key("team-b/b.v2") == "team-b.b.v2"
    decoded = decode(data)
    assert [(e.model, e.replicas, e.memory_bytes, dict(e.node_selector)) for e in decoded] == [
        ("default/a", 2, 16 * GI, {"pool": "gpu", "zone": "x"}),
        ("team-b/b.v2", 1, 60 * GI, POOL),
    ]
    assert json.loads(data["default.a"])["replicas"] == 2


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("[]", id="not-object"),
        pytest.param('{"model": "nons", "replicas": 1, "memory": 1, "expires": 1}', id="bad-key"),
        pytest.param('{"model": "a/b", "replicas": -1, "memory": 1, "expires": 1}', id="negative"),
        pytest.param('{"model": "a/b", "replicas": 1, "memory": "16Gi", "expires": 1}', id="memory-string"),
        pytest.param('{"model": "a/b", "replicas": 1, "memory": 1}', id="no-expiry"),
        pytest.param('{"model": "a/b", "replicas": 1, "memory": 1, "expires": 1, "nodeSelector": [1]}',
                     id="selector-type"),
    ],
)
def test_malformed_entries_are_skipped_not_fatal(value):
    good = encode([entry("default/a", 1)])
    assert [e.model for e in decode({**good, "bad": value})] == ["default/a"]


# ----- expiry, pruning, merging -----
def test_merge_drops_expired_and_keeps_the_larger_reservation():
    entries = (entry("default/old", 1, expires_in=-1), entry("default/a", 3))
    out = merged(entries, entry("default/a", 2), NOW, reflected=lambda e: False)
    assert [(e.model, e.replicas) for e in out] == [("default/a", 3)]


@pytest.mark.parametrize(
    ("age", "reflected", "kept"),
    [
        pytest.param(30, True, False, id="reflected-and-settled-is-pruned"),
        pytest.param(1, True, True, id="reflected-but-recent-is-kept-for-lagging-caches"),
        pytest.param(30, False, True, id="not-reflected-is-kept-until-expiry"),
    ],
)
def test_merge_prunes_reflected_entries_after_the_grace(age, reflected, kept):
    out = merged((entry("default/a", 2, age=age),), entry("default/b", 1), NOW, reflected=lambda e: reflected,
                 prune_grace_seconds=10)
    assert ("default/a" in {e.model for e in out}) is kept


def test_view_counts_ledger_replicas_and_unseen_models():
    v = view_with_entries(view(a=1), (entry("default/a", 3), entry("other/new", 2, memory_gi=8),
                                      entry("default/gone", 5, expires_in=-1)), NOW)
    assert v.models["default/a"].replicas == 3
    assert (v.models["other/new"].replicas, v.models["other/new"].memory_bytes) == (2, 8 * GI)
    assert "default/gone" not in v.models
    lower = view_with_entries(view(a=4), (entry("default/a", 1),), NOW)
    assert lower.models["default/a"].replicas == 4


# ----- a stand-in API server for one ConfigMap -----
@dataclass
class _Raw:
    data: bytes

    def release_conn(self) -> None:
        pass


@dataclass
class _Resp:
    status: int
    reason: str
    response: _Raw


@dataclass
class FakeApi:
    """Just enough of a kubernetes ApiClient and an API server: one ConfigMap with resourceVersions."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    rv: int = 100
    fail_with: int = 0
    before_write: Any = None  # called before each PUT/POST: another admitter sneaking in
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def param_serialize(self, method, path, query_params=None, header_params=None, body=None, auth_settings=None):
        return method, path, header_params, body, []

    def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        if method in ("PUT", "POST") and self.before_write is not None:
            self.before_write(self)
        with self.lock:
            self.calls.append(method)
            if self.fail_with:
                raise ApiException(status=self.fail_with, reason="Forbidden")
            if method == "GET":
                obj = self.objects.get(url)
                if obj is None:
                    return _Resp(404, "Not Found", _Raw(b'{"kind":"Status","message":"not found"}'))
                return _Resp(200, "OK", _Raw(json.dumps(obj).encode()))
            if method == "POST":
                path = f"{url}/{body['metadata']['name']}"
                if path in self.objects:
                    return _Resp(409, "Conflict", _Raw(b'{"message":"already exists"}'))
                return self._store(path, body, 201)
            if method == "PUT":
                current = self.objects.get(url)
                if current is None or current["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]:
                    return _Resp(409, "Conflict", _Raw(b'{"message":"the object has been modified"}'))
                return self._store(url, body, 200)
            raise AssertionError(method)

    def _store(self, path: str, body: dict[str, Any], status: int) -> _Resp:
        self.rv += 1
        obj = json.loads(json.dumps(body))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[path] = obj
        return _Resp(status, "OK", _Raw(json.dumps(obj).encode()))

    def ledger_data(self) -> dict[str, str]:
        return next(iter(self.objects.values()))["data"]


def configmap_ledger(api: FakeApi, **kwargs: Any) -> ConfigMapLedger:
    kwargs.setdefault("sleep", lambda _s: None)
    return ConfigMapLedger(api, "ibc-system", "ibc-admission-ledger", clock=lambda: NOW, **kwargs)


def demand(name: str, replicas: int = 1, memory_gi: int = 30) -> Demand:
    model = Model("default", name, memory_gi * GI, name, POOL, 600.0, 0)
    return Demand(model, 0, replicas, f"scale {name}")


def decider(d: Demand, v: ClusterView, calls: list[tuple[str, ...]] | None = None):
    def run(entries: tuple[LedgerEntry, ...], now: float) -> Outcome:
        if calls is not None:
            calls.append(tuple(e.model for e in entries))
        return decide(d, v, entries, now)

    return run


def never_reflected(_e: LedgerEntry) -> bool:
    return False


def test_first_commit_creates_the_configmap_and_the_next_admission_sees_it():
    api = FakeApi()
    ledger = configmap_ledger(api)
    first = ledger.transact(decider(demand("x"), view()), dry_run=False, reflected=never_reflected)
    second = ledger.transact(decider(demand("y"), view()), dry_run=False, reflected=never_reflected)
    assert first.verdict.allowed and first.attempts == 1
    assert not second.verdict.allowed  # 30Gi + 30Gi > 48Gi although no object shows x yet
    assert "18Gi available" in second.verdict.message
    assert set(api.ledger_data()) == {"default.x"}
    assert api.calls == ["GET", "POST", "GET"]  # a denial writes nothing


def test_dry_run_reads_but_never_writes():
    api = FakeApi()
    outcome = configmap_ledger(api).transact(decider(demand("x"), view()), dry_run=True, reflected=never_reflected)
    assert outcome.verdict.allowed and outcome.commit is not None
    assert api.calls == ["GET"]
    assert api.objects == {}


def test_lost_race_is_decided_again_with_the_winners_reservation():
    """Between our read and our write another replica commits y (30Gi): we re-read and now deny x."""
    api = FakeApi()

    def sneak(server: FakeApi) -> None:
        server.before_write = None
        other = configmap_ledger(server)
        other.transact(decider(demand("y"), view()), dry_run=False, reflected=never_reflected)

    api.before_write = sneak
    seen: list[tuple[str, ...]] = []
    outcome = configmap_ledger(api).transact(decider(demand("x"), view(), seen), dry_run=False,
                                             reflected=never_reflected)
    assert seen == [(), ("default/y",)]
    assert outcome.attempts == 2
    assert not outcome.verdict.allowed
    assert set(api.ledger_data()) == {"default.y"}


def test_lost_race_still_admits_when_both_fit():
    api = FakeApi()

    def sneak(server: FakeApi) -> None:
        server.before_write = None
        configmap_ledger(server).transact(decider(demand("y", memory_gi=10), view()), dry_run=False,
                                          reflected=never_reflected)

    api.before_write = sneak
    outcome = configmap_ledger(api).transact(decider(demand("x"), view()), dry_run=False, reflected=never_reflected)
    assert outcome.verdict.allowed and outcome.attempts == 2
    assert set(api.ledger_data()) == {"default.x", "default.y"}


def test_endless_conflicts_end_in_busy_not_in_an_allow():
    api = FakeApi()
    api.objects["/api/v1/namespaces/ibc-system/configmaps/ibc-admission-ledger"] = {
        "metadata": {"name": "ibc-admission-ledger", "resourceVersion": "1"}, "data": {}}

    def bump(server: FakeApi) -> None:
        for obj in server.objects.values():
            obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)

    api.before_write = bump
    with pytest.raises(LedgerBusy) as info:
        configmap_ledger(api, max_attempts=4).transact(decider(demand("x"), view()), dry_run=False,
                                                       reflected=never_reflected)
    assert info.value.attempts == 4
    assert api.calls.count("PUT") == 4


def test_unreachable_ledger_is_unavailable():
    api = FakeApi(fail_with=403)
    with pytest.raises(LedgerUnavailable, match="reading ConfigMap ibc-system/ibc-admission-ledger: 403"):
        configmap_ledger(api).transact(decider(demand("x"), view()), dry_run=False, reflected=never_reflected)


def test_expired_reservations_are_not_counted_and_are_dropped_on_the_next_write():
    api = FakeApi()
    stale = encode([entry("default/y", 1, memory_gi=30, expires_in=-5)])
    api.objects["/api/v1/namespaces/ibc-system/configmaps/ibc-admission-ledger"] = {
        "metadata": {"name": "ibc-admission-ledger", "resourceVersion": "7"}, "data": stale}
    outcome = configmap_ledger(api).transact(decider(demand("x"), view()), dry_run=False, reflected=never_reflected)
    assert outcome.verdict.allowed
    assert set(api.ledger_data()) == {"default.x"}


@pytest.mark.parametrize("admitters", [pytest.param(1, id="one-process"), pytest.param(4, id="four-processes")])
def test_many_concurrent_admitters_never_overcommit(admitters):
    """20 threads over N ledgers (N processes) sharing one ConfigMap: 16Gi each into 48Gi -> exactly 3."""
    api = FakeApi()
    ledgers = [configmap_ledger(api, max_attempts=50) for _ in range(admitters)]
    results: list[bool] = []
    barrier = threading.Barrier(20)

    def run(i: int) -> None:
        barrier.wait()
        outcome = ledgers[i % admitters].transact(decider(demand(f"m{i}", memory_gi=16), view()), dry_run=False,
                                                  reflected=never_reflected)
        results.append(outcome.verdict.allowed)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 3
    assert len(api.ledger_data()) == 3


def test_local_ledger_commit_and_dry_run():
    ledger = LocalLedger(clock=lambda: NOW)
    outcome = ledger.transact(lambda entries, now: Outcome(allowed("fits"), entry("default/a", 1)), dry_run=True,
                              reflected=never_reflected)
    assert outcome.verdict.allowed and ledger.entries() == ()
    ledger.transact(lambda entries, now: Outcome(allowed("fits"), entry("default/a", 1)), dry_run=False,
                    reflected=never_reflected)
    assert [e.model for e in ledger.entries()] == ["default/a"]


def test_a_denial_does_not_wait_for_a_commit_in_progress():
    """Reads and denials run beside a commit holding the process lock; only commits queue for it."""
    api = FakeApi()
    ledger = configmap_ledger(api, deadline_seconds=0.5)
    ledger._lock.acquire()  # a slow commit of another thread
    try:
        started = time.monotonic()
        outcome = ledger.transact(decider(demand("huge", memory_gi=100), view()), dry_run=False,
                                  reflected=never_reflected)
        assert not outcome.verdict.allowed
        assert time.monotonic() - started < 0.25
        with pytest.raises(LedgerBusy):  # a commit waits, and gives up at the deadline with "busy"
            ledger.transact(decider(demand("x"), view()), dry_run=False, reflected=never_reflected)
    finally:
        ledger._lock.release()
