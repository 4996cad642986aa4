"""Routing across a model's replicas, side by side: random, least-outstanding and prefix-affinity.

Why: a model server reuses the KV blocks of a prompt prefix it has seen (vLLM's automatic prefix
caching), but only on the replica that holds them; where the proxy sends a request decides whether its
shared system prompt is prefilled again. This measures, in one run with the same workload, the prefix
cache hit rate and the time to first token (TTFT) of each routing.

Setup per routing and round: N fresh `ibc mock-backend` replicas of one model, each with vLLM's
behaviours simulated (`--max-running`, a prefix cache of `--cache-blocks` blocks, `--prefill-per-block`
seconds of prefill per uncached 64-character block), behind the proxy (`--serve`: gunicorn gevent,
2 workers, as `ibc proxy` runs) with a fixed view. The workload: `--prefixes` shared prefixes of
`--prefix-blocks` blocks each (system prompts), each request one of them (seeded random order, the same
for every routing) plus a unique question, streamed, from `--concurrency` keep-alive clients. The hit
rate is the replicas' own `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` (tokens);
TTFT is measured by the client to the first byte of the stream's body; the requests each replica
served come from the proxy's `X-IBC-Backend` header. Rounds interleave the routings (order rotates).
Then what routing costs: CPU time per request of the proxy's request path in-process (`ProxyApp.wsgi`
over a mock transport), each routing with 3 replicas, best of 8 interleaved rounds.

    .venv/bin/python bench/routing_bench.py             # 3 rounds, about 2 minutes
    .venv/bin/python bench/routing_bench.py --quick     # 1 round

Results: a Markdown table on stdout and JSON in bench/out/routing.json (or --json FILE).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
MODEL = "m"
ROUTINGS = ("random", "least-outstanding", "prefix")
_LISTENING = re.compile(r"listening on (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- the proxy (--serve)


def serve_main(routing: str, backends: list[str], bind: str, imbalance: int) -> int:
    """Run the proxy with a fixed view (model `m`, ready at `backends`) as `ibc proxy` runs."""
    import logging

    from ibc.logs import configure
    from serving.runner import serve

    configure("WARNING")
    logging.getLogger("gunicorn.error").setLevel(logging.INFO)  # keep "listening" for readiness

    def factory() -> Any:
        from budget import ClusterView, Model, Node
        from proxy.app import create_app
        from proxy.settings import ProxySettings
        from proxy.static_scaler import StaticScaler

        gi = 2**30
        view = ClusterView.build(
            nodes=[Node("node-1", {}, 128 * gi, "annotation")],
            models=[Model("default", MODEL, 8 * gi, MODEL, replicas=len(backends))],
        )
        scaler = StaticScaler(view, {f"default/{MODEL}": backends})
        settings = ProxySettings(routing=routing, prefix_imbalance=imbalance, expose_backend_header=True)
        return create_app(settings, scaler)

    return serve(factory, bind=bind, workers=2, name=f"bench-routing-{routing}", worker_class="gevent")


# ----------------------------------------------------------------------------- processes


class Proc:
    """A child process in its own group (stopped as proxy_bench's servers are: SIGTERM, then SIGKILL)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, pattern: re.Pattern[str], timeout_seconds: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            match = pattern.search(self.log.read_text(errors="replace"))
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.log.name}: not ready: {self.log.read_text(errors='replace')[-800:]}")

    def stop(self) -> None:
        from proxy_bench import Server

        Server(self.log.stem, "", self.proc, self.log).stop()
        self._out.close()


def start_replicas(args: argparse.Namespace, logs: Path) -> list[tuple[Proc, str]]:
    replicas = []
    for i in range(args.replicas):
        argv = [sys.executable, "-m", "ibc", "mock-backend", "--bind", "127.0.0.1:0", "--model", MODEL]
        argv += ["--max-running", str(args.max_running), "--prefix-cache-blocks", str(args.cache_blocks)]
        argv += ["--prefill-per-block", str(args.prefill_per_block), "--token-delay", str(args.token_delay)]
        argv += ["--tokens", "4"]
        proc = Proc(argv, logs / f"replica-{i}.log")
        replicas.append((proc, proc.wait_for(_LISTENING).group(1)))
    return replicas


def start_proxy(routing: str, backends: list[str], logs: Path, imbalance: int) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", routing, "--backends", ",".join(backends)]
    argv += ["--bind", f"127.0.0.1:{port}", "--prefix-imbalance", str(imbalance)]
    proc = Proc(argv, logs / f"proxy-{routing}.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.proc.poll() is None:  # ready when it answers
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/livez")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, url
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"proxy for {routing} did not answer")


def prefix_counters(url: str) -> tuple[float, float]:
    """(hit tokens, queried tokens) of one replica, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["vllm:prefix_cache_hits_total"], samples["vllm:prefix_cache_queries_total"]


# ----------------------------------------------------------------------------- the workload


def workload(args: argparse.Namespace) -> list[bytes]:
    """The request bodies, in order: every request is one shared prefix plus its own question."""
    rng = random.Random(args.seed)
    prefixes = []
    for p in range(args.prefixes):
        words = [f"w{p}-{rng.randrange(10**6)}" for _ in range(args.prefix_blocks * 64 // 8 + 8)]
        prefixes.append((f"System prompt {p}: " + " ".join(words))[: args.prefix_blocks * 64 - 8])
    bodies = []
    for i in range(args.requests):
        system = prefixes[rng.randrange(args.prefixes)]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}?"}]
        body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": 4}
        bodies.append(json.dumps(body).encode())
    return bodies


def drive(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body (streamed) from `concurrency` keep-alive clients; TTFT per request and who answered."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    queue = list(enumerate(bodies))
    lock = threading.Lock()
    ttft: list[float] = [0.0] * len(bodies)
    served: dict[str, int] = {}
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while True:
            with lock:
                if not queue:
                    break
                i, body = queue.pop(0)
            started = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                first = resp.read1(65536)
                ttft[i] = time.perf_counter() - started
                rest = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                continue
            if resp.status != 200 or b"[DONE]" not in first + rest:
                with lock:
                    errors.append(f"status {resp.status}: {(first + rest)[:200]!r}")
                continue
            backend = resp.getheader("X-IBC-Backend", "?")
            with lock:
                served[backend] = served.get(backend, 0) + 1
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return {"ttft": ttft, "served": served, "errors": errors, "wall_s": time.perf_counter() - started}


def run_one(routing: str, args: argparse.Namespace, bodies: list[bytes], logs: Path) -> dict[str, Any]:
    replicas = start_replicas(args, logs)
    urls = [u for _, u in replicas]
    proxy: Proc | None = None
    try:
        proxy, url = start_proxy(routing, urls, logs, args.prefix_imbalance)
        load = os.getloadavg()[0]
        result = drive(url, bodies, args.concurrency)
        counters = [prefix_counters(u) for u in urls]
    finally:
        if proxy is not None:
            proxy.stop()
        for proc, _ in replicas:
            proc.stop()
    result["hits_tokens"] = sum(h for h, _ in counters)
    result["queried_tokens"] = sum(q for _, q in counters)
    result["served"] = sorted(result["served"].get(u, 0) for u in urls)
    result["load"] = load
    return result


def cpu_per_request(rounds: int = 8, requests: int = 2000) -> dict[str, float]:
    """CPU time (us) of the proxy's request path per request, in-process over a mock transport, for each
    routing with 3 replicas (a 1 KiB and a 2-character prompt) and for one replica: what routing costs."""
    import io

    import httpx

    from budget import ClusterView, Model, Node
    from proxy.app import create_app
    from proxy.settings import ProxySettings
    from proxy.static_scaler import StaticScaler

    view = ClusterView.build(nodes=[Node("n", {}, 2**40, "annotation")], models=[Model("default", MODEL, 2**30, MODEL)])
    answer = b'{"object":"chat.completion","choices":[]}'
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=answer))
    long_prompt = "You are a helpful assistant. " * 36  # 1 KiB: 16 blocks

    def case(routing: str, replicas: int, prompt: str) -> Any:
        scaler = StaticScaler(view, {f"default/{MODEL}": [f"http://10.0.0.{i}:8000" for i in range(replicas)]})
        proxy = create_app(ProxySettings(routing=routing), scaler, transport=transport).extensions["ibc_proxy"]
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}]}).encode()
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "CONTENT_TYPE": "application/json"}
        environ["CONTENT_LENGTH"] = str(len(body))

        def call() -> None:
            b"".join(proxy.wsgi({**environ, "wsgi.input": io.BytesIO(body)}, lambda status, headers: None))

        return call

    cases = {f"{r}, 3 replicas, 1 KiB prompt": case(r, 3, long_prompt) for r in ROUTINGS}
    cases["prefix, 3 replicas, short prompt"] = case("prefix", 3, "hi")
    cases["any routing, 1 replica"] = case("prefix", 1, long_prompt)
    best = dict.fromkeys(cases, float("inf"))
    for call in cases.values():
        for _ in range(requests // 4):
            call()
    for _ in range(rounds):  # interleaved; CPU time, so other jobs on the machine count less than in wall time
        for name, call in cases.items():
            started = time.process_time()
            for _ in range(requests):
                call()
            best[name] = min(best[name], (time.process_time() - started) / requests)
    return {name: round(seconds * 1e6, 1) for name, seconds in best.items()}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for routing, results in runs.items():
        ttft = [t for r in results for t in r["ttft"] if t > 0]
        hits = sum(r["hits_tokens"] for r in results)
        queried = sum(r["queried_tokens"] for r in results)
        served = [sum(col) for col in zip(*(r["served"] for r in results), strict=True)]
        out[routing] = {
            "requests": len(ttft),
            "errors": sum(len(r["errors"]) for r in results),
            "hit_rate": hits / queried if queried else 0.0,
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 2) if ttft else None,
            "ttft_p99_ms": round(pct(ttft, 0.99) * 1000, 2) if ttft else None,
            "wall_s": round(sum(r["wall_s"] for r in results), 2),
            "served_per_replica": served,
            "load": [round(r["load"], 2) for r in results],
        }
    return out


def render(summary: dict[str, Any], args: argparse.Namespace) -> str:
    base = summary.get("least-outstanding", {})
    lines = [
        f"{args.replicas} replicas, {args.prefixes} prefixes x {args.prefix_blocks} blocks, {args.requests} "
        f"streamed requests x {args.rounds} round(s), concurrency {args.concurrency}; replica cache "
        f"{args.cache_blocks} blocks, prefill {args.prefill_per_block * 1000:g} ms per uncached block, "
        f"--max-running {args.max_running}",
        "",
        "| routing | prefix cache hit rate | TTFT p50 ms | TTFT p99 ms | p50 / p99 x least-outstanding "
        "| wall s | requests per replica | errors | load (1 min) per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for routing, s in summary.items():
        ratios = "—"
        if base.get("ttft_p50_ms") and s["ttft_p50_ms"] is not None:
            ratios = f"x{s['ttft_p50_ms'] / base['ttft_p50_ms']:.2f} / x{s['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}"
        lines.append(
            f"| {routing} | {s['hit_rate']:.1%} | {s['ttft_p50_ms']} | {s['ttft_p99_ms']} | {ratios} | {s['wall_s']} "
            f"| {' / '.join(map(str, s['served_per_replica']))} | {s['errors']} | {', '.join(map(str, s['load']))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/routing_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="interleaved rounds (default 3)")
    parser.add_argument("--replicas", type=int, default=3, metavar="N", help="replicas of the model (default 3)")
    parser.add_argument("--prefixes", type=int, default=36, metavar="N", help="shared prefixes (default 36)")
    parser.add_argument("--prefix-blocks", type=int, default=12, metavar="N", help="blocks per prefix (default 12)")
    parser.add_argument("--requests", type=int, default=540, metavar="N", help="requests per routing and round")
    parser.add_argument("--concurrency", type=int, default=12, metavar="N", help="clients at once (default 12)")
    parser.add_argument("--cache-blocks", type=int, default=200, metavar="N", help="prefix cache per replica")
    parser.add_argument("--prefill-per-block", type=float, default=0.002, metavar="S", help="default 0.002")
    parser.add_argument("--token-delay", type=float, default=0.001, metavar="S", help="default 0.001")
    parser.add_argument("--max-running", type=int, default=8, metavar="N", help="per replica (default 8)")
    parser.add_argument("--prefix-imbalance", type=int, default=4, metavar="N", help="the proxy's (default 4)")
    parser.add_argument("--only", default=",".join(ROUTINGS), metavar="LIST", help="routings to run (default all)")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", type=Path, default=OUT / "routing.json", metavar="FILE")
    parser.add_argument("--serve", choices=ROUTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--backends", help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    if args.serve:
        return serve_main(args.serve, args.backends.split(","), args.bind, args.prefix_imbalance)
    if args.quick:
        args.rounds = 1
    logs = OUT / "logs" / "routing"
    logs.mkdir(parents=True, exist_ok=True)
    bodies = workload(args)
    chosen = tuple(r for r in ROUTINGS if r in args.only.split(","))
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in chosen}
    for round_ in range(args.rounds):
        turn = round_ % len(chosen)
        order = chosen[turn:] + chosen[:turn]
        for routing in order:
            print(f"round {round_ + 1}/{args.rounds}: {routing}", file=sys.stderr, flush=True)
            runs[routing].append(run_one(routing, args, bodies, logs))
    summary = summarize(runs)
    print("CPU per request, in-process", file=sys.stderr, flush=True)
    cpu = cpu_per_request()
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "serve", "backends", "bind")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = {"settings": settings, "routings": summary, "cpu_us_per_request": cpu, "cpu_load": os.getloadavg()[0]}
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(render(summary, args))
    print("\n| request path, in-process | CPU us per request |\n|---|---|")
    print("\n".join(f"| {name} | {us} |" for name, us in cpu.items()))
    return 0 if all(s["errors"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
