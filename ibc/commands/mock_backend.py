"""`ibc mock-backend`: a fast OpenAI-compatible test server standing in for vLLM.

Used by the integration tests, by local-mode demos (as the model command) and as the baseline of the
proxy benchmarks. It prints `listening on http://HOST:PORT` to stderr once the socket accepts
connections, so a caller that asked for port 0 can find the port.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mockbackend.server import MockSettings, serve
from serving.bind import parse_bind


def _number(cast: type[float] | type[int], what: str) -> Callable[[str], float]:
    """An argparse type: `cast(value)`, which must be >= 0."""

    def parse(value: str) -> float:
        try:
            number = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if number < 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
        return number

    return parse


_non_negative = _number(float, "a number")
_count = _number(int, "a whole number")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "A fast OpenAI-compatible test server (chat/completions, completions, embeddings, models, SSE "
        "streaming one event per token). GET /health answers 503 until --startup-delay has passed."
    )
    parser.add_argument("--bind", default="127.0.0.1:8000", metavar="HOST:PORT", help="default 127.0.0.1:8000")
    parser.add_argument("--model", required=True, metavar="NAME", help="the model name it serves and checks")
    parser.add_argument(
        "--startup-delay",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="seconds of 503 on /health and /v1 after start (default 0)",
    )
    parser.add_argument(
        "--token-delay",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="seconds between streamed tokens (default 0)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=16,
        metavar="N",
        help="tokens per completion unless the request's max_tokens is given (default 16)",
    )
    parser.add_argument(
        "--latency",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="seconds before the first byte of every /v1 answer (default 0)",
    )
    parser.add_argument("--embedding-dim", type=int, default=8, metavar="N", help="embedding size (default 8)")
    vllm = parser.add_argument_group(
        "like vLLM (scheduler, prefix cache, GET /metrics with vLLM's metric names)",
        "A prompt is cut in blocks of 64 bytes of UTF-8 text (~16 tokens); a simulated token is 4 bytes.",
    )
    vllm.add_argument(
        "--max-running",
        type=_count,
        default=0,
        metavar="N",
        help="completions generated at once (vLLM's --max-num-seqs); more wait in a FIFO queue, "
        "reported as vllm:num_requests_waiting (default 0: no limit)",
    )
    vllm.add_argument(
        "--kv-capacity-tokens",
        type=_count,
        default=65536,
        metavar="N",
        help="simulated KV cache size: vllm:kv_cache_usage_perc = (prompt + completion tokens of the running "
        "requests) / N (default 65536)",
    )
    vllm.add_argument(
        "--prefix-cache-blocks",
        type=_count,
        default=1024,
        metavar="N",
        help="simulated prefix cache: the N most recently used prompt blocks (0 = off; default 1024)",
    )
    vllm.add_argument(
        "--no-metrics",
        action="store_true",
        help="answer 404 at /metrics, like a backend without Prometheus metrics (the queue still applies)",
    )
    vllm.add_argument(
        "--prefill-per-block",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="seconds added before the first token per prompt block not in the prefix cache (default 0)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_bind(args.bind)
        if args.tokens < 0 or args.embedding_dim < 1:
            raise ValueError("--tokens must be >= 0 and --embedding-dim >= 1")
        if args.kv_capacity_tokens < 1:
            raise ValueError("--kv-capacity-tokens must be >= 1")
    except ValueError as exc:
        print(f"ibc mock-backend: {exc}", file=sys.stderr)
        return 2
    settings = MockSettings(
        model=args.model,
        startup_delay_seconds=args.startup_delay,
        token_delay_seconds=args.token_delay,
        tokens=args.tokens,
        latency_seconds=args.latency,
        embedding_dim=args.embedding_dim,
        max_running=args.max_running,
        kv_capacity_tokens=args.kv_capacity_tokens,
        prefix_cache_blocks=args.prefix_cache_blocks,
        prefill_block_seconds=args.prefill_per_block,
        serve_metrics=not args.no_metrics,
    )

    def announce(url: str) -> None:
        print(f"ibc mock-backend: {args.model} listening on {url}", file=sys.stderr, flush=True)

    try:
        serve(settings, host, port, on_listening=announce)
    except OSError as exc:
        print(f"ibc mock-backend: cannot listen on {args.bind}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
