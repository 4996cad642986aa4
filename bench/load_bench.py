#!/usr/bin/env python3
"""The load layer's reaction time: from the moment one replica is saturated to a second one serving.

Through `ibc local`: a model (`ibc mock-backend --latency 1 --startup-delay D`, `load.concurrency: 2`,
`max_replicas: 2`) runs one replica; then 10 clients send requests back to back, which saturates it (the
proxy sees 10 in flight, 8 beyond its concurrency). The figure is the time from the clients' start to the
second replica being ready in the proxy's backends (`readyReplicas: 2`, polled every 10 ms), with the
default 5 s scale-up stabilization window and with none. Baseline, in the same run: the same command
started directly until its /health answers (the replica's own start), so the ratio shows what the load
layer adds: its window, its one-second pass and the budget's decision.

    .venv/bin/python bench/load_bench.py [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stress_recovery import STARTUP_DELAY_SECONDS, direct_start_seconds  # noqa: E402

from tests.stress.support import service, wait_until  # noqa: E402

CLIENTS = 10
WINDOWS = ("0s", "5s")  # none, and the default


def _config(window: str) -> str:
    return (
        "nodes:\n  - {name: box, memory: 128Gi}\nmodels:\n  - name: chat\n    memory: 30Gi\n"
        "    max_replicas: 2\n"
        f"    load: {{concurrency: 2, scale_up_stabilization: {window}}}\n"
        "    command: ibc mock-backend --bind 127.0.0.1:{port} --model chat --latency 1 --tokens 2 "
        f"--startup-delay {STARTUP_DELAY_SECONDS}\n"
    )


def _ready(url: str) -> int:
    return int(httpx.get(f"{url}/models/chat/metrics", timeout=5).json().get("readyReplicas") or 0)


def saturation_to_serving(work: Path, window: str) -> float:
    """One fresh `ibc local`: start one replica, saturate it, time until the second is ready."""
    config = work / f"local-{window}.yaml"
    config.write_text(_config(window))
    svc = service("local", ["local", "--config", str(config)], work)
    svc.start()
    stop = threading.Event()
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def client() -> None:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=svc.url, timeout=60) as http:
            while not stop.is_set() and time.monotonic() < deadline:
                http.post("/v1/chat/completions", json=body)

    try:
        httpx.post(f"{svc.url}/v1/chat/completions", json=body, timeout=60).raise_for_status()  # one replica up
        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        wait_until(lambda: _ready(svc.url) >= 2, 120, "a second replica ready", interval=0.01)
        took = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(70)
        return took
    finally:
        stop.set()
        svc.stop()


def figures(repeat: int) -> dict[str, Any]:
    direct: list[float] = []
    by_window: dict[str, list[float]] = {w: [] for w in WINDOWS}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ibc-load-") as tmp:
        work = Path(tmp)
        for _ in range(repeat):
            direct.append(direct_start_seconds(work))
            for window in WINDOWS:
                by_window[window].append(saturation_to_serving(work, window))
    d = statistics.median(direct)
    out: dict[str, Any] = {
        "runs": repeat,
        "clients": CLIENTS,
        "backend_startup_delay_s": STARTUP_DELAY_SECONDS,
        "direct_start_to_healthy_s": round(d, 3),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    for window, times in by_window.items():
        m = statistics.median(times)
        out[f"window_{window}"] = {"saturation_to_serving_s": round(m, 3), "ratio": round(m / d, 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant (medians are reported)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    result = {"load": figures(args.repeat)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
