"""Entry point of `ibc`: builds the argument parser from the subcommand table and dispatches.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily, only for the chosen subcommand, so `ibc plan` does not pay for flask
or the kubernetes client. Exit codes: 0 success, 1 "does not fit" / operational failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). The module owns its flags.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("ibc.commands.plan", "what-if: would scaling a model fit the cluster snapshot? (exit 0 fits, 1 not)"),
    "local": ("ibc.commands.local", "run the proxy, the budget and models as local processes (no cluster)"),
    "status": ("ibc.commands.status", "show the memory budget: nodes, models, timers, held requests, refusals"),
    "start": ("ibc.commands.control", "start a model now if the budget allows (ibc local, or a cluster)"),
    "stop": ("ibc.commands.control", "stop a model now and free its memory (ibc local, or a cluster)"),
    "proxy": ("ibc.commands.proxy", "OpenAI-compatible proxy: route by model, scale from zero, explained 429"),
    "extender": ("ibc.commands.extender", "kube-scheduler extender: filter, prioritize, bind by memory budget"),
    "webhook": ("ibc.commands.webhook", "validating admission webhook for InferenceModels and model Deployments"),
    "controller": ("ibc.commands.controller", "reconcile InferenceModels, idle scale-to-zero, memory advice"),
    "certs": ("ibc.commands.certs", "generate or bootstrap the webhook/extender TLS certificates"),
    "mock-backend": ("ibc.commands.mock_backend", "a streaming OpenAI-compatible test server"),
    "bench": ("ibc.commands.bench", "run the side-by-side benchmarks and write bench/RESULTS.md"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibc",
        description=(
            "Inference Budget Controller: lets several LLMs share a limited pool of accelerator "
            "memory and answers at once, with the reason, when a model cannot be started."
        ),
        epilog="Run `ibc <command> --help` for the flags of a command.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="log line format")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and module_name.startswith(exc.name):
                    p.set_defaults(_missing=module_name)
                    continue
                raise
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in SUBCOMMANDS:
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_chosen(argv) or "")
    args = parser.parse_args(argv)
    from ibc.logs import configure

    configure(args.log_level, args.log_format)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"ibc {args.command}: not available in this build ({args._missing} is missing)", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
