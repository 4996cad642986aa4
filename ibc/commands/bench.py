"""`ibc bench`: every side-by-side benchmark in one command, written to bench/RESULTS.md.

The benchmarks are scripts in the repository's bench/ directory (they start real servers, a control
plane when asked, and load generators), so this command runs from a source checkout: it loads
bench/run_all.py, which runs each script, measures the loopback floor with each script's own client,
and writes every figure beside its baseline and the ratio, stamped with the machine and the date.
Exit 0 when every section ran, 1 when one failed (the others are still written), 2 on bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SECTIONS = ("proxy", "webhook", "extender", "recovery", "coldstart", "concurrency", "engine", "load", "routing")
REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the side-by-side benchmarks (proxy, webhook, extender, recovery after SIGKILL, scale from zero, "
        "a real engine behind ibc local, the load layer's saturation-to-new-replica time, routing across replicas "
        "with prefix caches) "
        "with the loopback floor measured by each benchmark's own client, and write bench/RESULTS.md."
    )
    parser.epilog = (
        "Examples:\n"
        "  ibc bench --quick                         # a few minutes: check that everything runs\n"
        "  ibc bench --only proxy,webhook            # some sections\n"
        "  ibc bench --cluster --max-load 1.5        # full run on a quiet machine, with the control plane\n"
        "Numbers taken while other jobs load the machine are noise: use --max-load. See docs/benchmarks.md."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="short runs (one round, fewer requests)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        metavar="LIST",
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also run the control-plane benchmarks (webhook on API scale requests, kube-scheduler "
        "throughput with the extender); needs the cluster tier's binaries",
    )
    parser.add_argument(
        "--litellm", action="store_true", help="add the LiteLLM proxy to the proxy comparison (installed on first use)"
    )
    parser.add_argument("--repeat", type=int, metavar="N", help="runs of each recovery scenario (default 3, quick 1)")
    parser.add_argument(
        "--output", type=Path, default=REPO / "bench" / "RESULTS.md", metavar="FILE", help="default bench/RESULTS.md"
    )
    parser.add_argument(
        "--max-load",
        type=float,
        metavar="LOAD",
        help="wait until the 1-minute load average is below LOAD before starting (checked every minute)",
    )
    parser.add_argument(
        "--wait-minutes",
        type=float,
        default=30.0,
        metavar="MIN",
        help="give up waiting for --max-load after this long and run anyway, saying so (default 30)",
    )


def _fail(message: str) -> int:
    print(f"ibc bench: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        return _fail(f"--only {args.only!r}: choose from {', '.join(SECTIONS)}")
    if args.repeat is not None and args.repeat < 1:
        return _fail(f"--repeat must be >= 1, got {args.repeat}")
    if args.max_load is not None and args.max_load <= 0:
        return _fail(f"--max-load must be > 0, got {args.max_load}")
    script = REPO / "bench" / "run_all.py"
    if not script.is_file():
        return _fail(f"{script} not found: ibc bench runs from a source checkout of the repository")
    spec = importlib.util.spec_from_file_location("ibc_bench_run_all", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    args.only = only
    if not getattr(args, "argv", None):  # how it was called, for the report's header
        argv = sys.argv[1:]
        args.argv = argv[argv.index("bench") + 1 :] if "bench" in argv else []
    return int(module.run(args))
