"""`ibc plan`: the what-if planner. Would scaling a model fit the cluster in a snapshot file?

It answers with the same decision, and the same explanation, as the proxy's 429 and the webhook's
deny, because it calls the same function. Exit 0 fits, 1 does not, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

from budget import Blocking, BudgetError, ClusterView, Decision, decide_scale, explain
from budget.objects import parse_time
from budget.quantity import format_bytes
from budget.snapshot import load_snapshot

_SCALE = re.compile(r"^(?:(?P<ns>[a-z0-9.-]+)/)?(?P<name>[A-Za-z0-9._-]+)=(?P<replicas>[0-9]+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "What-if planner: decide whether scaling a model to N replicas fits the cluster described by a "
        "snapshot file, and explain why not. Exit 0 when it fits, 1 when it does not, 2 on bad input."
    )
    parser.epilog = (
        "A snapshot is multi-document YAML of Nodes, ResourceSlices, Pods, Deployments and InferenceModels, or "
        "the List printed by `kubectl get nodes,resourceslices,pods,deployments,inferencemodels -A -o yaml`.\n"
        "Placements are per device: each new replica's node and the device indices it takes there "
        '(text: `placement:` lines; json: `placements` as {"node": ..., "devices": [...]}).\n'
        "Example: ibc plan --cluster-state examples/seed-scenario.yaml --scale default/model-b=1"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--cluster-state", required=True, metavar="FILE", help="snapshot YAML file")
    parser.add_argument(
        "--scale",
        required=True,
        metavar="NAMESPACE/NAME=REPLICAS",
        help="the model and its new replica count (namespace defaults to `default`)",
    )
    parser.add_argument("--output", choices=["text", "json"], default="text", help="text (default) or json")
    parser.add_argument(
        "--now",
        metavar="RFC3339",
        help="evaluate idle times at this moment (default: the snapshot's captured-at annotation, else now)",
    )


def _blocking_line(b: Blocking) -> str:
    """One blocking model for people: what it holds, its state, and when its memory is free on its own."""
    state = f"idle {int(b.idle_for_seconds)}s" if b.state == "idle" else b.state
    if b.state == "orphan":
        return f"{b.model} {format_bytes(b.memory_bytes)}, orphan (its model is gone), frees its memory only when " \
            f"{', '.join(b.pods)} {'is' if len(b.pods) == 1 else 'are'} deleted"
    if b.free_in_seconds is None:
        until = "never frees its memory on its own (cooldown 0)" if b.state != "stopping" else "stopping"
    elif b.state == "stopping":
        until = f"free within {math.ceil(b.free_in_seconds)}s (grace period)"
    elif b.state == "starting":
        until = f"free in {math.ceil(b.free_in_seconds)}s (start-up, then cooldown)"
    else:
        until = f"cooldown ends in {math.ceil(b.free_in_seconds)}s"
    return f"{b.model} {format_bytes(b.memory_bytes)}, {state}, {until}"


def _placement_line(view: ClusterView, node_name: str, devices: tuple[int, ...]) -> str:
    """One new replica for people: `gpu-node-1 GPU 0, GPU 1`, `shadow (unified memory)`."""
    node = view.node_index[node_name]
    labels = [d.label() if d is not None else str(i) for i in devices for d in [node.device(i)]]
    if labels == ["memory"]:
        return f"{node_name} (unified memory)"
    return f"{node_name} {', '.join(labels)}"


def _placements(decision: Decision) -> list[dict[str, object]]:
    return [{"node": s.node, "devices": list(s.devices)} for s in decision.device_placements]


def _fail(message: str) -> int:
    print(f"ibc plan: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    match = _SCALE.match(args.scale or "")
    if not match:
        return _fail(f"--scale {args.scale!r}: expected NAMESPACE/NAME=REPLICAS, e.g. default/model-b=1")
    key = f"{match['ns'] or 'default'}/{match['name']}"
    replicas = int(match["replicas"])
    try:
        snapshot = load_snapshot(args.cluster_state)
        now = parse_time(args.now, field="--now") if args.now else None
        if now is None:
            now = snapshot.captured_at if snapshot.captured_at is not None else time.time()
        if key not in snapshot.view.models:
            known = ", ".join(sorted(snapshot.view.models)) or "none"
            return _fail(f"unknown model {key!r} in {args.cluster_state} (known: {known})")
        decision = decide_scale(snapshot.view, key, replicas, now)
    except BudgetError as exc:
        return _fail(str(exc))
    body = explain(decision)
    if args.output == "json":
        doc = {"allowed": decision.allowed, "reason": decision.reason, **body, "placements": _placements(decision)}
        print(json.dumps(doc, indent=2))
    else:
        verdict = "FITS" if decision.allowed else "DOES NOT FIT"
        print(f"{verdict}: {decision.message}")
        split = f" over {decision.devices} devices" if decision.devices > 1 else ""
        print(f"  requested: {decision.model} x{replicas} at {format_bytes(decision.memory_bytes)} each{split}")
        print(f"  available: {decision.available} (largest placement left in {decision.where})")
        for slot in decision.device_placements:
            print(f"  placement: {_placement_line(snapshot.view, slot.node, slot.devices)}")
        for i, b in enumerate(decision.blocking):
            needed = "  <- must go for it to fit" if i < decision.retry_blocking else ""
            print(f"  blocking:  {_blocking_line(b)}{needed}")
        if not decision.allowed:
            if decision.retry_after_seconds:
                print(f"  retry after: {decision.retry_after_seconds}s")
            else:
                print("  retry after: never (waiting cannot help; see the message)")
    return 0 if decision.allowed else 1
