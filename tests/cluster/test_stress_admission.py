"""Stress on the real admission path: 60 concurrent scale PATCHes and a SIGKILLed webhook, behind a real
kube-apiserver, never admit more memory than the pool has.

Why here (tests/cluster) and marked ``stress``: these need the control plane of the cluster tier (its
conftest builds it and provides the fixtures) and they are fault and concurrency runs, so they belong to
both tiers (`-m stress` and `-m cluster` each select them). Two `ibc webhook` processes (two gunicorn
workers each, the shipped RBAC identity) share the ConfigMap ledger; every webhook of the shipped
configuration is registered once per process with a matchCondition on the object's name, so concurrent
scale-ups of different models race across processes and workers (see tests/cluster/test_webhook.py).
The ledger TTL is 5 s here so "nothing leaked after the TTL" is observable within the test.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.harness import ControlPlane, ManagedProcess, free_port, wait_for
from tests.cluster.test_webhook import (
    CONFIG_NAME,
    DEPLOY,
    GROUP,
    LEDGER,
    PLURAL,
    VERSION,
    WEBHOOK_NS,
    WEBHOOK_USER,
    _install_crd,
    _kubectl_ok,
    delete_ledger,
    inference_model,
    webhook_configuration,
)

pytestmark = pytest.mark.stress

GI = 2**30
TTL_SECONDS = 5.0
CAPACITY_GI = 100
MODEL_GI = 16


@dataclass
class Pair:
    """The two webhook processes, restartable."""

    procs: list[ManagedProcess]
    ports: list[int]
    ca: Path

    def ready(self, i: int) -> bool:
        import ssl
        import urllib.request

        self.procs[i].check_alive()
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.ports[i]}/readyz", context=ctx, timeout=2) as resp:
            return b'"status":"ready"' in resp.read()

    def kill9(self, i: int) -> None:
        """SIGKILL the process and its workers (a crashed pod)."""
        os.killpg(self.procs[i].pid, 9)
        assert self.procs[i].popen is not None
        self.procs[i].popen.wait(10)

    def restart(self, i: int) -> None:
        self.procs[i].start(env=_env())
        wait_for(lambda: self.ready(i), timeout=60, interval=0.1, message=f"webhook {i} ready again")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


@pytest.fixture(scope="module")
def pair(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    cp = control_plane
    _install_crd(cp)
    if cp.kubectl("get", "namespace", WEBHOOK_NS).returncode != 0:
        _kubectl_ok(cp, "create", "namespace", WEBHOOK_NS)
    _kubectl_ok(cp, "apply", "-f", str(DEPLOY / "serviceaccount.yaml"), "-f", str(DEPLOY / "rbac.yaml"))
    kubeconfig = cp.write_user_kubeconfig(WEBHOOK_USER)
    work = tmp_path_factory.mktemp("stress-webhook")
    issued_cert, issued_key, ca = cp.issue_serving_cert(["localhost"], ["127.0.0.1"])
    cert, key = work / "tls.crt", work / "tls.key"
    shutil.copy(issued_cert, cert)
    shutil.copy(issued_key, key)
    ports = [free_port(), free_port()]
    procs = []
    for name, port in zip(("a", "b"), ports, strict=True):
        argv = [
            sys.executable,
            "-m",
            "ibc",
            "--log-level",
            "INFO",
            "webhook",
            "--bind",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--kubeconfig",
            str(kubeconfig),
            "--workers",
            "2",
            "--threads",
            "4",
            "--ledger-namespace",
            WEBHOOK_NS,
            "--ledger-name",
            LEDGER,
            "--ledger-ttl",
            str(TTL_SECONDS),
        ]
        procs.append(ManagedProcess(f"stress-webhook-{name}", argv, work / f"webhook-{name}.log").start(env=_env()))
    hooks = Pair(procs, ports, ca)
    try:
        for i in (0, 1):
            wait_for(lambda i=i: hooks.ready(i), timeout=60, interval=0.2, message=f"webhook {i} ready")
        _kubectl_ok(cp, "apply", "-f", "-", input=json.dumps(webhook_configuration(ports, ca.read_bytes())))
        yield hooks
    finally:
        cp.kubectl("delete", "validatingwebhookconfiguration", CONFIG_NAME, "--ignore-not-found")
        for proc in procs:
            tail = proc.log_tail(30)
            proc.stop()
            print(f"--- {proc.name} log tail ---\n{tail}")
        delete_ledger(cp)


def create_models(k8s_client: Any, namespace: str, count: int) -> list[str]:
    """`count` 16Gi models at 0 replicas (creates pass the webhook too: retried if it timed out)."""
    custom = client.CustomObjectsApi(k8s_client)
    names = [f"s-{i:02d}" for i in range(count)]

    def create(name: str) -> None:
        for attempt in range(5):
            try:
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, inference_model(name, f"{MODEL_GI}Gi", 0, namespace)
                )
                return
            except ApiException as exc:
                if exc.status != 500 or attempt == 4:
                    raise
                time.sleep(0.5)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(create, names))
    return names


def stored_replicas(k8s_client: Any, namespace: str) -> dict[str, int]:
    items = client.CustomObjectsApi(k8s_client).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    return {o["metadata"]["name"]: int(o["spec"].get("replicas", 0)) for o in items["items"]}


def live_ledger(k8s_client: Any, namespace: str, now: float) -> dict[str, dict[str, Any]]:
    cm = client.CoreV1Api(k8s_client).read_namespaced_config_map(LEDGER, WEBHOOK_NS)
    entries = {k: json.loads(v) for k, v in (cm.data or {}).items() if k.startswith(f"{namespace}.")}
    return {k: e for k, e in entries.items() if e["expires"] > now}


class Admitted:
    """Polls what the API server stored (the admitted desired replicas); records any overcommit.

    The ledger's raw entries are not checked against the node: an entry stops counting once a webhook
    process saw the spec reach it (so a scale-down frees memory at once), but stays in the ConfigMap
    until its TTL, so their sum may legitimately exceed the node.
    """

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self.api = cp.api_client()
        self.namespace = namespace
        self.violations: list[str] = []
        self.peak_gi = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Admitted:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.api.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stored = sum(stored_replicas(self.api, self.namespace).values()) * MODEL_GI
            except Exception:  # a busy apiserver's error or a dropped connection: sample again (not in a spin)
                self._stop.wait(0.05)
                continue
            self.samples += 1
            self.peak_gi = max(self.peak_gi, stored)
            if stored > CAPACITY_GI:
                self.violations.append(f"{stored}Gi of {MODEL_GI}Gi replicas stored on a {CAPACITY_GI}Gi node")
            self._stop.wait(0.05)


def scale(custom: Any, namespace: str, name: str, replicas: int) -> str:
    """PATCH the scale subresource; 'admitted', or the refusal as 'status: message'."""
    try:
        custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}
        )
        return "admitted"
    except ApiException as exc:
        message = json.loads(exc.body).get("message", "") if exc.body else str(exc)
        retry = (exc.headers or {}).get("Retry-After")
        return f"{exc.status}: {message}" + (f" [Retry-After {retry}]" if retry else "")


def explained(outcome: str) -> bool:
    """A refusal the user can act on: no room (with the numbers), or retry (with Retry-After) because the
    webhook is busy or one of its workers has not yet seen a model created a moment before (under load)."""
    retry = ("admission is busy", "is not known to the budget webhook yet")
    return (
        outcome.startswith("403: ")
        and "denied the request: insufficient_memory: s-" in outcome
        and "available" in outcome
    ) or (outcome.startswith("429: ") and any(r in outcome for r in retry) and outcome.endswith("[Retry-After 1]"))


def timed_out(outcome: str) -> bool:
    """The apiserver gave up on the webhook (timeoutSeconds): the user reads only "failed calling webhook".
    A running webhook answers "busy, retry" before that happens; only a dead one (the SIGKILL test) causes it."""
    return outcome.startswith("500: ") and "failed calling webhook" in outcome


def test_60_concurrent_scale_ups_across_two_webhook_processes_never_overcommit(
    pair: Pair, control_plane: ControlPlane, node_factory: Any, namespace: str, k8s_client: Any
) -> None:
    node_factory(f"{namespace}-n1", capacity=f"{CAPACITY_GI}Gi", labels={"ibc.test/pool": namespace})
    names = create_models(k8s_client, namespace, 60)
    wanted = {n: random.choice([1, 1, 1, 2, 3]) for n in names}
    barrier = threading.Barrier(len(names))
    outcomes: dict[str, str] = {}

    def one(name: str) -> None:
        api = control_plane.api_client()
        try:
            barrier.wait()
            outcomes[name] = scale(client.CustomObjectsApi(api), namespace, name, wanted[name])
        finally:
            api.close()

    with Admitted(control_plane, namespace) as watch:
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        samples = watch.samples
        wait_for(lambda: watch.samples >= samples + 2, timeout=30, interval=0.05, message="two samples after")
    stored = stored_replicas(k8s_client, namespace)
    admitted = [n for n, o in outcomes.items() if o == "admitted"]
    kinds = Counter(o.split(":", 1)[0] for o in outcomes.values())
    print(
        f"60-way race: {dict(kinds)}; {sum(stored.values()) * MODEL_GI}Gi admitted of {CAPACITY_GI}Gi; "
        f"{watch.samples} samples, peak {watch.peak_gi}Gi"
    )
    assert len(outcomes) == 60
    assert watch.violations == [], watch.violations[:5]
    assert sum(stored.values()) * MODEL_GI <= CAPACITY_GI
    assert {n for n, r in stored.items() if r} == set(admitted)
    assert all(stored[n] == wanted[n] for n in admitted)
    assert admitted, "nothing was admitted"
    refused = [o for o in outcomes.values() if o != "admitted"]
    assert [o for o in refused if timed_out(o)] == [], "the apiserver timed out on the webhook"
    assert all(explained(o) for o in refused), [o for o in refused if not explained(o)][:3]
    # The pool is nearly full: a refused model could not have fitted at the end.
    assert (CAPACITY_GI - sum(stored.values()) * MODEL_GI) < MODEL_GI * 3


def test_a_webhook_process_killed_under_load_recovers_and_its_promises_expire(
    pair: Pair, control_plane: ControlPlane, node_factory: Any, namespace: str, k8s_client: Any
) -> None:
    node_factory(f"{namespace}-n1", capacity=f"{CAPACITY_GI}Gi", labels={"ibc.test/pool": namespace})
    names = create_models(k8s_client, namespace, 20)
    to_a = [n for n in names if n[-1] in "02468"]  # the shard process 0 answers
    stop = threading.Event()
    results: list[tuple[float, float, str, str]] = []  # (sent, answered, model, outcome)
    lock = threading.Lock()

    def load(seed: int) -> None:
        rng = random.Random(seed)
        api = control_plane.api_client()
        custom = client.CustomObjectsApi(api)
        try:
            while not stop.is_set():
                name = rng.choice(names)
                sent = time.monotonic()
                outcome = scale(custom, namespace, name, rng.choice([0, 1, 1, 2]))
                with lock:
                    results.append((sent, time.monotonic(), name, outcome))
        finally:
            api.close()

    with Admitted(control_plane, namespace) as watch:
        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(results) >= 20, timeout=60, interval=0.05, message="load flowing")
            pair.kill9(0)
            killed_at = time.monotonic()

            def refused_while_down() -> bool:  # down until the apiserver has refused a call for it
                with lock:
                    return any(s > killed_at and m in to_a and timed_out(o) for s, _, m, o in results)

            wait_for(refused_while_down, timeout=60, interval=0.05, message="a call to the dead process refused")
            started_at = time.monotonic()
            pair.restart(0)
            ready_at = time.monotonic()

            def answered_by_0() -> bool:  # a denial from shard 0 came from the restarted process itself
                with lock:
                    return any(s > killed_at and m in to_a and explained(o) for s, _, m, o in results)

            wait_for(answered_by_0, timeout=60, interval=0.05, message="process 0 deciding again")
            after = len(results)
            wait_for(lambda: len(results) >= after + 20, timeout=60, interval=0.05, message="load after recovery")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    answered = min(a for s, a, m, o in results if s > killed_at and m in to_a and explained(o))
    during = [o for s, _, m, o in results if killed_at <= s <= started_at and m in to_a]
    others = [o for _, _, m, o in results if m not in to_a]
    print(
        f"killed webhook 0: {sum(1 for o in during if timed_out(o))} calls to its shard refused while it was "
        f"down; restarted and ready in {ready_at - started_at:.2f}s; deciding again {answered - killed_at:.2f}s "
        f"after the kill; {len(results)} calls in all; peak {watch.peak_gi}Gi; {watch.samples} samples"
    )
    assert watch.violations == [], watch.violations[:5]
    # With failurePolicy: Fail, calls to the dead process are refused, never admitted unchecked (scale-downs
    # and no-op scales do not reach the webhook: its matchConditions send only increases) ...
    assert all(o == "admitted" or timed_out(o) for o in during), [o for o in during if not timed_out(o)][:3]
    assert any(timed_out(o) for o in during)
    # ... while the other process went on deciding.
    assert all(o == "admitted" or explained(o) or timed_out(o) for o in others), others[:3]

    # Nothing promised outlives its TTL: once every model is back at 0 and the TTL has passed, the
    # ledger holds no live entry and the whole pool is admitted again.
    custom = client.CustomObjectsApi(k8s_client)
    for name in names:
        assert scale(custom, namespace, name, 0) == "admitted"
    wait_for(
        lambda: live_ledger(k8s_client, namespace, time.time()) == {},
        timeout=TTL_SECONDS + 10,
        interval=0.2,
        message="every ledger entry expired",
    )
    # Each webhook worker decides on its own watch cache, which sees the scale-downs a moment after the
    # API server stored them (longer under load): until then a scale-up is refused on the old replicas, so
    # each one is retried as a client would; a leaked promise would keep refusing it to the deadline.
    fit = CAPACITY_GI // MODEL_GI
    last: dict[str, str] = {}

    def admitted(name: str) -> bool:
        last[name] = scale(custom, namespace, name, 1)
        return last[name] == "admitted"

    for name in names[:fit]:
        wait_for(
            lambda name=name: admitted(name),
            timeout=30,  # a watch event is late by milliseconds, seconds on a loaded machine; a leak is forever
            interval=0.2,
            message=lambda name=name: f"{name} admitted again (last answer: {last.get(name)})",
        )
    assert stored_replicas(k8s_client, namespace) == {n: int(n in names[:fit]) for n in names}
