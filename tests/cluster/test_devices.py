"""Budgets per device behind the real kube-apiserver and kube-scheduler: ResourceSlices and GFD MIG labels
feed the extender and the webhook, pods land only where each of their devices fits, and the bound pod
carries the device indices for its model server.

Why: the unit tables prove the decision on hand-made views; this proves what a user of a GPU cluster sees.
DRA ResourceSlices (resource.k8s.io/v1, served by the 1.36 apiserver) are created on the real apiserver
in the NVIDIA driver's shape (tests/fixtures/captured/resourceslices.json), the extender and webhook run
as `ibc` subprocesses watching them, a second kube-scheduler runs deploy/scheduler's configuration, and
model pods ask through their InferenceModel's `spec.devices` (tensor parallelism) and `spec.deviceSelector`.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from budget.objects import ANNOTATION_DEVICES, ANNOTATION_MEMORY, LABEL_MODEL
from kubeview.api import RESOURCE_SLICES, request_json
from tests.cluster import components
from tests.cluster.components import Server
from tests.cluster.harness import ControlPlane, PodSimulator, SchedulerHandle, wait_for

SCHEDULER_NAME = "inference-budget-scheduler-devices"
POOL_LABEL = "ibc.test/pool"
GI = 2**30
CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "captured" / "resourceslices.json"
# GPU Feature Discovery, mixed MIG strategy, on an A100-80GB cut into one 3g.40gb and three 1g.10gb slices.
MIG_LABELS = {
    "nvidia.com/mig.strategy": "mixed",
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/mig-3g.40gb.count": "1",
    "nvidia.com/mig-3g.40gb.memory": "40192",
    "nvidia.com/mig-1g.10gb.count": "3",
    "nvidia.com/mig-1g.10gb.memory": "9856",
}


def captured_slice(shape: str, node: str) -> dict[str, Any]:
    """The captured slice of node `shape` (gpu-2x40, gpu-1x80, gpu-mig), renamed for `node`."""
    items = json.loads(CAPTURED.read_text())["items"]
    (found,) = [s for s in items if s["spec"]["nodeName"] == shape]
    obj = copy.deepcopy(found)
    obj.update(apiVersion="resource.k8s.io/v1", kind="ResourceSlice")
    obj["metadata"] = {"name": f"{node}-gpu.nvidia.com"}
    obj["spec"]["nodeName"] = node
    obj["spec"]["pool"]["name"] = node
    return obj


@pytest.fixture(scope="module")
def extender(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    components.install_crd(control_plane)  # before the extender starts: it watches InferenceModels if served
    server = components.launch_extender(control_plane, tmp_path_factory.mktemp("devices"))
    try:
        yield server.wait_ready()
    finally:
        components.stop_all([server])


@pytest.fixture(scope="module")
def scheduler(
    extender: Server, scheduler_factory: Callable[..., SchedulerHandle], pod_simulator: PodSimulator
) -> SchedulerHandle:
    config = components.scheduler_config(extender.url, extender.ca)  # type: ignore[arg-type]
    config["profiles"][0]["schedulerName"] = SCHEDULER_NAME
    return scheduler_factory(SCHEDULER_NAME, config=config)


@pytest.fixture
def slices(k8s_client: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
    """`slices(obj)` creates a ResourceSlice on the apiserver; each is deleted after the test."""
    names: list[str] = []

    def create(obj: dict[str, Any]) -> None:
        request_json(k8s_client, "POST", RESOURCE_SLICES.path(), body=obj)
        names.append(obj["metadata"]["name"])

    yield create
    for name in names:
        try:
            request_json(k8s_client, "DELETE", RESOURCE_SLICES.path(name=name))
        except Exception:  # cleanup only: a failed delete must not hide the test's own outcome
            pass


def view_devices(server: Server, node: str) -> list[tuple[int, int]] | None:
    """(capacity GiB, free bytes) per device of `node` as the extender's own view shows it."""
    found = server.get("/debug/view").json()["nodes"].get(node)
    return None if found is None else [(d["capacityBytes"] // GI, d["freeBytes"]) for d in found["devices"]]


@pytest.fixture
def gpu_pool(
    node_factory: Callable[..., Any], slices: Callable[[dict[str, Any]], None], extender: Server
) -> Callable[..., str]:
    """`gpu_pool(a="gpu-2x40", mig=MIG_LABELS)`: fake nodes in a fresh pool, each with the captured slice of
    that shape or the given GFD labels; waits until the extender's view shows their devices."""

    def make(**shapes: str | dict[str, str]) -> str:
        pool = f"dev-{secrets.token_hex(3)}"
        expected: dict[str, int] = {}
        for suffix, shape in shapes.items():
            name = f"{pool}-{suffix}"
            labels = {POOL_LABEL: pool, **(shape if isinstance(shape, dict) else {})}
            node_factory(name, labels=labels)
            if isinstance(shape, str):
                obj = captured_slice(shape, name)
                slices(obj)
                expected[name] = len(obj["spec"]["devices"])
            else:
                expected[name] = sum(int(v) for k, v in shape.items() if k.endswith(".count"))
        wait_for(
            lambda: all(len(view_devices(extender, n) or []) == count for n, count in expected.items()),
            timeout=30,
            interval=0.1,
            message=f"the extender sees the devices of {sorted(expected)}",
        )
        return pool

    return make


def inference_model(
    custom: client.CustomObjectsApi, namespace: str, name: str, memory: str, pool: str, **spec: Any
) -> None:
    body = {
        "apiVersion": f"{components.GROUP}/{components.VERSION}",
        "kind": "InferenceModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"modelName": name, "memory": memory, "replicas": 0, "nodeSelector": {POOL_LABEL: pool}, **spec},
    }
    custom.create_namespaced_custom_object(components.GROUP, components.VERSION, namespace, components.PLURAL, body)


def model_pod(name: str, model: str, memory: str, pool: str) -> dict[str, Any]:
    """A replica of `model` as its Deployment would make it: the model label and memory annotation."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {LABEL_MODEL: model}, "annotations": {ANNOTATION_MEMORY: memory}},
        "spec": {
            "schedulerName": SCHEDULER_NAME,
            "nodeSelector": {POOL_LABEL: pool},
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "server", "image": "registry.k8s.io/pause:3.10"}],
        },
    }


def placed(core: client.CoreV1Api, namespace: str, name: str) -> tuple[str, str] | None:
    """(node, devices annotation) once the pod is bound, else None."""
    pod = core.read_namespaced_pod(name, namespace)
    if not pod.spec.node_name:
        return None
    return pod.spec.node_name, (pod.metadata.annotations or {}).get(ANNOTATION_DEVICES, "")


def refusals(core: client.CoreV1Api, namespace: str, pod: str) -> list[str]:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items
    return [e.message or "" for e in events if e.reason == "FailedScheduling"]


def bind_or_refuse(core: client.CoreV1Api, namespace: str, pod: str) -> tuple[str, str] | None:
    """Wait until the pod is bound (its placement) or refused (None)."""
    wait_for(
        lambda: placed(core, namespace, pod) or refusals(core, namespace, pod),
        timeout=60,
        interval=0.2,
        message=f"{pod} bound or refused",
    )
    return placed(core, namespace, pod)


def test_pods_are_bound_only_where_each_of_their_devices_fits_and_carry_the_indices(
    scheduler: SchedulerHandle,
    extender: Server,
    k8s_client: Any,
    namespace: str,
    gpu_pool: Callable[..., str],
) -> None:
    core, custom = client.CoreV1Api(k8s_client), client.CustomObjectsApi(k8s_client)
    # Node a has two 40Gi GPUs, node b one of 80Gi: 80Gi each, so per node they look the same (and a wins
    # a tie by name).
    pool = gpu_pool(a="gpu-2x40", b="gpu-1x80")
    inference_model(custom, namespace, "single", "60Gi", pool)
    inference_model(custom, namespace, "tp2", "60Gi", pool, devices=2)
    inference_model(custom, namespace, "small", "30Gi", pool)

    # 60Gi on one device fits only the 80Gi GPU: node a has 80Gi but no GPU of 60Gi.
    core.create_namespaced_pod(namespace, model_pod("single-0", "single", "60Gi", pool))
    assert bind_or_refuse(core, namespace, "single-0") == (f"{pool}-b", "0")
    # 60Gi over two devices (30Gi each) fits only the node with two GPUs, on both of them.
    core.create_namespaced_pod(namespace, model_pod("tp2-0", "tp2", "60Gi", pool))
    assert bind_or_refuse(core, namespace, "tp2-0") == (f"{pool}-a", "0,1")
    assert view_devices(extender, f"{pool}-a") == [(40, 10 * GI), (40, 10 * GI)]
    assert view_devices(extender, f"{pool}-b") == [(80, 20 * GI)]

    # 30Gi more: 40Gi is free in the pool (10 + 10 + 20), but no GPU has 30Gi. Refused, per device.
    core.create_namespaced_pod(namespace, model_pod("small-0", "small", "30Gi", pool))
    assert bind_or_refuse(core, namespace, "small-0") is None, "bound where no device had 30Gi free"
    message = refusals(core, namespace, "small-0")[0]
    print(message)
    assert "GPU 0" in message and "GPU 1" in message, f"no per-device reason: {message}"
    assert core.read_namespaced_pod("small-0", namespace).status.phase == "Pending"

    # The tensor-parallel replica goes: both its GPUs are free again, and a new 30Gi replica takes one. (Not
    # the pending pod: when the scheduler retries it is up to the scheduler, see docs/extender.md.)
    core.delete_namespaced_pod("tp2-0", namespace, grace_period_seconds=0)
    wait_for(
        lambda: (
            [f for _, f in view_devices(extender, f"{pool}-a") or []]
            in ([40 * GI] * 2, [10 * GI, 40 * GI], [40 * GI, 10 * GI])
        ),
        timeout=30,
        interval=0.1,
        message="the deleted replica's GPUs free in the extender's view",
    )
    core.create_namespaced_pod(namespace, model_pod("small-1", "small", "30Gi", pool))
    node, devices = bind_or_refuse(core, namespace, "small-1") or ("", "")
    assert node == f"{pool}-a" and devices in ("0", "1")


def test_a_mig_node_from_gfd_labels_takes_one_replica_per_slice_of_its_profile(
    scheduler: SchedulerHandle,
    extender: Server,
    k8s_client: Any,
    namespace: str,
    gpu_pool: Callable[..., str],
) -> None:
    core, custom = client.CoreV1Api(k8s_client), client.CustomObjectsApi(k8s_client)
    pool = gpu_pool(mig=MIG_LABELS)
    node = f"{pool}-mig"
    assert sorted(c for c, _ in view_devices(extender, node) or []) == [9, 9, 9, 39]
    inference_model(custom, namespace, "tiny", "8Gi", pool, deviceSelector={"profile": "1g.10gb"})
    inference_model(custom, namespace, "mid", "24Gi", pool)
    # 24Gi fits only the 3g.40gb slice; the three 8Gi replicas may use only the 1g.10gb ones.
    core.create_namespaced_pod(namespace, model_pod("mid-0", "mid", "24Gi", pool))
    mid = bind_or_refuse(core, namespace, "mid-0")
    assert mid is not None and mid[0] == node
    slices = {d["index"]: d for d in extender.get("/debug/view").json()["nodes"][node]["devices"]}
    assert slices[int(mid[1])]["profile"] == "3g.40gb"
    taken = set()
    for i in range(3):
        core.create_namespaced_pod(namespace, model_pod(f"tiny-{i}", "tiny", "8Gi", pool))
        bound = bind_or_refuse(core, namespace, f"tiny-{i}")
        assert bound is not None and bound[0] == node, f"tiny-{i} refused: {refusals(core, namespace, f'tiny-{i}')}"
        assert slices[int(bound[1])]["profile"] == "1g.10gb"
        taken.add(bound[1])
    assert len(taken) == 3, "two replicas on one 1g.10gb slice"
    # A fourth: the 3g.40gb slice has 15Gi free, but the selector allows only the (full) 1g.10gb slices.
    core.create_namespaced_pod(namespace, model_pod("tiny-3", "tiny", "8Gi", pool))
    assert bind_or_refuse(core, namespace, "tiny-3") is None


def test_the_webhook_admits_scale_ups_by_the_devices_its_resourceslices_show(
    control_plane: ControlPlane,
    k8s_client: Any,
    namespace: str,
    gpu_pool: Callable[..., str],
    tmp_path: Path,
) -> None:
    cp = control_plane
    webhook = components.launch_webhook(cp, tmp_path, ledger_namespace=namespace, ledger_name="devices-ledger")
    config_name = f"ibc-devices-{secrets.token_hex(3)}"
    try:
        webhook.wait_ready()
        assert webhook.ca is not None
        components.register_webhook(
            cp,
            components.webhook_configuration(
                config_name, f"{webhook.url}/validate", webhook.ca.read_bytes(), [namespace]
            ),
        )
        custom = client.CustomObjectsApi(k8s_client)
        pool = gpu_pool(a="gpu-2x40", b="gpu-2x40")  # 160Gi in the pool, no GPU above 40Gi
        inference_model(custom, namespace, "tp2", "60Gi", pool, devices=2)
        inference_model(custom, namespace, "single", "60Gi", pool)
        inference_model(custom, namespace, "small", "30Gi", pool)

        def scale(model: str, replicas: int) -> None:
            custom.patch_namespaced_custom_object_scale(
                components.GROUP,
                components.VERSION,
                namespace,
                components.PLURAL,
                model,
                {"spec": {"replicas": replicas}},
            )

        # Only the slices give these nodes a budget: once the webhook's view has them, tp2 may start.
        wait_for(lambda: _scale_allowed(scale, "tp2", 1), timeout=30, interval=0.5, message="tp2 scaled to 1")
        # 60Gi on one device: each node has 80Gi, but no GPU has 60Gi. Denied, naming the largest device.
        with pytest.raises(ApiException) as denied:
            scale("single", 1)
        assert denied.value.status == 403, denied.value.body
        assert f"the largest device in pool {POOL_LABEL}={pool} has 40Gi" in str(denied.value.body)
        scale("tp2", 2)  # the second replica takes both GPUs of the other node: 10Gi left on each GPU
        with pytest.raises(ApiException) as denied:
            scale("small", 1)  # 40Gi free in the pool, 10Gi on each GPU: denied, per device
        print(denied.value.body)
        message = json.loads(denied.value.body)["message"]
        assert f"{pool}-a: GPU 0 has 10Gi free of 40Gi, GPU 1 has 10Gi free of 40Gi" in message, message
    finally:
        components.unregister_webhook(cp, config_name)
        components.stop_all([webhook])


def _scale_allowed(scale: Callable[[str, int], None], model: str, replicas: int) -> bool:
    try:
        scale(model, replicas)
    except ApiException:
        return False
    return True
