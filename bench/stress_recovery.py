#!/usr/bin/env python3
"""Recovery and cold-start figures: how long each component takes to answer again after SIGKILL, and what a
scale from zero under a burst costs beyond the model server's own start.

Why a script beside the stress tier: tests/stress asserts that nothing is lost, overcommitted or leaked
(with loose time bounds); this reports the times themselves, repeated and compared with a baseline
measured in the same run:

- SIGKILL (`tests/stress/scenarios.py`, the same code the tests run): `ibc local`, `ibc webhook` and
  `ibc extender` under load; the worker is killed (gunicorn replaces it), then the whole process group
  (restarted at once, as kubelet or systemd would). Baseline: the restarted process's own start-up time
  (exec to its readiness probe answering), so the ratio shows what recovery costs beyond starting.
- Scale from zero: a burst of concurrent requests for a stopped model through `ibc local`, versus
  starting the same `ibc mock-backend` command directly and polling its /health. The ratio is the time
  to the first answer through the proxy over the backend's own time to healthy.

    .venv/bin/python bench/stress_recovery.py [--repeat 3] [--burst 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.runtime import free_port  # noqa: E402
from tests.stress.scenarios import extender_kill9, local_kill9, webhook_kill9  # noqa: E402
from tests.stress.support import TLSFiles, service, wait_until  # noqa: E402

STARTUP_DELAY_SECONDS = 2.0


def kill9_figures(repeat: int) -> list[dict[str, Any]]:
    """Median figures of each SIGKILL scenario over `repeat` runs; any failure is reported, not hidden."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="ibc-recovery-") as tmp:
        work = Path(tmp)
        tls = TLSFiles.create(work / "tls")
        for name, run in (
            ("ibc local", lambda w: local_kill9(w)),
            ("ibc webhook", lambda w: webhook_kill9(w, tls)),
            ("ibc extender", lambda w: extender_kill9(w, tls)),
        ):
            reports = []
            for i in range(repeat):
                run_dir = work / f"{name.split()[1]}-{i}"
                run_dir.mkdir()
                reports.append(run(run_dir).figures())
                print(json.dumps(reports[-1]), flush=True)
            row: dict[str, Any] = {"component": name, "runs": repeat}
            for key in ("recover_after_worker_kill_s", "recover_after_crash_s", "restart_ready_s"):
                row[key] = round(statistics.median(r[key] for r in reports), 3)
            for key in (
                "good_answers",
                "transport_errors",
                "wrong_answers",
                "overcommits",
                "leaked_after_ttl",
                "leftover_processes",
            ):
                row[key] = sum(r[key] for r in reports)
            row["peak_promised_gib"] = max(r["peak_promised_gib"] for r in reports)
            row["capacity_gib"] = reports[0]["capacity_gib"]
            rows.append(row)
    return rows


def direct_start_seconds(work: Path) -> float:
    """Exec `ibc mock-backend --startup-delay D` and poll /health every 10 ms: the model's own cold start."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "ibc",
        "mock-backend",
        "--bind",
        f"127.0.0.1:{port}",
        "--model",
        "direct",
        "--startup-delay",
        str(STARTUP_DELAY_SECONDS),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200,
            60,
            "the mock backend healthy",
            interval=0.01,
        )
        return time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)


async def _burst(url: str, model: str, count: int) -> list[tuple[int, float]]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.monotonic()

        async def one() -> tuple[int, float]:
            resp = await client.post("/v1/chat/completions", json=body)
            return resp.status_code, time.monotonic() - started

        return await asyncio.gather(*(one() for _ in range(count)))


def cold_start_figures(repeat: int, burst: int) -> dict[str, Any]:
    """Bursts of `burst` requests for a stopped model through a fresh `ibc local`, alternating with direct starts.

    A fresh `ibc local` per run (rather than waiting for a short cooldown between bursts): a cooldown
    shorter than the model's start-up stops the model under its held requests (see docs/benchmarks.md).
    """
    direct: list[float] = []
    first: list[float] = []
    last: list[float] = []
    lost = 0
    statuses: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ibc-coldstart-") as tmp:
        work = Path(tmp)
        config = work / "local.yaml"
        config.write_text(
            "nodes:\n  - {name: box, memory: 128Gi}\nmodels:\n  - name: cold\n    memory: 64Gi\n"
            f"    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model cold --startup-delay "
            f"{STARTUP_DELAY_SECONDS}\n"
        )
        threads = max(64, burst + 32)
        for _ in range(repeat):
            direct.append(direct_start_seconds(work))
            svc = service(
                "local",
                ["local", "--config", str(config), "--threads", str(threads), "--queue-size", str(max(256, burst))],
                work,
            )
            svc.start()
            try:
                results = asyncio.run(_burst(svc.url, "cold", burst))
            finally:
                svc.stop()
            lost += sum(1 for status, _ in results if status != 200)
            for status, _ in results:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            if any(status != 200 for status, _ in results):
                print(f"not every answer was 200: {statuses}\n{svc.log_tail(30)}", file=sys.stderr, flush=True)
            first.append(min(t for _, t in results))
            last.append(max(t for _, t in results))
    d, f, la = statistics.median(direct), statistics.median(first), statistics.median(last)
    return {
        "burst": burst,
        "runs": repeat,
        "backend_startup_delay_s": STARTUP_DELAY_SECONDS,
        "direct_start_to_healthy_s": round(d, 3),
        "through_proxy_first_answer_s": round(f, 3),
        "through_proxy_last_answer_s": round(la, 3),
        "ratio_first": round(f / d, 3),
        "ratio_last": round(la / d, 3),
        "not_200": lost,
        "statuses": statuses,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario (medians are reported)")
    parser.add_argument("--burst", type=int, default=200, help="concurrent requests in a cold-start burst")
    parser.add_argument("--only", default="kill9,coldstart", help="kill9, coldstart or both")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    os.chdir(REPO)
    out: dict[str, Any] = {}
    if "kill9" in args.only:
        out["kill9"] = kill9_figures(args.repeat)
    if "coldstart" in args.only:
        out["coldstart"] = cold_start_figures(args.repeat, args.burst)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
