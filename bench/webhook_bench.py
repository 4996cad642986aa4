#!/usr/bin/env python3
"""Admission webhook benchmarks: latency answered directly, and what it adds to an API scale request.

Why a script and not a test: timings on a shared 2-core machine vary; this reports figures and ratios
measured side by side in one run, never pass/fail thresholds (the targets are printed beside them).

1. Direct latency (always): `ibc webhook` as a real process over HTTPS, sent AdmissionReviews (built
   from the captured ones) open-loop at `--rate` requests/s for `--duration` seconds by 8 client
   threads over kept-alive connections. Mix, in equal parts: a scale-up that fits and is committed to the
   ledger, a scale-up denied with the explanation, a scale-down, and the captured 10 KiB Deployment
   update of a non-model workload. Latency is measured by the client (TLS, HTTP, the server) and, from the
   webhook's own histogram, inside the server. Offline (`--cluster-state`, in-process lock) always; with `--cluster`
   also live (watch cache + ConfigMap ledger on the real API server, 2 workers), where every committed
   scale-up costs a GET and a PUT of the ledger.
2. API scale latency (`--cluster`): a real control plane (tests/cluster/harness.py); one client PATCHes
   `inferencemodels/<m>/scale` 0 -> 1 (then 1 -> 0, not timed: scale-downs are not sent to the webhook)
   one request at a time, in interleaved blocks with the shipped ValidatingWebhookConfiguration installed
   (pointed at the live webhook) and deleted. Reports p50/p99 for each and the with/without ratio, for
   committed scale-ups and for server-side dry runs (webhook called, nothing committed).

Usage: .venv/bin/python bench/webhook_bench.py [--rate 200] [--duration 10] [--cluster] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from certs.generate import generate_serving_certificate, write_files  # noqa: E402

CAPTURED = REPO / "tests" / "fixtures" / "captured"
CRD = REPO / "deploy" / "crd" / "inferencemodels.inference.eh-ops.io.yaml"
DEPLOY = REPO / "deploy" / "webhook"
IBC = [sys.executable, "-m", "ibc"]
GROUP, VERSION, PLURAL = "inference.eh-ops.io", "v1alpha1", "inferencemodels"
FIT_MODELS = 50  # 1Gi each in a huge pool: every scale-up fits and is committed (one ledger entry each)
WEBHOOK_USER = "system:serviceaccount:ibc-system:ibc-webhook"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values_s: list[float]) -> dict[str, float]:
    return {
        "n": len(values_s),
        "p50_ms": round(percentile(values_s, 50) * 1000, 2),
        "p99_ms": round(percentile(values_s, 99) * 1000, 2),
    }


# ----------------------------------------------------------------------------- objects and reviews


def pool_objects(namespace: str = "default") -> list[dict[str, Any]]:
    """A 10Ti pool with FIT_MODELS 1Gi models, and a 100Gi pool with one model that can never fit."""
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": "bench-fit", "labels": {"ibc.test/pool": "bench-fit"},
                      "annotations": {"inference.eh-ops.io/memory-capacity": "10Ti"}}},
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": "bench-full", "labels": {"ibc.test/pool": "bench-full"},
                      "annotations": {"inference.eh-ops.io/memory-capacity": "100Gi"}}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceModel",
         "metadata": {"name": "too-big", "namespace": namespace},
         "spec": {"modelName": "too-big", "memory": "200Gi", "replicas": 0,
                  "nodeSelector": {"ibc.test/pool": "bench-full"}}},
    ]
    for i in range(FIT_MODELS):
        objs.append({"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceModel",
                     "metadata": {"name": f"fit-{i:02d}", "namespace": namespace},
                     "spec": {"modelName": f"fit-{i:02d}", "memory": "1Gi", "replicas": 0,
                              "nodeSelector": {"ibc.test/pool": "bench-fit"}}})
    return objs


def scale_review(name: str, namespace: str, old: int, new: int, uid: str) -> bytes:
    review = json.loads((CAPTURED / "admission-update-inferencemodel-scale.json").read_text())
    req = review["request"]
    req.update(uid=uid, name=name, namespace=namespace)
    for key, replicas in (("object", new), ("oldObject", old)):
        req[key]["metadata"].update(name=name, namespace=namespace)
        req[key]["spec"] = {"replicas": replicas} if replicas else {}
    return json.dumps(review).encode()


def review_mix(namespace: str) -> Iterator[tuple[str, bytes]]:
    """Endless round-robin of the four kinds of review, with fresh uids."""
    deployment = json.loads((CAPTURED / "admission-update-deployment.json").read_text())
    counter = itertools.count()
    for i in counter:
        kind = ("commit", "deny", "decrease", "not-model")[i % 4]
        uid = f"bench-{i}"
        if kind == "commit":
            yield kind, scale_review(f"fit-{(i // 4) % FIT_MODELS:02d}", namespace, 0, 1, uid)
        elif kind == "deny":
            yield kind, scale_review("too-big", namespace, 0, 1, uid)
        elif kind == "decrease":
            yield kind, scale_review(f"fit-{(i // 4) % FIT_MODELS:02d}", namespace, 1, 0, uid)
        else:
            d = copy.deepcopy(deployment)
            d["request"]["uid"] = uid
            yield kind, json.dumps(d).encode()


# ----------------------------------------------------------------------------- direct latency


@contextlib.contextmanager
def webhook_process(work: Path, args: list[str], tls: Any, name: str) -> Iterator[str]:
    port = free_port()
    log = work / f"{name}.log"
    argv = [*IBC, "--log-level", "WARNING", "webhook", "--bind", f"127.0.0.1:{port}",
            "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), *args]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ibc webhook exited {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError), httpx.Client(verify=str(tls.ca), timeout=2) as c:
                if c.get(url + "/readyz").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ibc webhook not ready in 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def server_buckets(url: str, ca: Path) -> dict[float, float]:
    """The webhook's own review-duration histogram (all resources, all workers): upper bound -> count."""
    buckets: dict[float, float] = {}
    with httpx.Client(verify=str(ca), timeout=10) as c:
        for line in c.get(url + "/metrics").text.splitlines():
            if line.startswith("ibc_webhook_review_duration_seconds_bucket{"):
                labels, value = line.rsplit(" ", 1)
                le = labels.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets


def server_percentiles(before: dict[float, float], after: dict[float, float]) -> dict[str, str]:
    """p50/p99 measured inside the server (request parsed to response built), as histogram bucket bounds."""
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in sorted(after)}
    total = diff.get(float("inf"), 0.0)
    out = {}
    for q in (50, 99):
        bound = next((b for b, n in diff.items() if total and n >= total * q / 100), float("inf"))
        out[f"p{q}_ms"] = f"<= {bound * 1000:g}" if bound != float("inf") else "> 2500"
    return out


def open_loop(url: str, ca: Path, namespace: str, rate: float, duration: float) -> dict[str, Any]:
    """Send the review mix at `rate`/s for `duration` s; latency per request, per kind and overall."""
    total = int(rate * duration)
    requests = list(itertools.islice(review_mix(namespace), total))
    results: list[tuple[str, float, bool]] = []
    late: list[float] = []
    lock = threading.Lock()
    next_index = itertools.count()
    start = time.perf_counter() + 0.5

    def worker() -> None:
        with httpx.Client(verify=str(ca), timeout=10, headers={"Content-Type": "application/json"}) as client:
            client.get(url + "/livez")  # open the kept-alive connection before the clock starts
            while True:
                i = next(next_index)
                if i >= total:
                    return
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                kind, body = requests[i]
                t0 = time.perf_counter()
                resp = client.post(url + "/validate", content=body)
                elapsed = time.perf_counter() - t0
                ok = resp.status_code == 200 and resp.json()["response"]["uid"] == f"bench-{i}"
                with lock:
                    results.append((kind, elapsed, ok))
                    late.append(max(0.0, t0 - due))

    before = server_buckets(url, ca)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    out: dict[str, Any] = {"overall": summary([e for _, e, _ in results])}
    out["server"] = server_percentiles(before, server_buckets(url, ca))
    for kind in ("commit", "deny", "decrease", "not-model"):
        out[kind] = summary([e for k, e, _ in results if k == kind])
    out["errors"] = sum(1 for *_, ok in results if not ok)
    out["achieved_rate"] = round(len(results) / wall, 1)
    out["late_p99_ms"] = round(percentile(late, 99) * 1000, 2)
    return out


def direct_offline(work: Path, tls: Any, rate: float, duration: float) -> dict[str, Any]:
    state = work / "bench-state.yaml"
    state.write_text(yaml.safe_dump_all(pool_objects()))
    with webhook_process(work, ["--cluster-state", str(state), "--threads", "8"], tls, "offline") as url:
        return open_loop(url, tls.ca, "default", rate, duration)


# ----------------------------------------------------------------------------- cluster


def shipped_configuration(url: str, ca_pem: bytes) -> dict[str, Any]:
    config = yaml.safe_load((DEPLOY / "validatingwebhookconfiguration.yaml").read_text())
    config["metadata"]["annotations"] = {}
    for hook in config["webhooks"]:
        hook["clientConfig"] = {"url": f"{url}/validate", "caBundle": base64.b64encode(ca_pem).decode()}
    return config


def timed_scale_ups(custom: Any, namespace: str, names: list[str], dry_run: bool) -> list[float]:
    """PATCH each model's scale 0 -> 1 (timed), then back to 0 (untimed); one request at a time."""
    out = []
    for name in names:
        t0 = time.perf_counter()
        if dry_run:
            custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, name,
                                                        {"spec": {"replicas": 1}}, dry_run="All")
        else:
            custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, name,
                                                        {"spec": {"replicas": 1}})
        out.append(time.perf_counter() - t0)
        if not dry_run:
            custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, name,
                                                        {"spec": {"replicas": 0}})
    return out


def cluster_benchmarks(work: Path, rate: float, duration: float, rounds: int, crd: Path,
                       reviews_of: Callable[[str], float] | None = None) -> dict[str, Any]:
    from kubernetes import client

    from tests.cluster import harness

    cp = harness.ControlPlane.start_new(bin_dir=harness.ensure_binaries(stream=sys.stderr))
    try:
        cp.kubectl("apply", "-f", str(crd), check=True)
        cp.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{PLURAL}.{GROUP}", check=True)
        cp.kubectl("create", "namespace", "ibc-system", check=True)
        cp.kubectl("create", "namespace", "bench", check=True)
        cp.kubectl("apply", "-f", str(DEPLOY / "serviceaccount.yaml"), "-f", str(DEPLOY / "rbac.yaml"), check=True)
        api = cp.api_client()
        for obj in pool_objects("bench"):
            if obj["kind"] == "Node":
                labels = obj["metadata"]["labels"]
                capacity = obj["metadata"]["annotations"]["inference.eh-ops.io/memory-capacity"]
                harness.create_node(api, obj["metadata"]["name"], capacity=capacity, labels=labels)
            else:
                client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, "bench", PLURAL, obj)
        kubeconfig = cp.write_user_kubeconfig(WEBHOOK_USER)
        cert, key, ca = cp.issue_serving_cert(["localhost"], ["127.0.0.1"])
        tls = argparse.Namespace(cert=cert, key=key, ca=ca)
        live_args = ["--kubeconfig", str(kubeconfig), "--workers", "2", "--threads", "8",
                     "--ledger-namespace", "ibc-system"]
        with webhook_process(work, live_args, tls, "live") as url:
            direct_live = open_loop(url, ca, "bench", rate, duration)
            config = json.dumps(shipped_configuration(url, ca.read_bytes()))
            custom = client.CustomObjectsApi(api)
            names = [f"fit-{i:02d}" for i in range(FIT_MODELS)]
            timings: dict[str, list[float]] = {"with": [], "without": [], "with-dry": [], "without-dry": []}
            timed_scale_ups(custom, "bench", names[:10], dry_run=False)  # warm connections and caches
            for _ in range(rounds):
                for mode in ("with", "without"):
                    if mode == "with":
                        cp.kubectl("apply", "-f", "-", input=config, check=True)
                    else:
                        cp.kubectl("delete", "validatingwebhookconfiguration", "ibc-webhook", check=True)
                    time.sleep(2.0)  # the apiserver's webhook configuration informer picks the change up
                    timings[mode] += timed_scale_ups(custom, "bench", names, dry_run=False)
                    timings[f"{mode}-dry"] += timed_scale_ups(custom, "bench", names, dry_run=True)
        result: dict[str, Any] = {"direct_live": direct_live}
        for key, values in timings.items():
            result[f"api_{key}"] = summary(values)
        for suffix in ("", "-dry"):
            with_, without = result[f"api_with{suffix}"], result[f"api_without{suffix}"]
            result[f"ratio{suffix or '-commit'}"] = {
                "p50": round(with_["p50_ms"] / without["p50_ms"], 2),
                "p99": round(with_["p99_ms"] / without["p99_ms"], 2),
            }
        return result
    finally:
        cp.stop()


def print_direct(title: str, r: dict[str, Any]) -> None:
    print(f"\n{title}: {r['achieved_rate']} req/s achieved, {r['errors']} errors, "
          f"sender late p99 {r['late_p99_ms']} ms")
    print(f"  inside the server: p50 {r['server']['p50_ms']} ms, p99 {r['server']['p99_ms']} ms")
    print(f"  {'kind':<10} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in ("overall", "commit", "deny", "decrease", "not-model"):
        s = r[kind]
        print(f"  {kind:<10} {s['n']:>6} {s['p50_ms']:>8} {s['p99_ms']:>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="direct requests per second (default 200)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of direct load (default 10)")
    parser.add_argument("--cluster", action="store_true", help="also run the live and API benchmarks")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved with/without rounds (default 3)")
    parser.add_argument("--crd", type=Path, default=CRD, help=f"the CRD file (default {CRD.relative_to(REPO)})")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {"rate": args.rate, "duration_s": args.duration}
    with tempfile.TemporaryDirectory(prefix="ibc-webhook-bench-") as tmp:
        work = Path(tmp)
        tls = write_files(generate_serving_certificate("ibc-webhook", "ibc-system", ip_addresses=["127.0.0.1"]),
                          work / "tls")
        results["direct_offline"] = direct_offline(work, tls, args.rate, args.duration)
        print_direct("Direct, offline (in-process lock, 1 worker x 8 threads)", results["direct_offline"])
        if args.cluster:
            results.update(cluster_benchmarks(work, args.rate, args.duration, args.rounds, args.crd))
            print_direct("Direct, live (watch cache + ConfigMap ledger, 2 workers x 8 threads)",
                         results["direct_live"])
            print("\nAPI scale request (PATCH inferencemodels/<m>/scale 0 -> 1), one at a time, interleaved:")
            print(f"  {'':<34} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}")
            for key, label in (("with", "with webhook (committed)"), ("without", "without webhook"),
                               ("with-dry", "with webhook (dry run)"), ("without-dry", "without webhook (dry run)")):
                s = results[f"api_{key}"]
                print(f"  {label:<34} {s['n']:>5} {s['p50_ms']:>8} {s['p99_ms']:>8}")
            for key in ("ratio-commit", "ratio-dry"):
                print(f"  {key}: p50 x{results[key]['p50']}, p99 x{results[key]['p99']}  (target <= 1.2)")
    print(f"\ntarget: direct p99 <= 5 ms -> offline p99 {results['direct_offline']['overall']['p99_ms']} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
