"""`ibc mock-backend`: a fast OpenAI-compatible test server standing in for vLLM.

Used by the integration tests, by local-mode demos (as the model command) and as the baseline of the
proxy benchmarks. It prints `listening on http://HOST:PORT` to stderr once the socket accepts
connections, so a caller that asked for port 0 can find the port.
"""

from __future__ import annotations

import argparse
import sys

from mockbackend.server import MockSettings, serve
from serving.bind import parse_bind


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return number


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


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_bind(args.bind)
        if args.tokens < 0 or args.embedding_dim < 1:
            raise ValueError("--tokens must be >= 0 and --embedding-dim >= 1")
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
    )

    def announce(url: str) -> None:
        print(f"ibc mock-backend: {args.model} listening on {url}", file=sys.stderr, flush=True)

    try:
        serve(settings, host, port, on_listening=announce)
    except OSError as exc:
        print(f"ibc mock-backend: cannot listen on {args.bind}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
