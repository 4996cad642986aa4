"""The extender driven by a real kube-scheduler: model pods land only where the memory budget allows.

Why: the unit tests prove the decisions on captured requests; this proves the whole loop a user
relies on. `ibc extender` runs as a subprocess over HTTPS (a certificate from the cluster CA), a second
kube-scheduler runs the shipped deploy/scheduler config (pointed at 127.0.0.1), fake nodes carry
capacity annotations, and pods are real pods: they land where the budget allows, a pod that fits
nowhere stays Pending with "insufficient inference memory budget" in its FailedScheduling event,
20 pods created at once never overcommit a node, and a deleted pod frees its memory at once.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

from budget import parse_quantity
from budget.objects import ANNOTATION_MEMORY, LABEL_MODEL
from tests.cluster.harness import ControlPlane, PodSimulator, SchedulerHandle, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
SCHEDULER_CONFIG = REPO / "deploy" / "scheduler" / "scheduler-config.yaml"
SCHEDULER_NAME = "inference-budget-scheduler"
REASON = "insufficient inference memory budget"
GI = 2**30


class Extender:
    """A running `ibc extender` subprocess and how to reach it."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, ca: Path, log: Path) -> None:
        self.proc, self.url, self.ca, self.log = proc, url, ca, log

    def get(self, path: str) -> Any:
        with httpx.Client(base_url=self.url, verify=str(self.ca), timeout=5) as c:
            return c.get(path).json()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def extender(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Extender]:
    cert, key, ca = control_plane.issue_serving_cert(dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    port = free_port()
    log = tmp_path_factory.mktemp("extender") / "extender.log"
    argv = [
        sys.executable,
        "-m",
        "ibc",
        "extender",
        "--bind",
        f"127.0.0.1:{port}",
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--threads",
        "8",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    ext = Extender(proc, f"https://127.0.0.1:{port}", ca, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ibc extender exited {proc.returncode}:\n{ext.log_tail()}")
        try:
            return bool(ext.get("/readyz")["status"] == "ready")
        except (httpx.TransportError, ValueError):
            return False

    try:
        wait_for(ready, timeout=60, interval=0.2, message="ibc extender /readyz")
        yield ext
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def shipped_config(extender_url: str, ca: Path) -> dict[str, Any]:
    """deploy/scheduler's KubeSchedulerConfiguration, pointed at the local extender and CA."""
    config_map = yaml.safe_load(SCHEDULER_CONFIG.read_text())
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    config.pop("leaderElection")  # the harness runs it without leader election (no ibc-system lease)
    (ext,) = config["extenders"]
    assert ext["urlPrefix"] == "https://ibc-extender.ibc-system.svc:8443"
    ext["urlPrefix"] = extender_url
    ext["tlsConfig"] = {"caFile": str(ca)}
    return config


@pytest.fixture(scope="module")
def scheduler(
    extender: Extender, scheduler_factory: Callable[..., SchedulerHandle], pod_simulator: PodSimulator
) -> SchedulerHandle:
    return scheduler_factory(SCHEDULER_NAME, config=shipped_config(extender.url, extender.ca))


@pytest.fixture
def pool(node_factory: Callable[..., Any], extender: Extender) -> Callable[..., str]:
    """`pool(a="24Gi", b="48Gi")` makes fake nodes in a fresh pool; returns the pool's label value.

    A capacity given as an int is GPU feature discovery's `nvidia.com/gpu.memory` in MiB (`pool(h100=81559)`).

    Model pods select the pool, so nodes other tests create never receive them. Waits until the
    extender's own view (list+watch) shows the nodes, so the first filter does not race the watch.
    """

    def make(**capacities: str | int) -> str:
        pool_id = f"ext-{secrets.token_hex(3)}"
        names = []
        for suffix, capacity in capacities.items():
            name = f"{pool_id}-{suffix}"
            if isinstance(capacity, int):
                node_factory(name, gfd_memory_mib=capacity, labels={"ibc.test/pool": pool_id})
            else:
                node_factory(name, capacity=capacity, labels={"ibc.test/pool": pool_id})
            names.append(name)
        wait_for(
            lambda: set(names) <= set(extender.get("/debug/view")["nodes"]),
            timeout=30,
            interval=0.1,
            message="extender sees the new nodes",
        )
        return pool_id

    return make


def model_pod(
    name: str, memory: str, pool_id: str, model: str = "llama", scheduler_name: str = SCHEDULER_NAME
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {LABEL_MODEL: model}, "annotations": {ANNOTATION_MEMORY: memory}},
        "spec": {
            "schedulerName": scheduler_name,
            "nodeSelector": {"ibc.test/pool": pool_id},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "server", "image": "registry.k8s.io/pause:3.10"}],
        },
    }


def pods(core: client.CoreV1Api, namespace: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(namespace).items)


def bound_bytes_per_node(core: client.CoreV1Api, namespace: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in pods(core, namespace):
        if p.spec.node_name and not p.metadata.deletion_timestamp:
            memory = parse_quantity(p.metadata.annotations[ANNOTATION_MEMORY])
            out[p.spec.node_name] = out.get(p.spec.node_name, 0) + memory
    return out


def failed_scheduling(core: client.CoreV1Api, namespace: str, pod: str) -> list[str]:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items
    return [e.message or "" for e in events if e.reason == "FailedScheduling"]


def node_of(core: client.CoreV1Api, namespace: str, name: str) -> str | None:
    return core.read_namespaced_pod(name, namespace).spec.node_name


def test_model_pods_land_only_where_the_budget_allows(
    scheduler: SchedulerHandle, k8s_client: Any, namespace: str, pool: Callable[..., str]
) -> None:
    core = client.CoreV1Api(k8s_client)
    pool_id = pool(a="24Gi", b="48Gi", c="80Gi")
    core.create_namespaced_pod(namespace, model_pod("big", "60Gi", pool_id))
    wait_for(lambda: node_of(core, namespace, "big"), timeout=30, interval=0.1, message="big bound")
    assert node_of(core, namespace, "big") == f"{pool_id}-c", "only the 80Gi node holds 60Gi"
    core.create_namespaced_pod(namespace, model_pod("mid", "40Gi", pool_id))
    wait_for(lambda: node_of(core, namespace, "mid"), timeout=30, interval=0.1, message="mid bound")
    assert node_of(core, namespace, "mid") == f"{pool_id}-b", "node-c has 20Gi left, node-a 24Gi: only b holds 40Gi"
    # A pod that is no model replica goes through the same scheduler and passes every node.
    plain = model_pod("plain", "1Gi", pool_id)
    plain["metadata"] = {"name": "plain"}
    core.create_namespaced_pod(namespace, plain)
    wait_for(lambda: node_of(core, namespace, "plain"), timeout=30, interval=0.1, message="plain pod bound")


def test_pods_fill_a_gpu_to_the_exact_byte_and_not_one_byte_more(
    scheduler: SchedulerHandle, extender: Extender, k8s_client: Any, namespace: str, pool: Callable[..., str]
) -> None:
    """An 80 GB H100 (GFD: 81559 MiB) takes pods summing to its capacity exactly; a pod one byte larger than
    what is left stays Pending with the budget's reason. A filter loosened by any amount binds that pod."""
    core = client.CoreV1Api(k8s_client)
    capacity = 81559 * 2**20
    pool_id = pool(h100=81559)
    node = f"{pool_id}-h100"
    core.create_namespaced_pod(namespace, model_pod("first", "64Gi", pool_id))
    wait_for(lambda: node_of(core, namespace, "first"), timeout=60, interval=0.1, message="first bound")
    left = capacity - 64 * GI  # 16023 MiB, not a round number of GiB
    core.create_namespaced_pod(namespace, model_pod("one-byte-too-many", str(left + 1), pool_id))
    over = "one-byte-too-many"
    wait_for(
        lambda: failed_scheduling(core, namespace, over) or node_of(core, namespace, over),
        timeout=60,
        interval=0.2,
        message="the pod one byte larger than what is left refused (or bound)",
    )
    assert node_of(core, namespace, over) is None, "bound one byte beyond the node's budget"
    assert any(f"1 {REASON}" in m for m in failed_scheduling(core, namespace, over))
    core.create_namespaced_pod(namespace, model_pod("exact", str(left), pool_id))
    wait_for(lambda: node_of(core, namespace, "exact"), timeout=60, interval=0.1, message="exact bound")
    assert bound_bytes_per_node(core, namespace) == {node: capacity}, "the node is full to the byte"
    core.create_namespaced_pod(namespace, model_pod("one-byte", "1", pool_id))
    wait_for(
        lambda: failed_scheduling(core, namespace, "one-byte") or node_of(core, namespace, "one-byte"),
        timeout=60,
        interval=0.2,
        message="a 1-byte pod on the full node refused (or bound)",
    )
    assert node_of(core, namespace, over) is None and node_of(core, namespace, "one-byte") is None
    assert extender.get("/debug/view")["nodes"][node]["freeBytes"] == 0


def test_a_pod_that_fits_nowhere_stays_pending_and_says_why(
    scheduler: SchedulerHandle, k8s_client: Any, namespace: str, pool: Callable[..., str]
) -> None:
    core = client.CoreV1Api(k8s_client)
    pool_id = pool(a="24Gi", b="48Gi")
    core.create_namespaced_pod(namespace, model_pod("huge", "64Gi", pool_id))
    messages = wait_for(
        lambda: failed_scheduling(core, namespace, "huge"),
        timeout=30,
        interval=0.2,
        message="FailedScheduling event for huge",
    )
    print(messages[0])
    # Both nodes give the same number-free reason, so the scheduler groups them into one count.
    assert any(f"2 {REASON}" in m for m in messages), messages
    assert node_of(core, namespace, "huge") is None
    assert core.read_namespaced_pod("huge", namespace).status.phase == "Pending"


def test_twenty_pods_created_at_once_never_overcommit_a_node(
    scheduler: SchedulerHandle, extender: Extender, k8s_client: Any, namespace: str, pool: Callable[..., str]
) -> None:
    core = client.CoreV1Api(k8s_client)
    capacities = {"a": 24, "b": 48, "c": 80}  # 16Gi pods: 1 + 3 + 5 = 9 fit
    pool_id = pool(**{k: f"{v}Gi" for k, v in capacities.items()})
    names = [f"burst-{i:02d}" for i in range(20)]
    with ThreadPoolExecutor(10) as executor:
        list(executor.map(lambda n: core.create_namespaced_pod(namespace, model_pod(n, "16Gi", pool_id)), names))

    overcommits: list[dict[str, int]] = []

    def nine_bound() -> bool:
        per_node = bound_bytes_per_node(core, namespace)
        if any(per_node.get(f"{pool_id}-{s}", 0) > gi * GI for s, gi in capacities.items()):
            overcommits.append(per_node)  # checked on every poll, not only at the end
        return sum(per_node.values()) >= 9 * 16 * GI

    wait_for(nine_bound, timeout=60, interval=0.2, message="the 9 pods that fit are bound")
    time.sleep(3)  # retries run meanwhile (every bind re-queues the refused pods): none more may fit
    nine_bound()
    assert not overcommits, overcommits
    per_node = bound_bytes_per_node(core, namespace)
    assert sum(per_node.values()) == 9 * 16 * GI, f"all 9 holes used, no more: {per_node}"
    pending = [p.metadata.name for p in pods(core, namespace) if not p.spec.node_name]
    assert len(pending) == 11
    wait_for(
        lambda: any(REASON in m for m in failed_scheduling(core, namespace, pending[0])),
        timeout=30,
        interval=0.2,
        message=f"FailedScheduling with the budget reason for {pending[0]}",
    )
    view = extender.get("/debug/view")["nodes"]
    assert all(view[f"{pool_id}-{s}"]["freeBytes"] >= 0 for s in capacities), view


def test_deleting_a_pod_lets_a_pending_one_schedule(
    scheduler: SchedulerHandle, extender: Extender, k8s_client: Any, namespace: str, pool: Callable[..., str]
) -> None:
    """The deleted pod's memory is free in the extender's view at once, and the Pending pod is bound on the
    scheduler's next try. kube-scheduler may retry on the deletion before the extender's watch has seen it
    (refused again, the pod then waits for the next event, up to its 5-minute flush: docs/extender.md), so
    once the extender has seen it the test updates the Pending pod, an event that re-queues it at once."""
    core = client.CoreV1Api(k8s_client)
    pool_id = pool(only="64Gi")
    node = f"{pool_id}-only"
    core.create_namespaced_pod(namespace, model_pod("first", "40Gi", pool_id))
    wait_for(lambda: node_of(core, namespace, "first"), timeout=30, interval=0.1, message="first bound")
    core.create_namespaced_pod(namespace, model_pod("second", "40Gi", pool_id))
    wait_for(
        lambda: failed_scheduling(core, namespace, "second"),
        timeout=30,
        interval=0.2,
        message="second refused while first holds the node",
    )
    assert node_of(core, namespace, "second") is None
    started = time.monotonic()
    core.delete_namespaced_pod("first", namespace, grace_period_seconds=0)

    def freed_or_bound() -> bool:
        free = extender.get("/debug/view")["nodes"][node]["freeBytes"]
        return bool(node_of(core, namespace, "second")) or free == 64 * GI

    wait_for(
        freed_or_bound,
        timeout=30,
        interval=0.05,
        message="first's memory free in the extender's view",
    )
    freed = time.monotonic() - started
    if node_of(core, namespace, "second") is None:  # the scheduler may have retried too early: re-queue it
        core.patch_namespaced_pod("second", namespace, {"metadata": {"annotations": {"ibc.test/requeue": "1"}}})
    wait_for(
        lambda: node_of(core, namespace, "second"),
        timeout=30,  # a re-queued pod is retried within its backoff (at most 10 s), then filtered in ms
        interval=0.1,
        message="second bound after first was deleted",
    )
    elapsed = time.monotonic() - started
    assert node_of(core, namespace, "second") == node
    print(json.dumps({"memory_free_after_delete_seconds": round(freed, 2),
                      "pending_pod_bound_after_delete_seconds": round(elapsed, 2)}))


def test_the_nodes_form_works_with_a_real_scheduler_too(
    extender: Extender,
    scheduler_factory: Callable[..., SchedulerHandle],
    k8s_client: Any,
    namespace: str,
    pool: Callable[..., str],
) -> None:
    config = shipped_config(extender.url, extender.ca)
    config["profiles"][0]["schedulerName"] = "inference-budget-scheduler-nodes-form"
    config["extenders"][0]["nodeCacheCapable"] = False  # full Node objects in every call
    scheduler_factory("inference-budget-scheduler-nodes-form", config=config)
    core = client.CoreV1Api(k8s_client)
    pool_id = pool(a="24Gi", b="48Gi")
    nodes_form = "inference-budget-scheduler-nodes-form"
    core.create_namespaced_pod(namespace, model_pod("forty", "40Gi", pool_id, scheduler_name=nodes_form))
    wait_for(lambda: node_of(core, namespace, "forty"), timeout=30, interval=0.1, message="forty bound")
    assert node_of(core, namespace, "forty") == f"{pool_id}-b"
    core.create_namespaced_pod(namespace, model_pod("thirty", "30Gi", pool_id, scheduler_name=nodes_form))
    messages = wait_for(
        lambda: failed_scheduling(core, namespace, "thirty"),
        timeout=30,
        interval=0.2,
        message="FailedScheduling event for thirty",
    )
    assert any(f"2 {REASON}" in m for m in messages), messages
    assert node_of(core, namespace, "thirty") is None
