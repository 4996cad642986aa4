#!/usr/bin/env python3
"""The loopback floor: the cheapest HTTP answer this machine can give, measured with each benchmark's own client.

Why: a latency or a request rate means little alone on a shared 2-core machine. The floor is a minimal
server (a bare asyncio protocol, stdlib only, keep-alive, optional TLS) that answers every request with
a fixed JSON body, so "what does any server on this loopback cost, with this client" is measured in the
same run, and our proxy, webhook and extender figures read as a ratio to it. For the webhook's client,
which checks that the AdmissionReview uid is echoed, the floor copies the uid into its fixed answer
(a byte search, no JSON parsing).

The clients are the benchmarks' own, imported from their scripts (not rewritten): the proxy's
sequential keep-alive `http.client` loop, wrk (or its Python fallback) and its open-loop sender; the
webhook's open-loop httpx sender over TLS; the extender's sequential httpx POSTs over TLS with the same
request bodies.

    .venv/bin/python bench/floor.py --serve --bind 127.0.0.1:8099 [--tls-cert C --tls-key K]
    .venv/bin/python bench/floor.py --measure proxy,webhook,extender [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))

BODY = json.dumps(
    {
        "id": "floor",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    }
).encode()
REVIEW = b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"%s","allowed":true}}'
MAX_HEAD = 64 * 1024


# ----------------------------------------------------------------------------- the server


class _Floor(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies; every answer is 200 with a fixed body."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._close()
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else len(head)].strip() or 0)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            self._answer(body, b"connection: close" in head)

    def _answer(self, body: bytes, close: bool) -> None:
        assert self.transport is not None
        payload = BODY
        at = body.find(b'"uid"')
        if at >= 0:  # an AdmissionReview: echo its uid, as the webhook client checks it
            start = body.find(b'"', body.find(b":", at) + 1) + 1
            payload = REVIEW % body[start : body.find(b'"', start)]
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(payload)
        self.transport.write(head + (b"connection: close\r\n\r\n" if close else b"\r\n") + payload)
        if close:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def serve(bind: str, tls_cert: str | None, tls_key: str | None) -> None:
    """Run the floor until SIGTERM/SIGINT; prints `listening <url>` once it accepts connections."""
    host, port = bind.rsplit(":", 1)
    context = None
    if tls_cert and tls_key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_cert, tls_key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Floor, host, int(port), ssl=context, reuse_address=True, backlog=1024)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"listening {'https' if context else 'http'}://{host}:{port}", flush=True)
        async with server:
            await stop.wait()

    asyncio.run(main())


@contextlib.contextmanager
def floor_process(tls: Any = None) -> Iterator[tuple[str, int]]:
    """The floor as a process of its own (as every measured server is); yields (url, pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", "--bind", f"127.0.0.1:{port}"]
    if tls is not None:
        argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("listening "):
            raise RuntimeError(f"floor server did not start: {line} {proc.stdout.read().decode()[-500:]}")
        yield line.split(" ", 1)[1], proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ----------------------------------------------------------------------------- the clients


def bench_module(name: str) -> ModuleType:
    """Import bench/<name>.py (they are scripts, not a package) to use its client functions."""
    if f"ibc_bench_{name}" in sys.modules:
        return sys.modules[f"ibc_bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"ibc_bench_{name}", BENCH / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"bench/{name}.py not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def _ms(values_s: list[float], q: float) -> float:
    ordered = sorted(values_s)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def proxy_floor(*, rounds: int, requests: int, seconds: float, concurrency: list[int], rate: float) -> dict[str, Any]:
    """The proxy benchmark's clients against the floor: c=1 latency, throughput, the open-loop runs of its 429
    fast path (Python sender, and wrk paced when installed), with the same counts and durations."""
    pb = bench_module("proxy_bench")
    have_wrk = shutil.which("wrk") is not None
    lat: list[float] = []
    rps: dict[int, list[float]] = {}
    with floor_process() as (url, _pid), tempfile.TemporaryDirectory(prefix="ibc-floor-") as tmp:
        work = Path(tmp)
        for _ in range(rounds):
            pb.latencies(url, pb.CHAT, 200)
            lat += pb.latencies(url, pb.CHAT, requests)
            for c in concurrency:
                rps.setdefault(c, []).append(
                    pb.wrk_throughput(url, c, seconds, work) if have_wrk else pb.python_throughput(url, c, seconds)
                )
        pb.open_loop(url, rate, 1.0, pb.CHAT, 200)
        runs = [pb.open_loop(url, rate, seconds, pb.CHAT, 200) for _ in range(rounds)]
        median_run = sorted(runs, key=lambda r: pb.percentile(r, 0.99))[len(runs) // 2]
        paced = None
        if have_wrk:
            paced_runs = [pb.wrk_paced(url, rate, seconds, pb.CHAT, 200, work) for _ in range(rounds)]
            paced = sorted(paced_runs, key=lambda r: r["p99_ms"])[len(paced_runs) // 2]
    return {
        "client": "proxy_bench: http.client keep-alive (c=1), " + ("wrk" if have_wrk else "python threads"),
        "p50_ms": _ms(lat, 0.5),
        "p99_ms": _ms(lat, 0.99),
        "rps": {str(c): round(statistics.median(v), 1) for c, v in rps.items()},
        "open_loop": {
            "rate_per_s": rate,
            "p50_ms": _ms(median_run, 0.5),
            "p99_ms": _ms(median_run, 0.99),
            "n": len(median_run),
        },
        "paced_wrk": paced,
    }


def tls_files(work: Path) -> Any:
    from certs.generate import generate_serving_certificate, write_files

    bundle = generate_serving_certificate("ibc-floor", "ibc-system", ip_addresses=["127.0.0.1"])
    return write_files(bundle, work / "tls")


def webhook_floor(rate: float, duration: float) -> dict[str, Any]:
    """The webhook benchmark's open-loop sender (8 httpx threads, TLS, kept alive) against the floor."""
    wb = bench_module("webhook_bench")
    with tempfile.TemporaryDirectory(prefix="ibc-floor-") as tmp:
        tls = tls_files(Path(tmp))
        with floor_process(tls) as (url, _pid):
            result = wb.open_loop(url, tls.ca, "default", rate, duration)
    result.pop("server", None)  # the floor keeps no histogram
    result["client"] = f"webhook_bench.open_loop: 8 httpx threads over TLS, {rate:g}/s for {duration:g}s"
    return result


def extender_floor(sizes: list[int], forms: list[str]) -> list[dict[str, Any]]:
    """The extender benchmark's client (sequential httpx POSTs over TLS, the same bodies) against the floor."""
    import httpx

    eb = bench_module("extender_bench")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ibc-floor-") as tmp:
        tls = tls_files(Path(tmp))
        with (
            floor_process(tls) as (url, _pid),
            httpx.Client(
                base_url=url, verify=str(tls.ca), timeout=60, headers={"Content-Type": "application/json"}
            ) as client,
        ):
            for size in sizes:
                nodes = eb.node_objects(size)
                requests = 2000 if size <= 100 else 1000 if size <= 1000 else 300  # as extender_bench
                for form in forms:
                    count = requests if form == "nodenames" else max(20, requests // 10)
                    bodies = [eb.filter_request(form, nodes, f"bench-{i % 50}") for i in range(50)]
                    for i in range(min(20, count)):
                        client.post("/filter", content=bodies[i % 50])
                    samples = []
                    for i in range(count):
                        started = time.perf_counter()
                        client.post("/filter", content=bodies[i % 50]).read()
                        samples.append(time.perf_counter() - started)
                    rows.append(
                        {
                            "nodes": size,
                            "form": form,
                            "requests": count,
                            "request_kib": round(len(bodies[0]) / 1024, 1),
                            "p50_ms": _ms(samples, 0.5),
                            "p99_ms": _ms(samples, 0.99),
                        }
                    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="run the floor server")
    parser.add_argument("--bind", default="127.0.0.1:8099")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--measure", default="", help="comma list of clients to measure: proxy,webhook,extender")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.serve:
        serve(args.bind, args.tls_cert, args.tls_key)
        return 0
    out: dict[str, Any] = {"load_avg": os.getloadavg()}
    wanted = [w for w in args.measure.split(",") if w]
    if "proxy" in wanted:
        rounds, requests, seconds = (1, 500, 2.0) if args.quick else (3, 2000, 5.0)
        out["proxy"] = proxy_floor(rounds=rounds, requests=requests, seconds=seconds, concurrency=[1, 16, 64], rate=500)
    if "webhook" in wanted:
        out["webhook"] = webhook_floor(200.0, 3.0 if args.quick else 10.0)
    if "extender" in wanted:
        out["extender"] = extender_floor([100, 1000] if args.quick else [100, 1000, 5000], ["nodenames", "nodes"])
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
