#!/usr/bin/env python3
"""Run every benchmark side by side and write bench/RESULTS.md: the engine behind `ibc bench` (and `make bench`).

Why one runner: a figure from a shared 2-core machine means something only next to a baseline taken in
the same run, on the same machine, at the same load. This runs the benchmark scripts as they are (their
owners keep them; nothing here re-implements them), then measures the loopback floor (bench/floor.py)
with each script's own client and the same counts, and writes one Markdown file in which every figure
sits beside its baseline or peer and the ratio, stamped with the machine (CPU, cores, RAM, kernel,
Python), the date, the commit and the load average before, during and after.

Sections (`--only`): proxy (bench/proxy_bench.py), webhook (bench/webhook_bench.py), extender
(bench/extender_bench.py), recovery and coldstart (bench/stress_recovery.py), concurrency
(bench/concurrency_bench.py), engine (bench/engine_bench.py), load (bench/load_bench.py), routing
(bench/routing_bench.py). Raw figures go to
bench/out/results.json, each script's output to bench/out/logs/<section>.log.

    .venv/bin/ibc bench --quick                  # or: .venv/bin/python bench/run_all.py --quick
    .venv/bin/ibc bench --cluster --max-load 1.5 # the committed run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OUT = BENCH / "out"
LOGS = OUT / "logs"
PY = sys.executable


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"ibc_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(f"[ibc bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    commit, dirty = "unknown", False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
    }


def wait_for_quiet(max_load: float | None, wait_minutes: float) -> dict[str, Any]:
    """Wait until the 1-minute load average is below `max_load`, checking every minute; say how it went."""
    if max_load is None:
        return {"asked": None, "waited_s": 0, "quiet": None, "load_at_start": os.getloadavg()[0]}
    started = time.monotonic()
    deadline = started + wait_minutes * 60
    while True:
        load = os.getloadavg()[0]
        if load < max_load:
            return {
                "asked": max_load,
                "waited_s": round(time.monotonic() - started),
                "quiet": True,
                "load_at_start": load,
            }
        if time.monotonic() >= deadline:
            say(f"load average still {load:.2f} >= {max_load} after {wait_minutes:g} min: running anyway")
            return {
                "asked": max_load,
                "waited_s": round(time.monotonic() - started),
                "quiet": False,
                "load_at_start": load,
            }
        say(f"load average {load:.2f} >= {max_load}: waiting (up to {wait_minutes:g} min, checked every minute)")
        time.sleep(min(60.0, max(1.0, deadline - time.monotonic())))


class CpuMeter:
    """CPU time the whole machine spent vs what this run (and the children it waited for) spent.

    The difference is what other jobs used while a section ran: an objective noise stamp, since the load
    average also counts the benchmark's own servers and load generators.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / self._tick  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def reading(self) -> dict[str, float]:
        now, busy, ours = self._read()
        wall, total, mine = now - self._start[0], busy - self._start[1], ours - self._start[2]
        cores = os.cpu_count() or 1
        other = max(0.0, total - mine)
        return {
            "wall_s": round(wall, 1),
            "machine_cpu_s": round(total, 1),
            "ours_cpu_s": round(mine, 1),
            "others_cpu_s": round(other, 1),
            "others_share": round(other / max(wall * cores, 1e-9), 3),
        }


# ----------------------------------------------------------------------------- running the scripts


def run_script(section: str, argv: list[str], timeout_seconds: float) -> float:
    """Run one benchmark script, its output into bench/out/logs/<section>.log; returns the seconds it took."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{section}.log"
    shown = " ".join(shlex.quote(a) for a in [Path(argv[1]).relative_to(REPO).as_posix(), *argv[2:]])
    say(f"{section}: {shown}  (log: {log.relative_to(REPO)})")
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_seconds, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{shown} did not finish within {timeout_seconds:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{shown} exited with code {proc.returncode}:\n{tail}")
    took = time.monotonic() - started
    say(f"{section}: done in {took:.0f}s")
    return took


def read_json(path: Path, newer_than: float) -> Any:
    if not path.is_file() or path.stat().st_mtime < newer_than:
        raise RuntimeError(f"{path.relative_to(REPO)} was not written by this run")
    return json.loads(path.read_text())


class Context:
    """What the sections share: options, the floor module, the load at each section's start."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.cluster: bool = args.cluster
        self.litellm: bool = args.litellm
        self.repeat: int = args.repeat or (1 if args.quick else 3)
        self.floor = _load("floor")


def section_proxy(ctx: Context) -> dict[str, Any]:
    rounds, requests, seconds = (1, 500, 2.0) if ctx.quick else (3, 2000, 5.0)
    argv = [PY, str(BENCH / "proxy_bench.py")] + (["--quick"] if ctx.quick else [])
    argv += [] if ctx.litellm else ["--no-litellm"]
    began = time.time()
    took = run_script("proxy", argv, 3600)
    bench = read_json(OUT / "proxy_bench.json", began)
    say("proxy: the floor, with the proxy benchmark's clients")
    floor = ctx.floor.proxy_floor(
        rounds=rounds,
        requests=requests,
        seconds=seconds,
        concurrency=[int(c) for c in next(iter(bench["targets"].values()))["rps"]],
        rate=float(bench["fast_429"]["rate_per_s"]),
    )
    return {"bench": bench, "floor": floor, "seconds": round(took)}


def section_webhook(ctx: Context) -> dict[str, Any]:
    rate, duration = 200.0, (3.0 if ctx.quick else 10.0)
    out = OUT / "webhook.json"
    argv = [
        PY,
        str(BENCH / "webhook_bench.py"),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{duration:g}",
        "--json",
        str(out),
    ]
    if ctx.cluster:
        argv += ["--cluster", "--rounds", "1" if ctx.quick else "3"]
    began = time.time()
    took = run_script("webhook", argv, 3600)
    bench = read_json(out, began)
    say("webhook: the floor, with the webhook benchmark's open-loop client")
    floor = ctx.floor.webhook_floor(rate, duration)
    return {"bench": bench, "floor": floor, "seconds": round(took)}


def section_extender(ctx: Context) -> dict[str, Any]:
    sizes = [100, 1000] if ctx.quick else [100, 1000, 5000]
    forms = ["nodenames", "nodes"]
    out = OUT / "extender.json"
    argv = [
        PY,
        str(BENCH / "extender_bench.py"),
        "--sizes",
        ",".join(map(str, sizes)),
        "--forms",
        ",".join(forms),
        "--json",
        str(out),
    ]
    if ctx.cluster:
        argv += [
            "--throughput",
            "--throughput-nodes",
            "200" if ctx.quick else "1000",
            "--pods",
            "100" if ctx.quick else "300",
            "--rounds",
            "1" if ctx.quick else "2",
        ]
    began = time.time()
    took = run_script("extender", argv, 5400)
    bench = read_json(out, began)
    say("extender: the floor, with the extender benchmark's client and request bodies")
    floor = ctx.floor.extender_floor(sizes, forms)
    return {"bench": bench, "floor": floor, "seconds": round(took)}


def section_recovery(ctx: Context) -> dict[str, Any]:
    out = OUT / "recovery.json"
    argv = [PY, str(BENCH / "stress_recovery.py"), "--only", "kill9", "--repeat", str(ctx.repeat), "--json", str(out)]
    began = time.time()
    took = run_script("recovery", argv, 3600)
    return {"bench": read_json(out, began), "seconds": round(took)}


def section_coldstart(ctx: Context) -> dict[str, Any]:
    out = OUT / "coldstart.json"
    argv = [
        PY,
        str(BENCH / "stress_recovery.py"),
        "--only",
        "coldstart",
        "--repeat",
        str(ctx.repeat),
        "--burst",
        "100" if ctx.quick else "200",
        "--json",
        str(out),
    ]
    began = time.time()
    took = run_script("coldstart", argv, 3600)
    return {"bench": read_json(out, began), "seconds": round(took)}


def section_concurrency(ctx: Context) -> dict[str, Any]:
    out = OUT / "concurrency_bench.json"
    streams = ["100", "1000"] if ctx.quick else ["100", "1000", "5000"]
    targets = ["backend", "local-gevent", "proxy-gevent-1w", "proxy-gevent", "proxy-gthread"]
    targets += ["litellm"] if ctx.litellm else []
    argv = [PY, str(BENCH / "concurrency_bench.py"), "--streams", *streams, "--targets", *targets, "--out", str(out)]
    began = time.time()
    took = run_script("concurrency", argv, 3600)
    return {"bench": read_json(out, began), "seconds": round(took)}


def section_engine(ctx: Context) -> dict[str, Any]:
    out = OUT / "engine.json"
    argv = [PY, str(BENCH / "engine_bench.py"), "--repeat", str(ctx.repeat), "--json", str(out)]
    argv += ["--requests", "50", "--presets", "tiny"] if ctx.quick else ["--requests", "200"]
    began = time.time()
    took = run_script("engine", argv, 3600)  # builds the engine first when it is not cached (minutes, once)
    return {"bench": read_json(out, began), "seconds": round(took)}


def section_load(ctx: Context) -> dict[str, Any]:
    out = OUT / "load.json"
    argv = [PY, str(BENCH / "load_bench.py"), "--repeat", str(ctx.repeat), "--json", str(out)]
    began = time.time()
    took = run_script("load", argv, 1800)
    return {"bench": read_json(out, began), "seconds": round(took)}


def section_routing(ctx: Context) -> dict[str, Any]:
    out = OUT / "routing.json"
    argv = [PY, str(BENCH / "routing_bench.py"), "--rounds", "1" if ctx.quick else "3", "--json", str(out)]
    began = time.time()
    took = run_script("routing", argv, 1800)
    return {"bench": read_json(out, began), "seconds": round(took)}


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "proxy": section_proxy,
    "webhook": section_webhook,
    "extender": section_extender,
    "recovery": section_recovery,
    "coldstart": section_coldstart,
    "concurrency": section_concurrency,
    "engine": section_engine,
    "load": section_load,
    "routing": section_routing,
}


# ----------------------------------------------------------------------------- the report


def num(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(ours: Any, base: Any) -> str:
    """`xours/base`, or — when either is missing or the base is not positive."""
    if not isinstance(ours, int | float) or not isinstance(base, int | float) or base <= 0:
        return "—"
    value = ours / base
    return f"x{value:.2g}" if 0 < value < 0.1 else f"x{value:.2f}"


def render_proxy(s: dict[str, Any]) -> list[str]:
    b, f = s["bench"], s["floor"]
    targets = b.get("targets", {})
    direct = targets.get("direct", {})
    conc = [c for c in next(iter(targets.values()))["rps"]] if targets else []
    lines = [
        "## Proxy: request path overhead (bench/proxy_bench.py)",
        "",
        f"Same mock backend (`ibc mock-backend`) behind every proxy, {b['settings'].get('rounds')} interleaved "
        f"round(s); load generator {b.get('load_generator')}; LiteLLM: {b.get('litellm')}. *direct* is the backend "
        "alone (the peer every proxy is compared with); the floor is bench/floor.py measured with the same "
        f"clients right after ({f['client']}). Proxies run as `ibc` does: gunicorn gthread "
        f"{b['settings'].get('workers')} workers x {b['settings'].get('threads')} threads.",
        "",
        "| target | p50 ms (c=1) | xfloor | xdirect | p99 ms | xfloor | added p50 / p99 ms | stream 1st chunk added ms "
        "| chunk gap ms | " + " | ".join(f"req/s c={c}" for c in conc) + " | c=16 xfloor | c=16 xdirect "
        "| server CPU µs/req | RSS MiB |",
        "|---" * (13 + len(conc)) + "|",
        f"| **floor** | {num(f['p50_ms'], 3)} | x1.00 | — | {num(f['p99_ms'], 3)} | x1.00 | — | — | — | "
        + " | ".join(num(f["rps"].get(str(c)), 0) for c in conc)
        + " | x1.00 | — | — | — |",
    ]
    for name, r in targets.items():
        added = "—" if name == "direct" else f"{num(r.get('added_p50_ms'))} / {num(r.get('added_p99_ms'))}"
        first = "—" if name == "direct" else num(r.get("first_chunk_added_p50_ms"))
        rps16 = r.get("rps", {}).get("16")
        lines.append(
            f"| {name} | {num(r.get('p50_ms'), 3)} | {ratio(r.get('p50_ms'), f['p50_ms'])} | "
            f"{ratio(r.get('p50_ms'), direct.get('p50_ms'))} | {num(r.get('p99_ms'), 3)} | "
            f"{ratio(r.get('p99_ms'), f['p99_ms'])} | {added} | {first} | {num(r.get('gap_p50_ms'))} | "
            + " | ".join(num(r.get("rps", {}).get(c), 0) for c in conc)
            + f" | {ratio(rps16, f['rps'].get('16'))} | {ratio(rps16, direct.get('rps', {}).get('16'))} | "
            f"{num(r.get('cpu_us_per_request'), 0)} | {num(r.get('rss_mib'), 0)} |"
        )
    fast = b.get("fast_429") or {}
    paced = b.get("paced_429_wrk") or {}
    fo, fp = f.get("open_loop") or {}, f.get("paced_wrk") or {}
    lines += [
        "",
        f"**429 fast path** (`ibc` answering a model that cannot fit, at {num(fast.get('rate_per_s'), 0)} requests/s "
        "open loop; latency from the scheduled send). Peer: the floor answering 200 to the same sender at the same "
        "rate.",
        "",
        "| sender | ibc 429 p50 ms | floor p50 ms | xfloor | ibc 429 p99 ms | floor p99 ms | xfloor |",
        "|---|---|---|---|---|---|---|",
        f"| Python open loop | {num(fast.get('p50_ms'), 3)} | {num(fo.get('p50_ms'), 3)} | "
        f"{ratio(fast.get('p50_ms'), fo.get('p50_ms'))} | {num(fast.get('p99_ms'), 3)} | {num(fo.get('p99_ms'), 3)} | "
        f"{ratio(fast.get('p99_ms'), fo.get('p99_ms'))} |",
    ]
    if paced:
        lines.append(
            f"| wrk, paced | {num(paced.get('p50_ms'), 3)} | {num(fp.get('p50_ms'), 3)} | "
            f"{ratio(paced.get('p50_ms'), fp.get('p50_ms'))} | {num(paced.get('p99_ms'), 3)} | "
            f"{num(fp.get('p99_ms'), 3)} | {ratio(paced.get('p99_ms'), fp.get('p99_ms'))} |"
        )
    if "litellm" in targets and "ibc" in targets:
        times = ratio(targets["litellm"].get("added_p50_ms"), targets["ibc"].get("added_p50_ms")).lstrip("x")
        lines += ["", f"LiteLLM adds {times} times the p50 latency `ibc` adds (same backend, same client)."]
    return lines


def render_webhook(s: dict[str, Any]) -> list[str]:
    b, f = s["bench"], s["floor"]
    d = b.get("direct_offline") or {}
    lines = [
        "## Admission webhook (bench/webhook_bench.py)",
        "",
        f"`ibc webhook --cluster-state` (offline ledger, 1 worker x 8 threads) over TLS, AdmissionReviews sent open "
        f"loop at {num(b.get('rate'), 0)}/s for {num(b.get('duration_s'), 0)} s by 8 kept-alive httpx threads "
        f"(achieved {num(d.get('achieved_rate'), 1)}/s, {d.get('errors')} errors). The floor answers the same sender "
        "with a fixed AdmissionReview (uid echoed) over TLS.",
        "",
        "| review | n | p50 ms | floor p50 | xfloor | p99 ms | floor p99 | xfloor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("overall", "commit", "deny", "decrease", "not-model"):
        r, fl = d.get(kind) or {}, f.get(kind) or {}
        lines.append(
            f"| {kind} | {r.get('n', '—')} | {num(r.get('p50_ms'))} | {num(fl.get('p50_ms'))} | "
            f"{ratio(r.get('p50_ms'), fl.get('p50_ms'))} | {num(r.get('p99_ms'))} | {num(fl.get('p99_ms'))} | "
            f"{ratio(r.get('p99_ms'), fl.get('p99_ms'))} |"
        )
    server = d.get("server") or {}
    if server:
        lines += [
            "",
            f"Inside the server (its own histogram, bucket bounds): p50 {server.get('p50_ms')} ms, "
            f"p99 {server.get('p99_ms')} ms.",
        ]
    if "api_with" in b:
        live = b.get("direct_live") or {}
        lines += [
            "",
            "**Live, behind a real kube-apiserver** (tests/cluster/harness.py; watch cache + ConfigMap ledger, 2 "
            f"workers): direct open loop p50 {num(live.get('overall', {}).get('p50_ms'))} ms, p99 "
            f"{num(live.get('overall', {}).get('p99_ms'))} ms ({live.get('errors')} errors). API scale request "
            "(`PATCH inferencemodels/<m>/scale` 0 → 1, one at a time, interleaved with and without the webhook "
            "configuration):",
            "",
            "| request | with webhook p50 / p99 ms | without p50 / p99 ms | ratio p50 | ratio p99 |",
            "|---|---|---|---|---|",
        ]
        for key, label in (("", "committed scale-up"), ("-dry", "server-side dry run")):
            w, wo = b.get(f"api_with{key}", {}), b.get(f"api_without{key}", {})
            lines.append(
                f"| {label} | {num(w.get('p50_ms'))} / {num(w.get('p99_ms'))} | {num(wo.get('p50_ms'))} / "
                f"{num(wo.get('p99_ms'))} | {ratio(w.get('p50_ms'), wo.get('p50_ms'))} | "
                f"{ratio(w.get('p99_ms'), wo.get('p99_ms'))} |"
            )
    return lines


def render_extender(s: dict[str, Any]) -> list[str]:
    b, floor_rows = s["bench"], s["floor"]
    floor = {(r["nodes"], r["form"]): r for r in floor_rows}
    lines = [
        "## Scheduler extender (bench/extender_bench.py)",
        "",
        "`ibc extender` (1 worker x 8 threads, over TLS) on a snapshot of N nodes, half holding a bound model pod; "
        "one client sends filter calls one after another on a kept-alive connection, as kube-scheduler does. The "
        "floor receives the same request bodies from the same client and answers a fixed body. Shape `unified`: "
        "nodes with the capacity annotation (one device); `dra8`: eight 80Gi GPUs per node from a ResourceSlice.",
        "",
        "| nodes | shape | form | request KiB | p50 ms | floor p50 | xfloor | p99 ms | floor p99 | xfloor "
        "| server CPU ms/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b.get("filter_latency", []):
        fl = floor.get((r["nodes"], r["form"]), {})
        lines.append(
            f"| {r['nodes']:,} | {r.get('shape', 'unified')} | {r['form']} | {num(r.get('request_kib'), 1)} | "
            f"{num(r.get('p50_ms'))} | "
            f"{num(fl.get('p50_ms'))} | {ratio(r.get('p50_ms'), fl.get('p50_ms'))} | {num(r.get('p99_ms'))} | "
            f"{num(fl.get('p99_ms'))} | {ratio(r.get('p99_ms'), fl.get('p99_ms'))} | {num(r.get('server_cpu_ms'))} |"
        )
    t = b.get("throughput")
    if t:
        lines += [
            "",
            f"**kube-scheduler throughput** at {t.get('nodes')} fake nodes, {t.get('pods_per_round')} pods per round, "
            f"{t.get('rounds')} alternating round(s): {num(t.get('extender_median'), 1)} pods/s with the shipped "
            f"extender config vs {num(t.get('plain_median'), 1)} pods/s without (ratio x{num(t.get('ratio'))}).",
        ]
        if t.get("nobind_median") is not None:
            lines.append(f"Without bindVerb: {num(t.get('nobind_median'), 1)} pods/s.")
    return lines


def render_recovery(s: dict[str, Any]) -> list[str]:
    rows = s["bench"].get("kill9", [])
    lines = [
        "## Recovery after SIGKILL under load (bench/stress_recovery.py; tests/stress/test_kill9.py asserts the same)",
        "",
        "Each component runs as `ibc` does (gunicorn; TLS for webhook and extender) under a steady load of 4 "
        "client threads. First its worker is SIGKILLed (gunicorn replaces it), then the whole process group (a "
        "crashed container, restarted at once). *Answering* = the first correct answer to a request sent after "
        "the kill. Baseline: the restarted process's own start-up (exec to its readiness probe answering). "
        "Promised memory is watched the whole time (local: live model processes; webhook: its ledger; extender: "
        "its reservation book).",
        "",
        "| component | runs | worker SIGKILL → answering s | crash → answering s | of which restart → ready s | "
        "crash xrestart | good answers | overcommits | leaked after TTL | leftover processes | peak promised / "
        "capacity GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['component']} | {r['runs']} | {num(r['recover_after_worker_kill_s'])} | "
            f"{num(r['recover_after_crash_s'])} | {num(r['restart_ready_s'])} | "
            f"{ratio(r['recover_after_crash_s'], r['restart_ready_s'])} | {r['good_answers']} | {r['overcommits']} | "
            f"{r['leaked_after_ttl']} | {r['leftover_processes']} | {num(r['peak_promised_gib'], 0)} / "
            f"{num(r['capacity_gib'], 0)} |"
        )
    return lines


def render_coldstart(s: dict[str, Any]) -> list[str]:
    c = s["bench"].get("coldstart", {})
    return [
        "## Scale from zero under a burst (bench/stress_recovery.py)",
        "",
        f"{c.get('burst')} concurrent requests for a stopped model through `ibc local` (the model: `ibc mock-backend "
        f"--startup-delay {c.get('backend_startup_delay_s')}`), median of {c.get('runs')} run(s). Baseline: the same "
        "command started directly, /health polled every 10 ms.",
        "",
        "| | seconds | xdirect start |",
        "|---|---|---|",
        f"| direct start → healthy (baseline) | {num(c.get('direct_start_to_healthy_s'), 3)} | x1.00 |",
        f"| burst: first answer through ibc local | {num(c.get('through_proxy_first_answer_s'), 3)} | "
        f"{ratio(c.get('through_proxy_first_answer_s'), c.get('direct_start_to_healthy_s'))} |",
        f"| burst: last answer through ibc local | {num(c.get('through_proxy_last_answer_s'), 3)} | "
        f"{ratio(c.get('through_proxy_last_answer_s'), c.get('direct_start_to_healthy_s'))} |",
        "",
        f"Answers other than 200: {c.get('not_200')}.",
    ]


def render_concurrency(s: dict[str, Any]) -> list[str]:
    runs = s["bench"]
    base = {r["streams"]: r for r in runs if r["target"] == "backend"}
    lines = [
        "## Concurrent streams (bench/concurrency_bench.py)",
        "",
        "N clients each open one streamed completion at the same moment (20 tokens 50 ms apart: a 1-s stream) "
        "against `ibc mock-backend` alone and through each proxy. Ratios are to the backend alone at the same N. "
        "`proxy-*`: the proxy's app as `ibc proxy` runs it (2 workers; gevent, or gthread x 64 threads, the old "
        "default; `proxy-gevent-1w`: one gevent worker, the shape `ibc local` must have); `local-gevent`: "
        "`ibc local` with its defaults (1 worker). RSS per stream: the proxy's peak RSS "
        "over its idle RSS, divided by N.",
        "",
        "| target | streams | completed | TTFC p50 / p99 (s) | wall (s) | gap p99 (s) "
        "| xbackend TTFC p99 / wall / gap p99 "
        "| RSS per stream (KiB) | load at start |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b = base.get(r["streams"])
        ratios = "—"
        if b and r["target"] != "backend":
            ratios = " / ".join(ratio(r[k], b[k]) for k in ("ttfc_p99_s", "wall_s", "gap_p99_s"))
        lines.append(
            f"| {r['target']} | {r['streams']} | {r['completed']}/{r['streams']} "
            f"| {r['ttfc_p50_s']} / {r['ttfc_p99_s']} "
            f"| {r['wall_s']} | {r['gap_p99_s']} | {ratios} | {r['rss_per_stream_kib'] or '—'} | {r['load']} |"
        )
    return lines


def render_engine(s: dict[str, Any]) -> list[str]:
    b = s["bench"]
    lines = [
        "## A real engine behind ibc local (bench/engine_bench.py)",
        "",
        "llama.cpp's OpenAI server (`llama-cpp-python[server]`, built by tests/engine/build-engine.sh) on GGUF models "
        "generated by tests/engine/make_gguf.py. Cold start: the engine started by hand (`/v1/models` polled every "
        "10 ms, then a one-token chat completion) versus that first request sent to `ibc local` with the model "
        f"stopped; medians of {next(iter(b['coldstart'].values()), {}).get('runs', '?')} run(s) each, alternately.",
        "",
        "| model (weights) | by hand: ready | by hand: first reply (baseline) | through ibc: first reply | ratio "
        "| engine RSS |",
        "|---|---|---|---|---|---|",
    ]
    for model, c in b["coldstart"].items():
        lines.append(
            f"| {model} ({num(c['weights_bytes'] / 1e6, 0)} MB) | {num(c['by_hand_ready_s'])} s | "
            f"{num(c['by_hand_first_reply_s'])} s | {num(c['ibc_first_reply_s'])} s | "
            f"{ratio(c['ibc_first_reply_s'], c['by_hand_first_reply_s'])} | {num(c['rss'] / 2**20, 0)} MiB |"
        )
    lat = b["latency"]
    lines += [
        "",
        f"Added latency on the running `{lat['model']}` engine, {lat['requests']} requests per side in turns "
        f"(ibc local's own RSS: {num(lat['ibc_rss'] / 2**20, 0)} MiB beside the engine's "
        f"{num(lat['engine_rss'] / 2**20, 0)} MiB):",
        "",
        "| | direct p50 / p90 (baseline) | through ibc p50 / p90 | added p50 | ratio p50 |",
        "|---|---|---|---|---|",
    ]
    for label, key in (("one-token chat completion", ""), ("first chunk of a stream", "_stream")):
        d, t = lat[f"direct{key}"], lat[f"ibc{key}"]
        lines.append(
            f"| {label} | {num(d['p50_ms'])} / {num(d['p90_ms'])} ms | {num(t['p50_ms'])} / {num(t['p90_ms'])} ms | "
            f"{num(t['p50_ms'] - d['p50_ms'])} ms | {ratio(t['p50_ms'], d['p50_ms'])} |"
        )
    return lines


def render_load(s: dict[str, Any]) -> list[str]:
    c = s["bench"].get("load", {})
    d = c.get("direct_start_to_healthy_s")
    rows = []
    for window, label in (("0s", "no stabilization window"), ("5s", "the default 5 s window")):
        figure = (c.get(f"window_{window}") or {}).get("saturation_to_serving_s")
        rows.append(f"| saturation → second replica serving, {label} | {num(figure, 3)} | {ratio(figure, d)} |")
    return [
        "## The load layer: saturation to a new replica serving (bench/load_bench.py)",
        "",
        f"One replica of a model behind `ibc local` (`ibc mock-backend --latency 1 --startup-delay "
        f"{c.get('backend_startup_delay_s')}`, `load.concurrency: 2`, `max_replicas: 2`), then {c.get('clients')} "
        "clients back to back; the time from their start to a second replica ready in the proxy's backends, "
        f"median of {c.get('runs')} run(s). Baseline: the same command started directly until /health answers. "
        f"Load average before / after: {c.get('load_before')} / {c.get('load_after')}.",
        "",
        "| | seconds | xdirect start |",
        "|---|---|---|",
        f"| direct start → healthy (baseline) | {num(d, 3)} | x1.00 |",
        *rows,
    ]


def render_routing(s: dict[str, Any]) -> list[str]:
    b = s["bench"]
    c = b["settings"]
    routings = b["routings"]
    base = routings.get("least-outstanding", {})
    lines = [
        "## Routing across replicas: prefix cache hits and time to first token (bench/routing_bench.py)",
        "",
        f"The same workload through `ibc proxy` (gevent, 2 workers) with each `--routing`, over {c['replicas']} fresh "
        f"`ibc mock-backend` replicas per run with vLLM's prefix cache simulated ({c['cache_blocks']} blocks of 64 "
        f"bytes each, {c['prefill_per_block'] * 1000:g} ms of prefill per uncached block, --max-running "
        f"{c['max_running']}): {c['prefixes']} shared system prompts of {c['prefix_blocks']} blocks, {c['requests']} "
        f"streamed chat requests per run (each a prefix plus its own question, the same seeded order for every "
        f"routing), {c['concurrency']} clients, {c['rounds']} interleaved round(s). Hit rate: the replicas' own "
        "`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`; TTFT: client to the first byte of the "
        "stream; the baseline is least-outstanding (the routing before prefix affinity).",
        "",
        "| routing | prefix cache hit rate | TTFT p50 / p99 ms | ratio p50 / p99 | wall s | requests per replica "
        "| errors | load per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in routings.items():
        p50, p99 = r["ttft_p50_ms"], r["ttft_p99_ms"]
        lines.append(
            f"| {name} | {r['hit_rate']:.1%} | {num(p50)} / {num(p99)} "
            f"| {ratio(p50, base.get('ttft_p50_ms'))} / {ratio(p99, base.get('ttft_p99_ms'))} "
            f"| {num(r['wall_s'])} | {' / '.join(map(str, r['served_per_replica']))} | {r['errors']} "
            f"| {', '.join(map(str, r['load']))} |"
        )
    cpu = b.get("cpu_us_per_request") or {}
    if cpu:
        base_cpu = cpu.get("least-outstanding, 3 replicas, 1 KiB prompt")
        lines += [
            "",
            "What routing costs the proxy: CPU time per request of its request path in-process (`ProxyApp.wsgi` over "
            f"a mock transport, best of 8 interleaved rounds, load {num(b.get('cpu_load'))}); the whole proxy spends "
            "its *server CPU µs/req* of the proxy section per request.",
            "",
            "| request path | CPU µs per request | ratio to least-outstanding |",
            "|---|---|---|",
            *(f"| {name} | {num(us, 1)} | {ratio(us, base_cpu)} |" for name, us in cpu.items()),
        ]
    return lines


RENDERERS = {
    "proxy": render_proxy,
    "webhook": render_webhook,
    "extender": render_extender,
    "recovery": render_recovery,
    "coldstart": render_coldstart,
    "concurrency": render_concurrency,
    "engine": render_engine,
    "load": render_load,
    "routing": render_routing,
}


def render(report: dict[str, Any]) -> str:
    m, q = report["machine"], report["quiet"]
    load = report["load"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{report['command']}` on {report['date']} in {report['minutes']:.0f} min. Do not edit: "
        "re-run the command (see docs/benchmarks.md for what each section measures and how to read it).",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['cores']} |",
        f"| RAM | {m['ram_gib']} GiB |",
        f"| kernel | {m['kernel']} |",
        f"| Python | {m['python']} |",
        f"| commit | {m['commit']}{' (with uncommitted changes in the working tree)' if m['dirty'] else ''} |",
        f"| load average (1 min) before / after | {load['start']:.2f} / {load['end']:.2f} |",
    ]
    if q["asked"] is not None:
        state = (
            f"below {q['asked']} after waiting {q['waited_s']} s"
            if q["quiet"]
            else f"still {q['load_at_start']:.2f} after waiting {q['waited_s']} s (ran anyway: figures are noisy)"
        )
        lines.append(f"| quiet-machine check | load {state} |")
    lines.append(f"| load at each section's start | {', '.join(f'{k} {v:.2f}' for k, v in load['sections'].items())} |")
    others = report.get("others") or {}
    if others:
        lines.append(
            "| CPU used by other jobs during each section (share of all cores; the load average also counts "
            "the benchmark's own servers) | "
            + ", ".join(
                f"{k} {v['others_share']:.0%} ({v['others_cpu_s']:.0f} of {v['wall_s'] * (m['cores'] or 1):.0f} core-s)"
                for k, v in others.items()
            )
            + " |"
        )
    lines += [
        "",
        "How to read: every figure sits beside its baseline or peer from the same run, and the ratio is ours ÷ "
        "baseline (latency: lower is better; throughput: higher is better). The *floor* is the cheapest answer "
        "this machine gives over loopback — a bare asyncio server returning a fixed JSON body (bench/floor.py) — "
        "measured with each benchmark's own client, so a ratio to the floor is the cost of our code beyond "
        "the client, the kernel and the TLS stack. All servers and load generators share the same cores.",
    ]
    for name, section in report["sections"].items():
        lines += ["", *RENDERERS[name](section), "", f"*Section time: {section.get('seconds', '?')} s.*"]
    if report["failures"]:
        lines += ["", "## Not measured", ""]
        for name, error in report["failures"].items():
            lines += [
                f"- **{name}**: failed; the figures of this section are missing.",
                "",
                "```",
                error.strip()[-2000:],
                "```",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace) -> int:
    """Run the selected sections and write the report; 0 when every section ran, 1 otherwise."""
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    for noisy in ("httpx", "certs"):  # the floor's clients log every request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet = wait_for_quiet(args.max_load, args.wait_minutes)
    report: dict[str, Any] = {
        "command": "ibc bench " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) if a),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "quiet": quiet,
        "load": {"start": os.getloadavg()[0], "sections": {}},
        "sections": {},
        "failures": {},
    }
    ctx = Context(args)
    report["others"] = {}
    for name in args.only:
        report["load"]["sections"][name] = os.getloadavg()[0]
        meter = CpuMeter()
        try:
            report["sections"][name] = SECTIONS[name](ctx)
        except Exception as exc:
            say(f"{name}: FAILED: {exc}")
            report["failures"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        report["others"][name] = meter.reading()
        say(f"{name}: other jobs used {report['others'][name]['others_share']:.0%} of the machine meanwhile")
    report["load"]["end"] = os.getloadavg()[0]
    report["minutes"] = (time.monotonic() - started) / 60
    (OUT / "results.json").write_text(json.dumps(report, indent=2, default=str))
    args.output.write_text(render(report))
    say(f"wrote {args.output} ({len(report['sections'])} section(s), {len(report['failures'])} failed)")
    return 1 if report["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from ibc.commands.bench import add_arguments
    from ibc.commands.bench import run as run_command

    parser = argparse.ArgumentParser(prog="bench/run_all.py")
    add_arguments(parser)
    parser.add_argument(
        "--render-from",
        type=Path,
        metavar="JSON",
        help="only re-write the report from a results.json of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.render_from:
        args.output.write_text(render(json.loads(args.render_from.read_text())))
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
