"""Fault scenarios shared by the stress tests (which assert on them) and bench/stress_recovery.py (which
reports their figures): SIGKILL of `ibc local`, `ibc webhook` and `ibc extender` under load.

Each scenario runs the real process (gunicorn, TLS where deployed with it), keeps a load of requests
going, SIGKILLs first the worker (gunicorn starts a new one) and then the whole process group (a crashed
container; the scenario restarts it at once, as kubelet or systemd would), and watches the memory the
component promises the whole time. It returns a :class:`KillReport`; the caller decides what is a
failure. "Recovered" means the first request answered correctly after the kill.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from budget.decide import REASON_INSUFFICIENT
from budget.objects import ANNOTATION_CAPACITY, ANNOTATION_MEMORY, LABEL_MODEL
from tests.stress.support import GI, Load, Service, TLSFiles, alive, proc_table, service, wait_until

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "captured"


@dataclass
class KillReport:
    """What a SIGKILL scenario measured; every list should be empty for a pass."""

    component: str
    recover_after_worker_kill_seconds: float = 0.0
    recover_after_crash_seconds: float = 0.0  # SIGKILL of the group + immediate restart, to first good answer
    restart_ready_seconds: float = 0.0  # of which: the new process answering its readiness probe
    good_answers: int = 0
    transport_errors: int = 0  # connections refused or cut while the process was down (expected)
    wrong_answers: list[str] = field(default_factory=list)
    overcommits: list[str] = field(default_factory=list)
    leaked_after_ttl: list[str] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)
    peak_promised_bytes: int = 0
    capacity_bytes: int = 0

    def figures(self) -> dict[str, Any]:
        """The numbers a benchmark table shows."""
        return {
            "component": self.component,
            "recover_after_worker_kill_s": round(self.recover_after_worker_kill_seconds, 3),
            "recover_after_crash_s": round(self.recover_after_crash_seconds, 3),
            "restart_ready_s": round(self.restart_ready_seconds, 3),
            "good_answers": self.good_answers,
            "transport_errors": self.transport_errors,
            "wrong_answers": len(self.wrong_answers),
            "overcommits": len(self.overcommits),
            "leaked_after_ttl": len(self.leaked_after_ttl),
            "leftover_processes": len(self.leftover_processes),
            "peak_promised_gib": round(self.peak_promised_bytes / GI, 1),
            "capacity_gib": round(self.capacity_bytes / GI, 1),
        }


class Watcher:
    """Calls `check()` every `interval` seconds in a thread until stopped (the continuous invariant check)."""

    def __init__(self, check: Callable[[], None], interval: float = 0.01) -> None:
        self._check = check
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                self._check()
            self._stop.wait(self._interval)


def _thread_clients(svc_ref: Callable[[], Service]) -> Callable[[int], httpx.Client]:
    """One kept-alive client per load thread, rebuilt after a transport error (the server was replaced)."""
    clients: dict[int, httpx.Client] = {}

    def get(index: int) -> httpx.Client:
        if index not in clients:
            clients[index] = svc_ref().client(timeout=30, headers={"Content-Type": "application/json"})
        return clients[index]

    def drop(index: int) -> None:
        client = clients.pop(index, None)
        if client is not None:
            client.close()

    get.drop = drop  # type: ignore[attr-defined]
    return get


FLOWING = 20  # good answers that show the load is flowing again (instead of sleeping half a second)


def _kill_and_recover(svc: Service, load: Load, report: KillReport, timeout_seconds: float = 90) -> None:
    """SIGKILL the worker, wait for a good answer; SIGKILL the group, restart, wait for a good answer."""
    load.wait_for_successes_after(time.monotonic(), FLOWING, timeout_seconds)  # load flowing
    killed_at = svc.kill9_worker()
    report.recover_after_worker_kill_seconds = load.wait_for_success_after(killed_at, timeout_seconds)
    load.wait_for_successes_after(killed_at, FLOWING, timeout_seconds)
    crashed_at = svc.kill9()
    report.restart_ready_seconds = svc.start(timeout_seconds)
    report.recover_after_crash_seconds = load.wait_for_successes_after(crashed_at, 1, timeout_seconds)
    load.wait_for_successes_after(crashed_at, FLOWING, timeout_seconds)


def _collect(load: Load, report: KillReport) -> None:
    report.good_answers = sum(1 for o in load.outcomes if o.ok)
    report.wrong_answers = [o.detail for o in load.wrong_answers()]
    report.transport_errors = len(load.transport_errors)


def _guarded_call(clients: Callable[[int], httpx.Client], send: Callable[[httpx.Client], tuple[bool, str]]):  # type: ignore[no-untyped-def]
    def call(index: int) -> tuple[bool, str]:
        try:
            return send(clients(index))
        except (httpx.HTTPError, OSError):
            clients.drop(index)  # type: ignore[attr-defined]
            raise

    return call


# ----------------------------------------------------------------------------- ibc local


LOCAL_CONFIG = """
nodes:
  - {{name: box, memory: 128Gi}}
models:
  - name: {model}
    memory: 80Gi
    stop_grace_period: 5s
    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model {model} --startup-delay 0.3
"""


def local_kill9(work: Path, *, threads: int = 4) -> KillReport:
    """`ibc local` with one 80Gi model on a 128Gi node: two of its processes alive at once is an overcommit.

    The model's name is unique to this run, so the /proc scan sees only our processes. Leftovers: any
    model process of a killed instance still alive 5 s after the kill, or of the last one after SIGTERM.
    """
    model = f"alpha-{secrets.token_hex(3)}"
    config = work / "local.yaml"
    config.write_text(LOCAL_CONFIG.format(model=model))
    svc = service("local", ["local", "--config", str(config), "--threads", "32"], work)
    report = KillReport("ibc local", capacity_bytes=128 * GI)
    marker = f"--model {model}"

    def model_pids() -> list[int]:
        return sorted(pid for pid, (_, cmd) in proc_table().items() if "mock-backend" in cmd and marker in cmd)

    def check() -> None:
        pids = model_pids()
        report.peak_promised_bytes = max(report.peak_promised_bytes, 80 * GI * len(pids))
        if len(pids) > 1:
            report.overcommits.append(f"{len(pids)} processes of the 80Gi model alive at once: {pids}")

    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    clients = _thread_clients(lambda: svc)

    def send(client: httpx.Client) -> tuple[bool, str]:
        resp = client.post("/v1/chat/completions", json=chat)
        ok = resp.status_code == 200 and bool(resp.json()["choices"][0]["message"]["content"])
        return ok, f"{resp.status_code} {resp.text[:200]}"

    svc.start()
    try:
        with Watcher(check), Load(_guarded_call(clients, send), threads) as load:
            load.wait_for_success_after(time.monotonic() - 3600, 60)
            before_worker_kill = model_pids()
            killed_at = svc.kill9_worker()
            report.recover_after_worker_kill_seconds = load.wait_for_success_after(killed_at, 90)
            _expect_gone(before_worker_kill, 5, report, "after its worker was killed")
            before_crash = model_pids()
            crashed_at = svc.kill9()
            report.restart_ready_seconds = svc.start(90)
            report.recover_after_crash_seconds = load.wait_for_success_after(crashed_at, 90)
            _expect_gone(before_crash, 5, report, "after ibc local was killed")
            load.wait_for_successes_after(crashed_at, FLOWING, 90)
        _collect(load, report)
    finally:
        last = model_pids()
        svc.stop()
    _expect_gone(last, 10, report, "after SIGTERM to ibc local")
    return report


def _left_after_ttl(ttl_seconds: float, entries: Callable[[], list[Any]]) -> list[Any]:
    """What `entries()` still holds once the TTL has passed (polled: empty as soon as they expire)."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not entries(), ttl_seconds + 1.0, "every entry expired", interval=0.1)
    return entries()


def _expect_gone(pids: list[int], timeout_seconds: float, report: KillReport, when: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    report.leftover_processes += [f"pid {p} still alive {when}" for p in pids if alive(p)]


# ----------------------------------------------------------------------------- ibc webhook (offline)

WEBHOOK_MODELS = 20


def webhook_objects(capacity: str = "100Gi") -> list[dict[str, Any]]:
    """One pool node and WEBHOOK_MODELS 16Gi InferenceModels at 0 replicas: 6 fit at once in 100Gi."""
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "stress-node",
                "labels": {"pool": "stress"},
                "annotations": {ANNOTATION_CAPACITY: capacity},
            },
        },
    ]
    for i in range(WEBHOOK_MODELS):
        objs.append(
            {
                "apiVersion": "inference.eh-ops.io/v1alpha1",
                "kind": "InferenceModel",
                "metadata": {"name": f"m{i:02d}", "namespace": "default"},
                "spec": {"modelName": f"m{i:02d}", "memory": "16Gi", "replicas": 0, "nodeSelector": {"pool": "stress"}},
            }
        )
    return objs


def scale_review(name: str, old: int, new: int, uid: str, namespace: str = "default") -> dict[str, Any]:
    """The captured `inferencemodels/scale` review, for another model, replica counts and uid."""
    review = json.loads((CAPTURED / "admission-update-inferencemodel-scale.json").read_text())
    req = review["request"]
    req.update(uid=uid, name=name, namespace=namespace)
    for key, replicas in (("object", new), ("oldObject", old)):
        req[key]["metadata"].update(name=name, namespace=namespace)
        req[key]["spec"] = {"replicas": replicas} if replicas else {}
    return review


def webhook_kill9(work: Path, tls: TLSFiles, *, ttl_seconds: float = 3.0, threads: int = 4) -> KillReport:
    """`ibc webhook --cluster-state` over TLS; the ledger's admitted memory must never exceed the node."""
    state = work / "webhook-state.yaml"
    state.write_text(yaml.safe_dump_all(webhook_objects()))
    args = ["webhook", "--cluster-state", str(state), "--ledger-ttl", str(ttl_seconds), "--threads", "8"]
    svc = service("webhook", args, work, tls=tls, ready_path="/readyz")
    report = KillReport("ibc webhook (offline ledger)", capacity_bytes=100 * GI)
    probe = svc.client(timeout=5)

    def check() -> None:
        entries = probe.get("/debug/ledger").json()["entries"]
        promised = sum(e["memoryBytes"] * e["replicas"] for e in entries)
        report.peak_promised_bytes = max(report.peak_promised_bytes, promised)
        if promised > report.capacity_bytes:
            report.overcommits.append(f"ledger admits {promised / GI:g}Gi on a 100Gi node: {entries}")

    uids = itertools.count()
    clients = _thread_clients(lambda: svc)

    def send(client: httpx.Client) -> tuple[bool, str]:
        uid = f"stress-{next(uids)}"
        review = scale_review(f"m{random.randrange(WEBHOOK_MODELS):02d}", 0, 1, uid)
        resp = client.post("/validate", content=json.dumps(review))
        answer = resp.json().get("response") or {}
        status = answer.get("status") or {}
        ok = (
            resp.status_code == 200
            and answer.get("uid") == uid
            and (
                answer.get("allowed") is True
                or (status.get("code") == 403 and "insufficient_memory" in status.get("message", ""))
            )
        )
        return ok, f"{resp.status_code} {resp.text[:300]}"

    svc.start()
    try:
        with Watcher(check, 0.02), Load(_guarded_call(clients, send), threads) as load:
            _kill_and_recover(svc, load, report)
        _collect(load, report)
        probe.close()
        probe = svc.client(timeout=5)
        left = _left_after_ttl(ttl_seconds, lambda: probe.get("/debug/ledger").json()["entries"])
        report.leaked_after_ttl = [json.dumps(e) for e in left]
        # The memory is free again: a scale-up is admitted.
        again = probe.post("/validate", content=json.dumps(scale_review("m00", 0, 1, "after-ttl"))).json()
        if not again["response"]["allowed"]:
            report.leaked_after_ttl.append(f"a scale-up after the TTL was refused: {again['response']}")
    finally:
        probe.close()
        svc.stop()
    return report


# ----------------------------------------------------------------------------- ibc extender (offline)


def extender_objects() -> list[dict[str, Any]]:
    """Two 64Gi nodes: eight 16Gi pods fit at once."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"stress-{i}",
                "labels": {"pool": "stress"},
                "annotations": {ANNOTATION_CAPACITY: "64Gi"},
            },
        }
        for i in range(2)
    ]


def filter_args(uid: str, memory: str = "16Gi") -> dict[str, Any]:
    """The captured NodeNames-form filter request, its pod made a model replica with a fresh uid."""
    args = json.loads((CAPTURED / "extender-filter-nodenames.json").read_text())
    meta = args["Pod"]["metadata"]
    meta.update(uid=uid, name=f"pod-{uid}")
    meta["labels"] = {LABEL_MODEL: "llama"}
    meta["annotations"] = {ANNOTATION_MEMORY: memory}
    args["NodeNames"] = ["stress-0", "stress-1"]
    return args


def extender_kill9(work: Path, tls: TLSFiles, *, ttl_seconds: float = 3.0, threads: int = 4) -> KillReport:
    """`ibc extender --cluster-state --no-bind` over TLS: reservations must never exceed a node."""
    state = work / "extender-state.yaml"
    state.write_text(yaml.safe_dump_all(extender_objects()))
    args = [
        "extender",
        "--cluster-state",
        str(state),
        "--no-bind",
        "--reservation-ttl",
        str(ttl_seconds),
        "--threads",
        "8",
    ]
    svc = service("extender", args, work, tls=tls, ready_path="/readyz")
    report = KillReport("ibc extender (reservation book)", capacity_bytes=64 * GI)
    probe = svc.client(timeout=5)

    def check() -> None:
        nodes = probe.get("/debug/view").json()["nodes"]
        for name, n in nodes.items():
            held = n["boundBytes"] + n["reservedBytes"]
            report.peak_promised_bytes = max(report.peak_promised_bytes, held)
            if held > n["capacityBytes"] or n["freeBytes"] < 0:
                report.overcommits.append(f"{name}: {held / GI:g}Gi promised of {n['capacityBytes'] / GI:g}Gi")

    uids = itertools.count()
    clients = _thread_clients(lambda: svc)
    template = filter_args("template")

    def send(client: httpx.Client) -> tuple[bool, str]:
        args = copy.deepcopy(template)
        uid = f"stress-{next(uids)}"
        args["Pod"]["metadata"].update(uid=uid, name=f"pod-{uid}")
        resp = client.post("/filter", content=json.dumps(args))
        body = resp.json()
        names = body.get("NodeNames") or []
        failed = {**(body.get("FailedNodes") or {}), **(body.get("FailedAndUnresolvableNodes") or {})}
        ok = (
            resp.status_code == 200
            and body.get("Error") == ""
            and (len(names) == 1 or (not names and set(failed.values()) == {REASON_INSUFFICIENT}))
        )
        return ok, f"{resp.status_code} {resp.text[:300]}"

    svc.start()
    try:
        with Watcher(check, 0.02), Load(_guarded_call(clients, send), threads) as load:
            _kill_and_recover(svc, load, report)
        _collect(load, report)
        probe.close()
        probe = svc.client(timeout=5)
        left = _left_after_ttl(ttl_seconds, lambda: probe.get("/debug/reservations").json()["reservations"])
        report.leaked_after_ttl = [json.dumps(r) for r in left]
    finally:
        probe.close()
        svc.stop()
    return report
