#!/usr/bin/env python3
"""Extender benchmarks: filter latency against the running server, and real kube-scheduler throughput.

Why a script and not a test: timings on a shared 2-core machine vary; this reports figures and ratios
measured side by side in one run, never pass/fail thresholds.

1. Filter latency (`--latency`, default on): `ibc extender` runs as a real process over HTTPS (one
   worker, as deployed) on a snapshot of N fake nodes (the captured Node object as the template, so
   the Nodes form carries realistic objects) with half of them holding a bound model pod. One client
   sends filter calls one after another over a kept-alive connection, as kube-scheduler does, with the
   captured pod made a model replica. Reports p50/p99 client-side per size and form, and per node shape
   (`--shapes`): `unified` nodes carry the 80Gi capacity annotation (one device each), `dra8` nodes get
   eight 80Gi GPUs from one DRA ResourceSlice each (the held pods on GPU 0), so the cost of deciding per
   device is read as a ratio to the unified run beside it.
2. Scheduler throughput (`--throughput`): a real control plane (tests/cluster/harness.py) with
   `--throughput-nodes` fake nodes; two extra kube-schedulers with the same profile, one with the
   shipped extender config (pointed at a live `ibc extender`), one without. For each round the pods
   are created first (their scheduler stopped), then the scheduler starts and the time from 10 % to
   90 % of the pods bound gives pods/s. Rounds alternate; the report gives medians and the ratio.

Usage: .venv/bin/python bench/extender_bench.py [--sizes 100,1000,5000] [--throughput] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from budget.objects import ANNOTATION_CAPACITY, ANNOTATION_DEVICES, ANNOTATION_MEMORY, LABEL_MODEL  # noqa: E402
from certs.generate import generate_serving_certificate, write_files  # noqa: E402

CAPTURED = REPO / "tests" / "fixtures" / "captured"
IBC = [sys.executable, "-m", "ibc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its children (the gunicorn worker), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ----------------------------------------------------------------------------- filter latency


def node_objects(count: int) -> list[dict[str, Any]]:
    """`count` Node objects cloned from the captured one (about 4 KiB each), 80Gi capacity each."""
    template = json.loads((CAPTURED / "extender-filter-nodes.json").read_text())["Nodes"]["items"][0]
    nodes = []
    for i in range(count):
        node = copy.deepcopy(template)
        name = f"bench-node-{i:05d}"
        node["kind"] = "Node"
        node["apiVersion"] = "v1"
        node["metadata"]["name"] = name
        node["metadata"]["uid"] = f"00000000-0000-4000-8000-{i:012d}"
        node["metadata"]["labels"]["kubernetes.io/hostname"] = name
        node["metadata"].setdefault("annotations", {})[ANNOTATION_CAPACITY] = "80Gi"
        nodes.append(node)
    return nodes


def bound_pods(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A 40Gi model pod on every other node (on its device 0): the view has placements to count."""
    pods = []
    for i, node in enumerate(nodes[::2]):
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"held-{i}",
                    "namespace": "bench",
                    "uid": f"held-{i}",
                    "labels": {LABEL_MODEL: "resident"},
                    "annotations": {ANNOTATION_MEMORY: "40Gi", ANNOTATION_DEVICES: "0"},
                },
                "spec": {"nodeName": node["metadata"]["name"]},
                "status": {"phase": "Running"},
            }
        )
    return pods


def resource_slices(nodes: list[dict[str, Any]], gpus: int = 8) -> list[dict[str, Any]]:
    """One DRA ResourceSlice per node with `gpus` 80Gi GPUs (the NVIDIA driver's shape, trimmed)."""
    return [
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"name": f"{n['metadata']['name']}-gpu.nvidia.com"},
            "spec": {
                "driver": "gpu.nvidia.com",
                "nodeName": n["metadata"]["name"],
                "pool": {"name": n["metadata"]["name"], "generation": 1, "resourceSliceCount": 1},
                "devices": [
                    {
                        "name": f"gpu-{i}",
                        "attributes": {"index": {"int": i}, "productName": {"string": "NVIDIA H100 80GB HBM3"}},
                        "capacity": {"memory": {"value": "80Gi"}},
                    }
                    for i in range(gpus)
                ],
            },
        }
        for n in nodes
    ]


def filter_request(form: str, nodes: list[dict[str, Any]], uid: str) -> bytes:
    args = json.loads((CAPTURED / "extender-filter-nodenames.json").read_text())
    meta = args["Pod"]["metadata"]
    meta["uid"] = uid
    meta["labels"][LABEL_MODEL] = "llama"
    meta.setdefault("annotations", {})[ANNOTATION_MEMORY] = "16Gi"
    if form == "nodes":
        args["NodeNames"] = None
        args["Nodes"] = {"metadata": {}, "items": nodes}
    else:
        args["NodeNames"] = [n["metadata"]["name"] for n in nodes]
    return json.dumps(args).encode()


@contextlib.contextmanager
def extender_process(work: Path, extra: list[str], ca_bundle: Any) -> Iterator[tuple[str, Path, int]]:
    """`ibc extender` over HTTPS; yields (url, ca_path, pid)."""
    paths = write_files(ca_bundle, work / "tls")
    port = free_port()
    log = work / f"extender-{port}.log"
    argv = [
        *IBC,
        "--log-level",
        "WARNING",
        "extender",
        "--bind",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(paths.cert),
        "--tls-key",
        str(paths.key),
        "--threads",
        "8",
        "--max-request-bytes",
        str(512 * 2**20),
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ibc extender exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", verify=str(paths.ca), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ibc extender not ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, paths.ca, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def measure_latency(
    sizes: list[int], forms: list[str], requests: dict[int, int], shapes: list[str] | None = None
) -> list[dict[str, Any]]:
    rows = []
    bundle = generate_serving_certificate("ibc-extender", "ibc-system", ip_addresses=["127.0.0.1"])
    with tempfile.TemporaryDirectory(prefix="ibc-extender-bench-") as tmp:
        work = Path(tmp)
        for size, shape in [(s, h) for s in sizes for h in shapes or ["unified"]]:
            nodes = node_objects(size)
            slices = resource_slices(nodes) if shape == "dra8" else []
            state = work / f"cluster-{size}-{shape}.yaml"
            # The cache only needs names, labels and the capacity annotation (full objects would make a
            # 20 MB snapshot); the Nodes form still sends the full captured objects in each request.
            slim = [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {k: n["metadata"][k] for k in ("name", "labels", "annotations")},
                }
                for n in nodes
            ]
            state.write_text(yaml.safe_dump_all([*slim, *slices, *bound_pods(nodes)], sort_keys=False))
            with extender_process(work, ["--cluster-state", str(state), "--no-bind"], bundle) as (url, ca, pid):
                with httpx.Client(
                    base_url=url, verify=str(ca), timeout=60, headers={"Content-Type": "application/json"}
                ) as client:
                    for form in forms:
                        count = requests[size] if form == "nodenames" else max(20, requests[size] // 10)
                        bodies = [filter_request(form, nodes, f"bench-{i % 50}") for i in range(50)]
                        for i in range(min(20, count)):  # warm-up: imports, caches, TLS session
                            client.post("/filter", content=bodies[i % 50])
                        samples = []
                        cpu_before = process_tree_cpu_seconds(pid)
                        for i in range(count):
                            started = time.perf_counter()
                            response = client.post("/filter", content=bodies[i % 50])
                            samples.append((time.perf_counter() - started) * 1000)
                            body = response.json()
                            if response.status_code != 200 or body["Error"]:
                                raise RuntimeError(f"filter failed: {response.status_code} {body}")
                            answered = body["NodeNames"] if form == "nodenames" else body["Nodes"]["items"]
                            if len(answered) != 1:
                                raise RuntimeError(f"expected one reserved node, got {len(answered)}")
                        server_cpu_ms = (process_tree_cpu_seconds(pid) - cpu_before) * 1000 / count
                        row = {
                            "server_cpu_ms": round(server_cpu_ms, 2),
                            "nodes": size,
                            "shape": shape,
                            "form": form,
                            "requests": count,
                            "request_kib": round(len(bodies[0]) / 1024, 1),
                            "p50_ms": round(statistics.median(samples), 2),
                            "p99_ms": round(percentile(samples, 99), 2),
                            "max_ms": round(max(samples), 2),
                        }
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- scheduler throughput


def shipped_extender_config(url: str, ca: Path, *, bind: bool = True) -> list[dict[str, Any]]:
    config_map = yaml.safe_load((REPO / "deploy" / "scheduler" / "scheduler-config.yaml").read_text())
    (ext,) = yaml.safe_load(config_map["data"]["config.yaml"])["extenders"]
    ext["urlPrefix"] = url
    ext["tlsConfig"] = {"caFile": str(ca)}
    if not bind:
        del ext["bindVerb"]  # the scheduler's default binder binds to the one node filter reserved
    return [ext]


def measure_throughput(node_count: int, pod_count: int, rounds: int, kinds: tuple[str, ...]) -> dict[str, Any]:
    from kubernetes import client

    from tests.cluster import harness

    bin_dir = harness.ensure_binaries(stream=sys.stderr)
    cp = harness.ControlPlane.start_new(bin_dir=bin_dir)
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        api = cp.api_client()
        core = client.CoreV1Api(api)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: harness.create_node(api, f"tp-{i:04d}", capacity="80Gi"), range(node_count)))
        print(json.dumps({"created_nodes": node_count, "seconds": round(time.monotonic() - started, 1)}), flush=True)
        cert, key, ca = cp.issue_serving_cert(dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        port = free_port()
        log = cp.work_dir / "bench-extender.log"
        argv = [
            *IBC,
            "--log-level",
            "WARNING",
            "extender",
            "--bind",
            f"127.0.0.1:{port}",
            "--kubeconfig",
            str(cp.kubeconfig),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--threads",
            "8",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        url = f"https://127.0.0.1:{port}"
        try:
            harness.wait_for(
                lambda: httpx.get(f"{url}/readyz", verify=str(ca), timeout=2).status_code == 200,
                timeout=120,
                interval=0.2,
                message="extender ready",
            )
            for round_index in range(rounds):
                for kind in kinds:
                    rate = one_round(cp, core, kind, round_index, pod_count, url, ca)
                    results[kind].append(rate)
                    print(
                        json.dumps({"round": round_index, "scheduler": kind, "pods_per_second": round(rate, 1)}),
                        flush=True,
                    )
            metrics = httpx.get(f"{url}/metrics", verify=str(ca), timeout=10).text
            extender_cpu_seconds = process_tree_cpu_seconds(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    finally:
        cp.stop(remove_work_dir=True)
    seen = {}
    for line in metrics.splitlines():
        for key in (
            "ibc_extender_filter_nodes_sum",
            "ibc_extender_filter_nodes_count",
            "ibc_extender_filter_duration_seconds_sum",
            "ibc_extender_filter_duration_seconds_count",
        ):
            if line.startswith(key + "{"):
                seen[key] = seen.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    calls = max(seen.get("ibc_extender_filter_nodes_count", 0.0), 1.0)
    extender_stats = {
        "filter_calls": int(calls),
        "mean_nodes_per_filter": round(seen.get("ibc_extender_filter_nodes_sum", 0.0) / calls, 1),
        "mean_filter_ms_server": round(seen.get("ibc_extender_filter_duration_seconds_sum", 0.0) / calls * 1000, 2),
        "extender_cpu_ms_per_pod": round(
            extender_cpu_seconds * 1000 / (pod_count * rounds * sum(1 for k in kinds if k != "plain")), 2
        ),
    }
    plain = statistics.median(results["plain"])
    with_extender = statistics.median(results["extender"])
    return {
        "nodes": node_count,
        "pods_per_round": pod_count,
        "rounds": rounds,
        "plain_pods_per_second": [round(r, 1) for r in results["plain"]],
        "extender_pods_per_second": [round(r, 1) for r in results["extender"]],
        "plain_median": round(plain, 1),
        "extender_median": round(with_extender, 1),
        "ratio": round(with_extender / plain, 3),
        **(
            {
                "extender_nobind_pods_per_second": [round(r, 1) for r in results["extender-nobind"]],
                "ratio_nobind": round(statistics.median(results["extender-nobind"]) / plain, 3),
            }
            if "extender-nobind" in results
            else {}
        ),
        **extender_stats,
    }


def one_round(cp: Any, core: Any, kind: str, index: int, pod_count: int, url: str, ca: Path) -> float:
    """Create the pods with the scheduler stopped, start it, return pods/s from 10 % to 90 % bound."""
    from kubernetes import client

    namespace = f"tp-{kind}-{index}"
    scheduler_name = f"bench-{kind}-{index}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))

    def make(i: int) -> None:
        core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"p-{i:04d}",
                    "labels": {LABEL_MODEL: "llama"},
                    "annotations": {ANNOTATION_MEMORY: "1Gi"},
                },
                "spec": {
                    "schedulerName": scheduler_name,
                    "containers": [
                        {
                            "name": "c",
                            "image": "registry.k8s.io/pause:3.10",
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                        }
                    ],
                },
            },
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(pod_count)))
    extenders = shipped_extender_config(url, ca, bind=kind == "extender") if kind != "plain" else None
    handle = cp.start_scheduler(scheduler_name, extenders=extenders, verbosity=0)
    marks: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + 600
        while True:
            bound = sum(1 for p in core.list_namespaced_pod(namespace).items if p.spec.node_name)
            marks.append((time.monotonic(), bound))
            if bound >= pod_count:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: only {bound}/{pod_count} bound after 600 s; {handle.log_path}")
            time.sleep(0.05)
    finally:
        handle.stop()
        # No kubelet confirms a graceful deletion on fake nodes: force the pods away, then the namespace.
        core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
        core.delete_namespace(namespace)
    low, high = pod_count * 0.1, pod_count * 0.9
    t_low = next(t for t, b in marks if b >= low)
    t_high = next(t for t, b in marks if b >= high)
    return (high - low) / max(t_high - t_low, 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000", help="node counts for filter latency")
    parser.add_argument("--forms", default="nodenames,nodes", help="request forms to measure")
    parser.add_argument(
        "--shapes", default="unified,dra8", help="node shapes: unified (capacity annotation), dra8 (8 GPUs by DRA)"
    )
    parser.add_argument("--no-latency", dest="latency", action="store_false", help="skip filter latency")
    parser.add_argument("--throughput", action="store_true", help="also measure kube-scheduler throughput")
    parser.add_argument("--throughput-nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=300, help="pods per throughput round")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per scheduler (alternating)")
    parser.add_argument(
        "--with-nobind", action="store_true", help="also measure the extender config without bindVerb (default binder)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    report: dict[str, Any] = {}
    if args.latency:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        requests = {s: (2000 if s <= 100 else 1000 if s <= 1000 else 300) for s in sizes}
        report["filter_latency"] = measure_latency(sizes, args.forms.split(","), requests, args.shapes.split(","))
    if args.throughput:
        kinds = ("plain", "extender", "extender-nobind") if args.with_nobind else ("plain", "extender")
        report["throughput"] = measure_throughput(args.throughput_nodes, args.pods, args.rounds, kinds)
        print(json.dumps(report["throughput"]), flush=True)
    if "filter_latency" in report:
        print("\n| nodes | shape | form | request | p50 ms | p99 ms | max ms | server CPU ms/call |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["filter_latency"]:
            print(
                f"| {r['nodes']} | {r['shape']} | {r['form']} | {r['request_kib']} KiB | {r['p50_ms']} | {r['p99_ms']} "
                f"| {r['max_ms']} | {r['server_cpu_ms']} |"
            )
        by = {(r["nodes"], r["form"], r["shape"]): r for r in report["filter_latency"]}
        for (size, form, shape), r in by.items():
            base = by.get((size, form, "unified"))
            if shape != "unified" and base:
                print(
                    f"{shape} / unified at {size} nodes ({form}): p50 x{r['p50_ms'] / base['p50_ms']:.2f}, "
                    f"server CPU x{r['server_cpu_ms'] / max(base['server_cpu_ms'], 1e-6):.2f}"
                )
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "throughput" in report:
        t = report["throughput"]
        print(
            f"\nkube-scheduler at {t['nodes']} nodes: {t['plain_median']} pods/s without the extender, "
            f"{t['extender_median']} pods/s with it: ratio {t['ratio']}"
            + (f"; without bindVerb: ratio {t['ratio_nobind']}" if "ratio_nobind" in t else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
