"""`ibc start MODEL` and `ibc stop MODEL`: start or stop a model by hand.

Against `ibc local` (`--url`): `POST /models/{name}/start|stop`; a start is decided by the budget
like a request's (a refusal prints the 429's explanation and exits 1), a stop takes the cooldown's
path. In a cluster (`--kubeconfig`): the InferenceModel's `/scale` subresource is patched (0 to stop;
to start, 1 unless it asks for more), so the admission webhook decides a start as for any scale-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import quote

from ibc.client import DEFAULT_URL, ClientError, InputError, add_client_arguments, api_key, call, error_message

SCALE_TIMEOUT_SECONDS = 10.0


def _verb(parser: argparse.ArgumentParser) -> str:
    return "stop" if parser.prog.rsplit(" ", 1)[-1] == "stop" else "start"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verb = _verb(parser)
    if verb == "start":
        parser.description = (
            "Start a model now, if the memory budget allows it (the same decision as a request's: a refusal "
            "prints the explanation and exits 1). Against `ibc local` (--url), or a cluster (--kubeconfig: "
            "scales the InferenceModel to 1 and the admission webhook decides)."
        )
    else:
        parser.description = (
            "Stop a model now, freeing its memory: against `ibc local` (--url) its processes stop the way its "
            "cooldown stops them; in a cluster (--kubeconfig) its InferenceModel is scaled to 0."
        )
    parser.epilog = f"Example: ibc {verb} model-a --url {DEFAULT_URL}\nExit 0 done, 1 refused or failed, 2 bad input."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL", help="the model's name (what clients send as `model`)")
    add_client_arguments(parser)
    parser.add_argument("--kubeconfig", metavar="FILE", help="act on a cluster's InferenceModel instead of a proxy")
    parser.add_argument("--namespace", default="default", metavar="NS", help="with --kubeconfig (default `default`)")
    if verb == "start":
        parser.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="against ibc local: wait up to SECONDS for the model to be ready (default 0: do not wait)",
        )


def _fail(verb: str, message: str, code: int = 2) -> int:
    print(f"ibc {verb}: {message}", file=sys.stderr)
    return code


def _via_proxy(verb: str, args: argparse.Namespace) -> int:
    url = args.url or DEFAULT_URL
    params = {"wait": f"{args.wait:g}"} if verb == "start" and args.wait else None
    timeout = SCALE_TIMEOUT_SECONDS + (args.wait if verb == "start" else 0.0)
    path = f"/models/{quote(args.model, safe='')}/{verb}"
    answer = call("POST", url, path, key=api_key(args.api_key_file), params=params, timeout_seconds=timeout)
    body = answer.body if isinstance(answer.body, dict) else {}
    if answer.status in (200, 202):
        state = body.get("state", "?")
        if verb == "stop":
            done = f"stopping {body.get('stopping')} replica(s)" if body.get("stopping") else "was not running"
        else:
            done = "ready" if answer.status == 200 else f"{state} (not ready yet)"
        print(f"{body.get('model', args.model)}: {done}")
        return 0
    if answer.status == 429:
        print(f"{args.model}: not started: {error_message(answer)}", file=sys.stderr)
        retry = body.get("retry_after_seconds")
        if retry:
            print(f"  retry after {retry}s", file=sys.stderr)
        return 1
    if answer.status == 404 and isinstance(body.get("error"), dict) and body["error"].get("code") == "not_found":
        return _fail(verb, f"{url} has no manual {verb} (only `ibc local` has; in a cluster give --kubeconfig)", 1)
    return _fail(verb, f"{args.model}: {error_message(answer)}", 2 if answer.status in (400, 404) else 1)


def _via_cluster(verb: str, args: argparse.Namespace) -> int:
    from kubeview.api import INFERENCE_MODELS, ApiError, Kube, load_api_client

    if not Path(args.kubeconfig).is_file():
        return _fail(verb, f"--kubeconfig {args.kubeconfig}: no such file")
    try:
        kube = Kube(load_api_client(args.kubeconfig), timeout_seconds=SCALE_TIMEOUT_SECONDS)
    except Exception as exc:  # the kubernetes client raises its own ConfigException and plain errors
        return _fail(verb, f"--kubeconfig {args.kubeconfig}: {exc}")
    path = INFERENCE_MODELS.path(args.namespace, args.model, "scale")
    try:
        scale = kube.get(path)
        if scale is None:
            return _fail(verb, f"no InferenceModel {args.namespace}/{args.model}", 1)
        current = int((scale.get("spec") or {}).get("replicas") or 0)
        replicas = 0 if verb == "stop" else max(1, current)
        if replicas != current:
            kube.merge_patch(path, {"spec": {"replicas": replicas}})
    except ApiError as exc:
        if verb == "start" and exc.webhook_denial:  # the admission webhook refused the scale-up: say why
            print(f"{args.model}: not started: {exc.webhook_denial}", file=sys.stderr)
            return 1
        return _fail(verb, f"{args.namespace}/{args.model}: {exc}", 1)
    if replicas == current:
        print(f"{args.namespace}/{args.model}: already at {current} replica(s)")
    else:
        print(f"{args.namespace}/{args.model}: replicas {current} -> {replicas}")
    return 0


def run(args: argparse.Namespace) -> int:
    verb = args.command
    if args.kubeconfig and args.url:
        return _fail(verb, "give --url (a running ibc local) or --kubeconfig (a cluster), not both")
    if verb == "start" and not (0 <= args.wait <= 3600):
        return _fail(verb, f"--wait {args.wait:g}: give seconds between 0 and 3600")
    try:
        return _via_cluster(verb, args) if args.kubeconfig else _via_proxy(verb, args)
    except ClientError as exc:
        return _fail(verb, str(exc), 2 if isinstance(exc, InputError) else 1)
