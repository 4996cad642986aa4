#!/usr/bin/env python3
"""A real engine behind `ibc local`: cold start and added latency, through ibc versus the engine alone.

The engine is llama.cpp's OpenAI server (`llama-cpp-python[server]`, built once by
tests/engine/build-engine.sh) on GGUF models the project generates (tests/engine/make_gguf.py). Both
sides run in the same run, on the same machine, alternately:

- cold start: the engine started by hand (its `/v1/models` polled every 10 ms, then the first chat
  completion of one token) versus the first such request sent to `ibc local` with the model stopped
  (ibc decides, starts the same command, probes `/v1/models` and forwards); after one uncounted start
  (page cache, imports), the two alternate which goes first;
- added latency: the same running engine, asked directly and through `ibc local`, request by request
  in turns: a one-token chat completion, and the first chunk of a streamed one;
- memory: each engine's RSS once it has answered (memory-mapped weights included), and ibc's own.

    .venv/bin/python bench/engine_bench.py [--repeat 3] [--requests 200] [--presets tiny,medium] [--json FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.engine.parts import BUILD_SCRIPT, cached_models, engine_argv  # noqa: E402

MESSAGES = [{"role": "user", "content": "hello"}]
MI = 2**20


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(predicate: Callable[[], bool], timeout_seconds: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_seconds:g}s waiting for {what}")
        time.sleep(interval)


def answers(url: str) -> bool:
    """GET `url` answers 200: plain http.client, a fraction of a millisecond of CPU, so polling every
    10 ms does not slow the start it measures (an httpx client per poll would, on 2 busy cores)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=1)
    try:
        conn.request("GET", parts.path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def chat(client: httpx.Client, base: str, model: str, max_tokens: int = 1) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens}
    r = client.post(f"{base}/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{base}: {r.status_code} {r.text[:300]}")


def first_chunk_seconds(client: httpx.Client, base: str, model: str) -> float:
    """Seconds to the first streamed content chunk (the rest is read and dropped)."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: ") and '"content"' in line:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{base}: no content chunk in the stream")
    return first


def rss_bytes(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of every process below `pid`."""
    rows: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            rows[int(entry)] = (int(stat.rsplit(b")", 1)[1].split()[1]), cmd)
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, cmd) in rows.items():
            if ppid == parent:
                found.append((child, cmd))
                todo.append(child)
    return found


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Ibc:
    """`ibc local` with one model, stopped until the first request."""

    def __init__(self, work: Path, python: str, model: str, path: Path) -> None:
        argv = engine_argv(python, path, "{port}", "{model}")
        config = work / f"{model}.yaml"
        config.write_text(
            "nodes:\n  - {name: machine, memory: 64Gi}\nmodels:\n"
            f"  - name: {model}\n    memory: 2Gi\n    health: /v1/models\n    startup_timeout: 300s\n"
            f"    command: {json.dumps(argv)}\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        with (work / f"ibc-{model}.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ibc", "local", "--config", str(config), "--bind", self.url[7:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        poll(lambda: answers(f"{self.url}/livez"), 60, "ibc local")

    def engine(self) -> tuple[int, str]:
        """(pid, base URL) of the engine ibc started."""
        for pid, cmd in children_of(self.proc.pid):
            if "llama_cpp.server" in cmd:
                port = cmd.split("--port ", 1)[1].split()[0]
                return pid, f"http://127.0.0.1:{port}"
        raise RuntimeError("no engine below ibc local")


def cold_start(work: Path, python: str, model: str, path: Path, ibc_first: bool) -> dict[str, float]:
    """One cold start by hand and one through ibc local, back to back (which one first alternates)."""
    if ibc_first:
        through = cold_start_through_ibc(work, python, model, path)
        return {**cold_start_by_hand(work, python, model, path), **through}
    by_hand = cold_start_by_hand(work, python, model, path)
    return {**by_hand, **cold_start_through_ibc(work, python, model, path)}


def cold_start_by_hand(work: Path, python: str, model: str, path: Path) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with (work / f"hand-{model}.log").open("ab") as log:
        engine = subprocess.Popen(engine_argv(python, path, port, model), stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(lambda: answers(f"{base}/v1/models"), 300, f"{model} started by hand")
        ready = time.perf_counter() - started
        with httpx.Client(timeout=300) as client:
            chat(client, base, model)
        by_hand = time.perf_counter() - started
    finally:
        stop(engine)
    return {"by_hand_ready_s": ready, "by_hand_first_reply_s": by_hand}


def cold_start_through_ibc(work: Path, python: str, model: str, path: Path) -> dict[str, float]:
    ibc = Ibc(work, python, model, path)
    try:
        started = time.perf_counter()
        with httpx.Client(timeout=300) as client:
            chat(client, ibc.url, model)
        through = time.perf_counter() - started
        pid, _ = ibc.engine()
        rss = rss_bytes(pid)
    finally:
        stop(ibc.proc)
    return {"ibc_first_reply_s": through, "rss": rss}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def added_latency(work: Path, python: str, model: str, path: Path, requests: int) -> dict[str, Any]:
    """The same engine, directly and through ibc local, in turns."""
    ibc = Ibc(work, python, model, path)
    try:
        with httpx.Client(timeout=300) as client:
            chat(client, ibc.url, model)  # the cold start, not measured here
            pid, direct = ibc.engine()
            times: dict[str, list[float]] = {"direct": [], "ibc": [], "direct_stream": [], "ibc_stream": []}
            for _ in range(3):  # warm both paths' connections
                chat(client, direct, model)
                chat(client, ibc.url, model)
            for i in range(requests):
                for name, base in (("direct", direct), ("ibc", ibc.url))[:: 1 if i % 2 else -1]:
                    started = time.perf_counter()
                    chat(client, base, model)
                    times[name].append(time.perf_counter() - started)
                for name, base in (("direct_stream", direct), ("ibc_stream", ibc.url))[:: 1 if i % 2 else -1]:
                    times[name].append(first_chunk_seconds(client, base, model))
        ibc_rss = rss_bytes(ibc.proc.pid) + sum(
            rss_bytes(p) for p, cmd in children_of(ibc.proc.pid) if "llama_cpp.server" not in cmd
        )
        engine_rss = rss_bytes(pid)
    finally:
        stop(ibc.proc)
    out: dict[str, Any] = {"model": model, "requests": requests, "ibc_rss": ibc_rss, "engine_rss": engine_rss}
    for name, values in times.items():
        out[name] = {"p50_ms": pct(values, 0.5) * 1000, "p90_ms": pct(values, 0.9) * 1000}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="cold starts per model and side (medians reported)")
    parser.add_argument("--requests", type=int, default=200, help="requests per side for the added latency")
    parser.add_argument("--presets", default="tiny,medium", help="models for the cold start (tiny, small, medium)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    built = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    python = built.stdout.strip().splitlines()[-1]
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    paths = cached_models(tuple(sorted(set(presets) | {"tiny"})))
    out: dict[str, Any] = {"load_before": os.getloadavg()[0], "coldstart": {}}
    with tempfile.TemporaryDirectory(prefix="ibc-engine-bench-") as tmp:
        work = Path(tmp)
        for model in presets:
            cold_start_by_hand(work, python, model, paths[model])  # warm-up, not counted: page cache, imports
            runs = [cold_start(work, python, model, paths[model], ibc_first=i % 2 == 1) for i in range(args.repeat)]
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row["weights_bytes"] = paths[model].stat().st_size
            row["runs"] = len(runs)
            out["coldstart"][model] = row
            print(f"{model}: {json.dumps(row)}", flush=True)
        out["latency"] = added_latency(work, python, "tiny", paths["tiny"], args.requests)
        print(f"latency: {json.dumps(out['latency'])}", flush=True)
    out["load_after"] = os.getloadavg()[0]
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
