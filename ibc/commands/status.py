"""`ibc status`: what holds the memory, how long until it frees, what waits and what was refused.

The same document as `GET /status` (`budget.status`), from a running `ibc proxy` / `ibc local`
(`--url`), from a snapshot file (`--cluster-state`) or straight from a cluster (`--kubeconfig`), shown
as a terminal table (a memory bar per node, models largest holder first, idle timers) or as JSON.
The renderer reads only the JSON document, so every source looks the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ibc.client import DEFAULT_URL, ClientError, InputError, add_client_arguments, api_key, call, error_message

BAR_WIDTH = 40
DEFAULT_WATCH_SECONDS = 2.0
# Seconds to wait for the first list of every kind from the API server (--kubeconfig).
SYNC_TIMEOUT_SECONDS = 30.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: --watch redraws in place


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Show the memory budget: per node its capacity, declared use, free memory and a bar split by model; "
        "per model its state, replicas, memory, idle time, cooldown left, held requests, last refusal "
        "and memory advice. From a running proxy or `ibc local` (default), a snapshot file, or a cluster."
    )
    parser.epilog = (
        "Examples:\n"
        "  ibc status                                   # the `ibc local` on 127.0.0.1:8080\n"
        "  ibc status --url http://proxy:8080 --watch   # refresh every 2 s in place\n"
        "  ibc status --cluster-state examples/seed-scenario.yaml\n"
        "  ibc status --kubeconfig ~/.kube/config --output json\n"
        "Exit 0 when shown, 1 when the source cannot be read, 2 on bad input. See docs/status.md."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_client_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cluster-state", metavar="FILE", help="a snapshot YAML file (as `ibc plan` reads)")
    source.add_argument("--kubeconfig", metavar="FILE", help="read the cluster's objects through this kubeconfig")
    parser.add_argument("--namespace", metavar="NS", help="with --kubeconfig: only this namespace's models and pods")
    parser.add_argument("--output", choices=["text", "json"], default="text", help="text (default) or json")
    parser.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_SECONDS,
        type=float,
        metavar="SECONDS",
        help=f"redraw in place every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    parser.add_argument(
        "--now",
        metavar="RFC3339",
        help="with --cluster-state or --kubeconfig: evaluate idle times at this moment "
        "(default: the snapshot's captured-at annotation, else now)",
    )


def _fail(message: str, code: int = 2) -> int:
    print(f"ibc status: {message}", file=sys.stderr)
    return code


# ----- sources: each returns a function that fetches the document once -----


def _from_url(url: str, key: str | None) -> Callable[[], dict[str, Any]]:
    def fetch() -> dict[str, Any]:
        answer = call("GET", url, "/status", key=key)
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise ClientError(f"{url}/status: {error_message(answer)}")
        return answer.body

    return fetch


def _from_snapshot(path: str, now: float | None) -> Callable[[], dict[str, Any]]:
    from budget.snapshot import load_snapshot
    from budget.status import Counters, build_status, observed_peaks, status_body

    snapshot = load_snapshot(path)
    at = now if now is not None else snapshot.captured_at
    counters = Counters(observed_peak_bytes=observed_peaks(snapshot.objects))

    def fetch() -> dict[str, Any]:
        moment = at if at is not None else time.time()
        return status_body(build_status(snapshot.view, moment, counters, source=f"snapshot {path}"))

    return fetch


def _from_cluster(
    kubeconfig: str, namespace: str | None, now: float | None
) -> tuple[Callable[[], dict[str, Any]], Any]:
    from budget.status import Counters, build_status, observed_peaks, status_body
    from kubeview.api import load_api_client
    from kubeview.cache import ClusterCache

    try:
        api = load_api_client(kubeconfig)
    except Exception as exc:  # the kubernetes client raises its own ConfigException and plain errors
        raise ClientError(f"--kubeconfig {kubeconfig}: {exc}") from exc
    cache = ClusterCache(api, namespace=namespace)  # nodes, model pods, Deployments, InferenceModels
    cache.start()
    if not cache.wait_synced(SYNC_TIMEOUT_SECONDS):
        cache.stop()
        raise ClientError(f"the API server did not list every kind within {SYNC_TIMEOUT_SECONDS:g}s")

    def fetch() -> dict[str, Any]:
        counters = Counters(observed_peak_bytes=observed_peaks(cache.objects("InferenceModel")))
        moment = now if now is not None else time.time()
        return status_body(build_status(cache.view(), moment, counters, source="cluster"))

    return fetch, cache


# ----- the terminal table -----


def human_duration(seconds: float | None) -> str:
    """`45s`, `8m 00s`, `1h 05m`: timers people read at a glance ('-' when there is none)."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = []
    for row in [headers, *rows]:
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return out


def _letters(doc: dict[str, Any]) -> dict[str, str]:
    """One letter per model for the bars, in the models' order (largest holder first)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return {m["name"]: alphabet[i % len(alphabet)] for i, m in enumerate(doc["models"])}


def _bar(node: dict[str, Any], letters: dict[str, str]) -> str:
    """`[AAAAAAAAAAAAAAAAAAAAAAAAA...............]`: each model's share of the node, `.` free.

    Starting or reserved replicas are drawn in lower case. Cells are rounded down per model and
    never exceed the width, so a bar never claims more than the node has.
    """
    capacity = max(1, node["capacity_bytes"])
    cells: list[str] = []
    shares: dict[str, list[int]] = {}
    for r in node["replicas"]:
        share = shares.setdefault(r["model"], [0, 0])
        share[0] += r["memory_bytes"]
        share[1] += 0 if r["ready"] else 1
    for model, (memory, pending) in shares.items():
        letter = letters.get(model, "?")
        n = memory * BAR_WIDTH // capacity
        cells.extend((letter.lower() if pending else letter) * max(1, n))
    cells = cells[:BAR_WIDTH]
    return "[" + "".join(cells) + "." * (BAR_WIDTH - len(cells)) + "]"


def render(doc: dict[str, Any]) -> str:
    """The status document as the terminal table."""
    letters = _letters(doc)
    lines = [f"ibc status · {doc.get('source') or 'ibc'} · {doc['now']}", ""]
    node_rows = []
    for n in doc["nodes"]:
        room = f"{n['used']} / {n['capacity']}"
        node_rows.append([n["name"], room, n["free"], n["largest_placeable"], _bar(n, letters)])
        devices = n.get("devices") or []
        if any(d["kind"] != "unified" for d in devices):  # a node of GPUs: one row per device under it
            for d in devices:
                node_rows.append(
                    [f"  {d['label']}", f"{d['used']} / {d['capacity']}", d["free"], d["largest_placeable"], ""]
                )
    if node_rows:
        lines += _table(["NODE", "USED / CAPACITY", "FREE", "FITS", "MEMORY"], node_rows)
        legend = [f"{letters[m['name']]}={m['name']}" for m in doc["models"] if m["held_bytes"]]
        lines.append(f"  {' '.join(legend)}  (lower case: starting)  .=free" if legend else "  .=free")
    else:
        lines.append("no budgeted node")
    for p in doc["pools"]:
        lines.append(
            f"pool {p['name']}: {len(p['nodes'])} node(s), {p['used']} of {p['capacity']} used, {p['free']} free, "
            f"largest that fits {p['largest_placeable']}"
        )
    lines.append("")
    model_rows = []
    for m in doc["models"]:
        nodes = sorted({p["node"] for p in m["placements"]})
        # A snapshot has no request path: nothing is held there, and "0" would pretend to know.
        held = "-" if m["queue_limit"] is None else f"{m['held_requests']}/{m['queue_limit']}"
        cooldown = human_duration(m["cooldown_remaining_seconds"])
        if m["cooldown_seconds"] <= 0 and m["held_bytes"]:
            cooldown = "never"
        peak = m["observed_peak"] or "-"
        if m["advice"] and m["advice"]["recommended_memory"]:
            peak += f" -> {m['advice']['recommended_memory']}"
        model_rows.append(
            [
                m["name"],
                m["state"],
                f"{m['replicas']['ready']}/{m['replicas']['desired']}",
                m["memory"],
                m["held"] if m["held_bytes"] else "-",
                ",".join(nodes) or "-",
                human_duration(m["idle_for_seconds"]),
                cooldown,
                held,
                peak,
            ]
        )
    headers = ["MODEL", "STATE", "READY", "MEMORY", "HOLDS", "ON", "IDLE", "COOLDOWN LEFT", "HELD", "PEAK"]
    lines += _table(headers, model_rows) if model_rows else ["no model"]
    starts = [m for m in doc["models"] if m["next_start"]]
    if starts:
        lines += ["", "NEXT START (a request now)"]
        for m in starts:
            s = m["next_start"]
            retry = s.get("retry_after_seconds")
            later = f"retry after {retry}s" if retry else "waiting will not help"
            verdict = "starts" if s["allowed"] else f"429 {s['reason']}, {later}"
            lines.append(f"  {m['name']}: {verdict}" + ("" if s["allowed"] else f": {s['message']}"))
    refused = sorted((m for m in doc["models"] if m["last_refusal"]), key=lambda m: -m["last_refusal"]["at_seconds"])
    lines += ["", "LAST REFUSALS"]
    if not refused:
        lines.append("  none")
    for m in refused:
        r = m["last_refusal"]
        lines.append(f"  {m['name']} {human_duration(r['ago_seconds'])} ago ({r['at']}), {r['reason']}: {r['message']}")
    return "\n".join(lines) + "\n"


def _show(doc: dict[str, Any], output: str) -> str:
    return json.dumps(doc, indent=2) + "\n" if output == "json" else render(doc)


def run(args: argparse.Namespace) -> int:
    from budget import BudgetError
    from budget.objects import parse_time

    if args.watch is not None and not (args.watch > 0):
        return _fail(f"--watch {args.watch:g}: give a positive number of seconds")
    if args.count is not None and args.count < 1:
        return _fail(f"--count {args.count}: give 1 or more")
    if args.url and (args.cluster_state or args.kubeconfig):
        return _fail("--url reads a running proxy; --cluster-state and --kubeconfig read the cluster: give one")
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        return _fail(f"--kubeconfig {args.kubeconfig}: no such file")
    cache = None
    try:
        now = parse_time(args.now, field="--now") if args.now else None
        if args.now and not (args.cluster_state or args.kubeconfig):
            return _fail("--now applies to --cluster-state and --kubeconfig (a running proxy uses its own clock)")
        if args.cluster_state:
            fetch = _from_snapshot(args.cluster_state, now)
        elif args.kubeconfig:
            fetch, cache = _from_cluster(args.kubeconfig, args.namespace, now)
        else:
            fetch = _from_url(args.url or DEFAULT_URL, api_key(args.api_key_file))
        if args.watch is None:
            sys.stdout.write(_show(fetch(), args.output))
            return 0
        shown = 0
        while args.count is None or shown < args.count:
            if shown:
                time.sleep(args.watch)
            try:
                text = _show(fetch(), args.output)
            except ClientError as exc:  # a proxy restarting: say so and keep watching
                text = f"ibc status: {exc}\n"
            sys.stdout.write(CLEAR + text)
            sys.stdout.flush()
            shown += 1
        return 0
    except BudgetError as exc:
        return _fail(str(exc))
    except ClientError as exc:
        return _fail(str(exc), 2 if isinstance(exc, InputError) else 1)
    except KeyboardInterrupt:
        return 0
    finally:
        if cache is not None:
            cache.stop()
