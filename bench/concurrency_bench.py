"""Many long streams at once: how many a proxy process holds, and what holding them costs each client.

Why: an LLM client keeps its connection for the whole generation. A proxy that serves one request per
thread makes client 65 wait in the accept queue while the model sits idle. One run measures, side by
side on the same machine, N clients each opening ONE streamed completion at the same moment (default
1,000 clients; 20 tokens 50 ms apart, a 1-second stream) against:

- `backend`: `ibc mock-backend` alone (the baseline every ratio is taken against);
- `proxy-gevent` / `proxy-gthread`: the proxy's app with a fixed view in front of that same backend, run
  by `serving.runner.serve` as `ibc proxy` runs it (2 workers; gevent with 10,000 connections, or gthread
  with 64 threads: the old default);
- `proxy-gevent-1w`: the same with ONE worker, as `ibc local` must run (its scaler's state lives in one
  process): the fair comparison for `local-gevent`, and what separates the two from the scaler's cost;
- `local-gevent` / `local-gthread`: `ibc local` with its defaults (1 worker), whose model is an
  `ibc mock-backend` with the same flags, started by local mode;
- `local-threads`: the other design considered, `ibc local --worker-class gthread --threads N+16`
  (a thread per stream);
- `litellm`: the LiteLLM proxy (1 worker) in front of the backend, when installed (`--litellm`).

Each measured run follows one unmeasured run of the same size (`--no-warm-burst` drops it). Without it,
the first 1,000-stream burst a process ever serves is slower (heap growth, first connections), and the
order of the targets decides who pays: `backend` runs first and warms the shared backend, so the proxies
after it meet a warm backend while `local-*` meets its own model, started cold by local mode (measured:
local-gevent and proxy-gevent-1w, each in front of a cold backend, had the same first-burst TTFC p99).

Per target: completed streams, errors, time to first chunk (TTFC) p50/p99, wall time until the last
stream ended, p99 of the gaps between chunks, the proxy's peak RSS over its idle RSS per held stream,
and its CPU seconds. The client is one asyncio process of raw sockets (its own cost is the same for
every target). Run from the repository root:

    .venv/bin/python bench/concurrency_bench.py                         # 1,000 streams, every target
    .venv/bin/python bench/concurrency_bench.py --streams 100 1000 5000 --targets backend local-gevent

Results: a Markdown table on stdout and JSON in bench/out/concurrency_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import proxy_bench as pb  # the servers, their RSS/CPU and LiteLLM helpers

from tests.stress.support import hold_streams, raise_fd_limit, rss_bytes, stream_request

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
MODEL = pb.MODEL
TARGETS = (
    "backend",
    "proxy-gevent",
    "proxy-gevent-1w",
    "proxy-gthread",
    "local-gevent",
    "local-gthread",
    "local-threads",
    "litellm",
)


@dataclass
class Run:
    target: str
    streams: int
    completed: int
    errors: int
    ttfc_p50_s: float
    ttfc_p99_s: float
    wall_s: float
    gap_p99_s: float
    rss_idle_mib: float
    rss_peak_mib: float
    rss_per_stream_kib: float
    cpu_s: float
    load: str


def measure(name: str, url: str, n: int, args: argparse.Namespace, server: pb.Server | None) -> Run:
    payload = stream_request(MODEL, args.tokens)
    hold_streams(url, 1, payload, 60)  # warm: a started model, a pooled connection
    mib = 1 << 20
    idle = rss_bytes(server.proc.pid) / mib if server is not None else 0.0
    if args.warm_burst:
        # One unmeasured burst of the same size first: the measured one then sees every target (and the
        # model behind local mode) in the same state, whatever ran before it (see the module's docstring).
        hold_streams(url, n, payload, args.timeout)
    cpu0 = server.cpu_seconds() if server is not None else 0.0
    load = os.getloadavg()
    rss_of = (lambda: rss_bytes(server.proc.pid)) if server is not None else None
    got = hold_streams(url, n, payload, args.timeout, rss_of)
    cpu = (server.cpu_seconds() - cpu0) if server is not None else 0.0
    peak = max(got.peak_rss_bytes / mib, idle)
    return Run(
        target=name,
        streams=n,
        completed=got.completed,
        errors=got.errors,
        ttfc_p50_s=round(pb.percentile(got.ttfc_seconds, 0.50), 3),
        ttfc_p99_s=round(pb.percentile(got.ttfc_seconds, 0.99), 3),
        wall_s=round(got.wall_seconds, 2),
        gap_p99_s=round(pb.percentile(got.gap_seconds, 0.99), 3),
        rss_idle_mib=round(idle, 1),
        rss_peak_mib=round(peak, 1),
        rss_per_stream_kib=round((peak - idle) * 1024 / n, 1) if server is not None else 0.0,
        cpu_s=round(cpu, 1),
        load=" ".join(f"{x:.1f}" for x in load),
    )


def local_config(workdir: Path, args: argparse.Namespace) -> Path:
    path = workdir / "local.yaml"
    path.write_text(
        "nodes:\n  - name: n\n    memory: 128Gi\nmodels:\n  - name: m\n    memory: 8Gi\n    cooldown: 0\n"
        f"    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model m --token-delay {args.token_delay} "
        f"--tokens {args.tokens}\n"
    )
    return path


def start_target(name: str, backend: str, workdir: Path, args: argparse.Namespace, top: int) -> pb.Server:
    py = sys.executable
    port = pb.free_port()
    if name.startswith("proxy-"):
        kind = "ibc-gthread" if name == "proxy-gthread" else "ibc"
        argv = [py, str(Path(pb.__file__)), "--serve", kind, "--backend", backend, "--bind", f"127.0.0.1:{port}"]
        argv += ["--workers", "1" if name == "proxy-gevent-1w" else "2", "--threads", "64"]
        return pb.start(name, argv, port, "chat", workdir)
    if name.startswith("local-"):
        argv = [py, "-m", "ibc", "local", "--config", str(local_config(workdir, args)), "--bind", f"127.0.0.1:{port}"]
        if name == "local-gthread":
            argv += ["--worker-class", "gthread"]
        elif name == "local-threads":
            argv += ["--worker-class", "gthread", "--threads", str(top + 16)]
        return pb.start(name, argv, port, "/livez", workdir)
    if name == "litellm":
        exe = pb.ensure_litellm(Path(args.litellm_venv))
        if exe is None:
            raise RuntimeError("LiteLLM could not be installed")
        cfg = workdir / "litellm.yaml"
        params = {"model": f"openai/{MODEL}", "api_base": f"{backend}/v1", "api_key": "x"}
        cfg.write_text(json.dumps({"model_list": [{"model_name": MODEL, "litellm_params": params}]}))
        argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
        # As bench/proxy_bench.py runs it: 1 worker (its default), no authentication on either side.
        env = {
            **os.environ,
            "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "true",
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        }
        return pb.start(name, argv, port, "chat", workdir, env=env, timeout=300)
    raise ValueError(name)


def report(runs: list[Run]) -> str:
    base = {r.streams: r for r in runs if r.target == "backend"}
    lines = [
        "| target | streams | completed | TTFC p50 / p99 s | wall s | gap p99 s "
        "| x backend (TTFC p99 / wall / gap p99) "
        "| RSS per stream KiB | CPU s | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b = base.get(r.streams)
        ratios = "-"
        if b and r.target != "backend":
            pairs = ((r.ttfc_p99_s, b.ttfc_p99_s), (r.wall_s, b.wall_s), (r.gap_p99_s, b.gap_p99_s))
            ratios = " / ".join(f"{x / y:.2f}" if y > 0 else "-" for x, y in pairs)
        lines.append(
            f"| {r.target} | {r.streams} | {r.completed}/{r.streams} | {r.ttfc_p50_s} / {r.ttfc_p99_s} | {r.wall_s} "
            f"| {r.gap_p99_s} | {ratios} | {r.rss_per_stream_kib or '-'} | {r.cpu_s or '-'} | {r.load} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1000], help="concurrent streams per run")
    parser.add_argument("--targets", nargs="+", default=[t for t in TARGETS if t != "litellm"], choices=TARGETS)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--token-delay", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one client waits before giving up")
    parser.add_argument("--litellm-venv", default="/tmp/litellm-venv")
    parser.add_argument(
        "--litellm-max-streams",
        type=int,
        default=1000,
        help="skip LiteLLM above this many streams (1 worker: 1,000 streams take it about 40 s)",
    )
    parser.add_argument(
        "--warm-burst",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="before each measured run, one unmeasured run of the same size (default on; --no-warm-burst "
        "measures each process's first burst, which depends on the order of the targets)",
    )
    parser.add_argument("--out", default=str(OUT / "concurrency_bench.json"))
    args = parser.parse_args(argv)
    try:
        raise_fd_limit(max(args.streams) + 100)
    except AssertionError as exc:
        print(exc, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ibc-concurrency-bench-"))
    py = sys.executable
    port = pb.free_port()
    argv_mock = [py, "-m", "ibc", "mock-backend", "--bind", f"127.0.0.1:{port}", "--model", MODEL]
    argv_mock += ["--token-delay", str(args.token_delay), "--tokens", str(args.tokens)]
    backend = pb.start("backend", argv_mock, port, "/health", workdir)
    runs: list[Run] = []
    try:
        for name in args.targets:
            try:
                top = max(args.streams)
                server = backend if name == "backend" else start_target(name, backend.url, workdir, args, top)
            except RuntimeError as exc:  # one proxy that cannot start must not lose the others' figures
                print(f"{name}: not measured: {exc}", file=sys.stderr, flush=True)
                continue
            try:
                for n in args.streams:
                    if name == "litellm" and n > args.litellm_max_streams:
                        continue
                    run = measure(name, server.url, n, args, None if name == "backend" else server)
                    runs.append(run)
                    print(json.dumps(asdict(run)), file=sys.stderr, flush=True)
            finally:
                if server is not backend:
                    server.stop()
    finally:
        backend.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
