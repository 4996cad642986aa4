"""The extender's decisions and its one write, free of HTTP: filter, prioritize, bind.

Memory is decided only by the budget core (`budget.filter_nodes`, `budget.score_nodes`); this module
chooses which view the core sees and keeps the reservation book honest:

- filter, for a model pod, runs the core on the cache's view plus the live reservations, takes the
  best passing node, reserves the pod's memory there and answers with that node alone, all under the
  book's lock. So N pods filtered before any of them is bound each hold memory on the one node they
  were told about, and no node is ever promised more than it can hold. (Answering every passing node
  would let the scheduler pick a node we did not reserve; see docs/extender.md for the trade-off.)
- bind re-checks the fit on the scheduler's chosen node under the same lock, refreshes the
  reservation there (on the devices the core chose), then POSTs the Binding outside the lock; a failed
  POST releases it. The Binding carries the pod's device indices as the annotation
  `inference.eh-ops.io/devices` ("0,1"): the API server copies a Binding's annotations onto the pod in
  the same write that sets spec.nodeName, so a model pod is never bound without them and never
  annotated without being bound (one request succeeds or fails whole; there is no second patch).
- the watch turns reservations into placements: a pod seen bound, terminated or deleted drops its entry.

Within a node the core bin-packs devices (the fullest that fit, so whole GPUs stay free for larger or
tensor-parallel replicas), as the webhook's and the proxy's `decide_scale` do; `--score` chooses among
nodes only. A node the pod does not fit says why per device in the wire's FailedNodes (`insufficient inference memory
budget (30Gi on 1 device; GPU 0 has 10Gi free of 40Gi, GPU 1 has 10Gi free of 40Gi)`), so the
scheduler's FailedScheduling event names the devices; a unified-memory node keeps the bare reason, and
the metrics count the bare reasons only (bounded label values).

Pods that are not model replicas (no model label, or no memory anywhere) pass everywhere.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from budget import (
    REASON_INSUFFICIENT,
    ClusterView,
    Node,
    NodeVerdict,
    ObjectError,
    PodRequest,
    Reservation,
    filter_nodes,
    format_bytes,
    score_nodes,
)
from budget.decide import REASON_DEVICES, Need
from budget.objects import (
    ANNOTATION_DEVICES,
    TERMINATED_PHASES,
    format_device_indices,
    model_label,
    node_from_object,
    pod_request_from_pod,
)
from budget.view import device_matches, model_key, share_bytes
from extender.metrics import Metrics
from extender.reservations import ReservationBook
from extender.settings import Settings
from extender.source import BindingError, CacheSource
from extender.wire import ExtenderArgs

log = logging.getLogger(__name__)

NOT_SYNCED = "the inference budget extender is not ready: its cluster view is still syncing"


@dataclass(frozen=True)
class FilterAnswer:
    """What filter decided for one pod, before it is put on the wire."""

    result: str  # passthrough | reserved | fits | unschedulable | invalid_pod | not_ready
    passed: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    unresolvable: dict[str, str] = field(default_factory=dict)
    error: str = ""
    reservation: Reservation | None = None


@dataclass(frozen=True)
class BindAnswer:
    """What bind did: `error` empty on success (the wire's `{"Error": ""}`)."""

    result: str  # bound | no_fit | bind_failed | invalid_pod | not_ready
    error: str = ""


class Extender:
    """Filter, prioritize and bind for one process, around one reservation book."""

    def __init__(
        self,
        settings: Settings,
        source: CacheSource,
        *,
        book: ReservationBook | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        if book is None:
            book = ReservationBook(settings.reservation_ttl_seconds, clock=clock or time.time)
        self.book = book
        self.clock = clock or self.book.clock
        self.metrics = metrics if metrics is not None else Metrics()
        self.book.on_change(self.metrics.reservations.set)
        source.add_listener(self.on_watch_event)

    # ----- shared helpers -----
    def _translate_nodes(self, objects: list[dict[str, Any]] | None) -> tuple[Node, ...] | None:
        """The Nodes form's Node objects as budget nodes (None for the NodeNames form): a Node object carries
        labels and annotations, its DRA devices come from the ResourceSlices the watch holds."""
        if objects is None:
            return None
        return tuple(_translate_node(obj, self.source.node) for obj in objects)

    def _pod_request(self, pod: dict[str, Any], view: ClusterView) -> PodRequest | None:
        """The core's question for a model pod; None for any other pod (raises ObjectError if malformed)."""
        label = model_label(pod)
        if not label:
            return None
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        model = view.models.get(model_key(namespace, label))
        return pod_request_from_pod(pod, fallback_memory=model.memory_bytes if model else None)

    def _view(self, base: ClusterView, request_nodes: tuple[Node, ...] | None, now: float) -> ClusterView:
        """The view a decision reads: request nodes (Nodes form) or cached nodes, plus live reservations.

        Deciding callers hold the book's lock and pass a `base` read under it (see filter).
        """
        if request_nodes is not None:
            base = replace(base, nodes=request_nodes)
        return base.with_reservations(self.book.live(now))

    def _best(self, passed: list[NodeVerdict], memory_bytes: int) -> NodeVerdict:
        """The node `budget.score_nodes` scores highest, by the exact share left free (its score before
        rounding, so ties at the same 0..10 score go the strategy's way), then by name."""
        sign = -1.0 if self.settings.score_strategy == "spread" else 1.0
        best, best_key = passed[0], (float("inf"), "")
        for v in passed:
            left = (v.free_bytes - memory_bytes) / v.capacity_bytes if v.capacity_bytes > 0 else 0.0
            key = (sign * left, v.node)
            if key < best_key:
                best, best_key = v, key
        return best

    # ----- filter -----
    def filter(self, args: ExtenderArgs) -> FilterAnswer:
        """Which of the sent nodes may take the pod; reserves memory on the one answered node."""
        if not self.source.synced:
            self.metrics.decisions.labels("filter", "not_ready", "").inc()
            return FilterAnswer("not_ready", [], error=NOT_SYNCED)
        now = self.clock()
        base = self.source.view()
        try:
            pod = self._pod_request(args.pod, base)
        except ObjectError as exc:
            log.warning("filter: pod %s is malformed: %s", args.pod_ref, exc)
            self.metrics.decisions.labels("filter", "invalid_pod", "").inc()
            return FilterAnswer("invalid_pod", [], error=f"pod {args.pod_ref}: {exc}")
        if pod is None:
            self.metrics.decisions.labels("filter", "passthrough", "").inc()
            return FilterAnswer("passthrough", list(args.node_names))
        reserve = self.settings.reservations and bool(pod.uid)
        request_nodes = self._translate_nodes(args.nodes)
        with self.book.locked():
            # Read the cache's view under the book's lock: a watch event that confirms a reservation
            # drops it under this lock, after the cache holds the placement, so it counts exactly once.
            view = self._view(self.source.view(), request_nodes, now)
            verdicts = filter_nodes(view, pod, args.node_names, now)
            passed: list[NodeVerdict] = []
            failed: dict[str, str] = {}
            unresolvable: dict[str, str] = {}
            said = _DeviceWords(view, pod, now)
            for v in verdicts:
                if v.status == "passed":
                    passed.append(v)
                elif v.status == "failed":
                    failed[v.node] = said.reason(v)
                else:
                    unresolvable[v.node] = said.reason(v)
            reservation = None
            if passed and reserve:
                best = self._best(passed, pod.memory_bytes)
                reservation = self.book.reserve(pod, best.node, now=now, devices=best.devices)
                answer = [best.node]
            else:
                if reserve:
                    self.book.release(pod.uid)  # filtered again and fits nowhere now: its old promise goes
                answer = [v.node for v in passed]
        counts = (
            Counter(v.reason for v in verdicts if v.status == "failed"),
            Counter(v.reason for v in verdicts if v.status == "unresolvable"),
        )
        self.metrics.count_verdicts(
            [(("passed", ""), len(passed))]
            + [(("failed", r), n) for r, n in counts[0].items()]
            + [(("unresolvable", r), n) for r, n in counts[1].items()]
        )
        if answer:
            result = "reserved" if reservation else "fits"
            log.debug(
                "filter: %s (%s) -> %s of %d nodes",
                args.pod_ref,
                format_bytes(pod.memory_bytes),
                answer,
                len(verdicts),
            )
            self.metrics.decisions.labels("filter", result, "").inc()
        else:
            result = "unschedulable"
            reasons = counts[0] + counts[1]
            largest_free = max((v.free_bytes for v in verdicts if v.reason == REASON_INSUFFICIENT), default=0)
            log.info(
                "filter: %s needs %s and fits none of %d nodes (%s; largest free %s)",
                args.pod_ref,
                format_bytes(pod.memory_bytes),
                len(verdicts),
                ", ".join(f"{n} {r}" for r, n in reasons.most_common()),
                format_bytes(max(0, largest_free)),
            )
            top = reasons.most_common(1)[0][0] if reasons else "no nodes"
            self.metrics.decisions.labels("filter", result, top).inc()
        return FilterAnswer(result, answer, failed, unresolvable, reservation=reservation)

    # ----- prioritize -----
    def prioritize(self, args: ExtenderArgs) -> dict[str, int]:
        """0..10 per node by the core's score; the node holding this pod's reservation gets 10."""
        scores = dict.fromkeys(args.node_names, 0)
        if not self.source.synced:
            return scores
        now = self.clock()
        base = self.source.view()
        try:
            pod = self._pod_request(args.pod, base)
        except ObjectError as exc:
            log.warning("prioritize: pod %s is malformed: %s", args.pod_ref, exc)
            self.metrics.decisions.labels("prioritize", "invalid_pod", "").inc()
            return scores
        if pod is None:
            self.metrics.decisions.labels("prioritize", "passthrough", "").inc()
            return scores
        view = self._view(base, self._translate_nodes(args.nodes), now)
        verdicts = filter_nodes(view, pod, args.node_names, now)
        scores.update(score_nodes(verdicts, pod.memory_bytes, self.settings.score_strategy))
        held = self.book.get(pod.uid, now=now) if pod.uid else None
        if held is not None and held.node in scores:
            scores[held.node] = 10
        self.metrics.decisions.labels("prioritize", "scored", "").inc()
        return scores

    # ----- bind -----
    def bind(self, namespace: str, name: str, uid: str, node: str) -> BindAnswer:
        """Re-check the fit on `node` under the lock, reserve, POST the Binding; release on failure."""
        ref = f"{namespace}/{name}"
        if not self.source.synced:
            return self._bind_answer(BindAnswer("not_ready", NOT_SYNCED))
        now = self.clock()
        base = self.source.view()
        try:
            pod = self._bind_request(namespace, name, uid, base, now)
        except ObjectError as exc:
            return self._bind_answer(BindAnswer("invalid_pod", f"pod {ref}: {exc}"))
        except BindingError as exc:
            return self._bind_answer(BindAnswer("bind_failed", str(exc)))
        reservation = None
        annotations: dict[str, str] = {}
        if pod is not None:
            pod = replace(pod, uid=uid or pod.uid)
            with self.book.locked():
                view = self._view(self.source.view(), None, now)
                verdict = filter_nodes(view, pod, [node], now)[0]
                if verdict.status != "passed":
                    log.info(
                        "bind: %s (%s) no longer fits %s (%s; free %s)",
                        ref,
                        format_bytes(pod.memory_bytes),
                        node,
                        verdict.reason,
                        format_bytes(max(0, verdict.free_bytes)),
                    )
                    reason = _DeviceWords(view, pod, now).reason(verdict)
                    return self._bind_answer(BindAnswer("no_fit", f"pod {ref} cannot be bound to {node}: {reason}"))
                if pod.uid:
                    reservation = self.book.reserve(pod, node, now=now, devices=verdict.devices)
            if verdict.devices:
                annotations[ANNOTATION_DEVICES] = format_device_indices(verdict.devices)
        try:
            self.source.writer.bind(
                namespace, name, uid, node, self.settings.bind_timeout_seconds, annotations=annotations
            )
        except BindingError as exc:
            if reservation is not None:
                self.book.release(reservation.uid, only=reservation)
            log.warning("bind: %s", exc)
            return self._bind_answer(BindAnswer("bind_failed", str(exc)))
        log.debug("bind: %s -> %s %s", ref, node, annotations.get(ANNOTATION_DEVICES, ""))
        return self._bind_answer(BindAnswer("bound"))

    def _bind_request(self, namespace: str, name: str, uid: str, base: ClusterView, now: float) -> PodRequest | None:
        """The pod being bound as the core's question: from the watch, its reservation, or the API server."""
        cached = self.source.pod(namespace, name)
        if cached is not None and uid and (cached.get("metadata") or {}).get("uid") != uid:
            cached = None  # the watch still shows an older pod of that name
        if cached is not None:
            return self._pod_request(cached, base)
        held = self.book.get(uid, now=now) if uid else None
        if held is not None:
            return _request_from_reservation(held, namespace, name)
        # Not a model pod, or one the watch has not shown yet: the API server knows which.
        fetched = self.source.writer.read_pod(namespace, name)
        if fetched is None:
            return None
        fetched_uid = (fetched.get("metadata") or {}).get("uid")
        if uid and fetched_uid and fetched_uid != uid:
            raise BindingError(f"pod {namespace}/{name} now has UID {fetched_uid}, not {uid}: it was recreated")
        return self._pod_request(fetched, base)

    def _bind_answer(self, answer: BindAnswer) -> BindAnswer:
        self.metrics.decisions.labels("bind", answer.result, "").inc()
        return answer

    # ----- the watch -----
    def on_watch_event(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        """A model pod seen bound, terminated or deleted no longer needs its reservation."""
        if kind != "Pod":
            return
        uid = str((obj.get("metadata") or {}).get("uid") or "")
        if not uid or self.book.get(uid) is None:
            return
        spec = obj.get("spec") or {}
        phase = (obj.get("status") or {}).get("phase")
        if event_type == "DELETED" or phase in TERMINATED_PHASES:
            self.book.release(uid)
            log.debug("reservation of pod uid %s dropped: pod %s", uid, "deleted" if event_type == "DELETED" else phase)
        elif spec.get("nodeName"):
            self.book.confirm(uid)
            log.debug("reservation of pod uid %s confirmed: bound to %s", uid, spec.get("nodeName"))


MAX_DEVICES_SAID = 4  # a reason names at most this many devices of a node ("... and 4 more"): one event line


class _DeviceWords:
    """A verdict's reason with the devices behind it, for people: the core decided, this only words it.

    The free bytes are the view's (`ClusterView.device_free`, the pod's own reservation aside), the numbers
    `budget.filter_nodes` fitted the pod to; a unified-memory node keeps the bare reason."""

    def __init__(self, view: ClusterView, pod: PodRequest, now: float) -> None:
        model = view.models.get(pod.model)
        selector = {**(model.device_selector if model else {}), **pod.device_selector}
        count = pod.devices or (model.devices if model else 1)
        self.view = view
        self.need = Need(count, share_bytes(pod.memory_bytes, count), selector)
        self._now = now
        self._uid = pod.uid
        self._free: dict[str, dict[int, int]] | None = None

    def _device_free(self) -> Mapping[str, Mapping[int, int]]:
        if self._free is None:  # only when a node with devices failed: a passing filter never pays for it
            self._free = self.view.device_free(self._now, exclude_uid=self._uid)
        return self._free

    def reason(self, verdict: NodeVerdict) -> str:
        node = self.view.node_index.get(verdict.node)
        if node is None or verdict.reason not in (REASON_INSUFFICIENT, REASON_DEVICES):
            return verdict.reason
        if all(d.kind == "unified" for d in node.devices) and self.need.devices == 1 and not self.need.selector:
            return verdict.reason
        devices = [d for d in node.devices if device_matches(self.need.selector, d)]
        if verdict.reason == REASON_DEVICES:
            matching = " matching its deviceSelector" if self.need.selector else ""
            return f"{verdict.reason} (needs {self.need.devices}{matching}, has {len(devices)})"
        free = self._device_free().get(node.name, {})
        said = [
            f"{d.label()} has {format_bytes(max(0, free.get(d.index, 0)))} free of {format_bytes(d.memory_bytes)}"
            for d in devices[:MAX_DEVICES_SAID]
        ]
        if len(devices) > MAX_DEVICES_SAID:
            said.append(f"{len(devices) - MAX_DEVICES_SAID} more")
        on = "1 device" if self.need.devices == 1 else f"each of {self.need.devices} devices"
        return f"{verdict.reason} ({format_bytes(self.need.share_bytes)} on {on}; {', '.join(said)})"


def _translate_node(obj: dict[str, Any], watched: Callable[[str], Node | None]) -> Node:
    """A Node of the request with the devices its ResourceSlices publish (slices win over labels and
    annotations), taken from the watch's translation of that node: made once per slice event, not per call
    (re-reading every node's slices made the Nodes form 5x slower at 1,000 8-GPU nodes). One with a
    malformed capacity is treated as unbudgeted (and logged)."""
    name = str((obj.get("metadata") or {}).get("name"))
    try:
        node = node_from_object(obj)
        known = watched(node.name)
        if known is not None and known.capacity_source == "resourceslice":
            return replace(node, capacity_bytes=None, capacity_source=known.capacity_source, devices=known.devices)
        return node
    except ObjectError as exc:
        log.warning("node %s in the request has no usable budget: %s", name, exc)
        return Node(name, {}, None, "none")


def _request_from_reservation(held: Reservation, namespace: str, name: str) -> PodRequest:
    """The pod as its reservation remembers it (the watch has not shown the pod yet)."""
    return PodRequest(namespace, name, held.uid, held.model, held.memory_bytes)
