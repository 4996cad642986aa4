"""A list+watch cache that turns API objects into budget views, cheaply, for every service.

Each kind is listed, then watched from the list's resourceVersion with bookmarks; a 410 Gone or a
broken stream re-lists. Objects are kept as plain dicts (the API's own JSON), and translated once per
event, so building a view for a filter call costs only assembling tuples. Clients must be created
after a gunicorn fork (call from the app factory), never shared across processes.

A cache of Nodes also watches DRA ResourceSlices (`resource.k8s.io/v1`): a node's devices are its labels,
annotations and the slices that name it, translated together by `budget.objects`; a slice event
translates its node again. A cluster that does not serve the DRA API (404) has no slices: the kind counts
as synced and empty, nodes keep their labels and annotations, and the list is retried now and then (an
upgraded cluster is noticed without a restart). Any other failure (a 403 from missing RBAC) keeps the
cache unsynced, as for every kind: a budget that silently ignored devices would overcommit them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from budget import ClusterView, Model, Node, ObjectError, Placement
from budget.objects import (
    apply_resourceslices,
    fallback_memory,
    merge_models,
    model_from_deployment,
    model_from_inferencemodel,
    node_from_object,
    placement_from_pod,
)
from kubeview.api import RESOURCES, ApiError, raw_request

log = logging.getLogger(__name__)

Listener = Callable[[str, str, dict[str, Any]], None]

RESOURCE_SLICE = "ResourceSlice"
OPTIONAL_KINDS = frozenset({RESOURCE_SLICE})
"""Kinds of an API a cluster may not serve: a 404 means "none of them", not a failure."""
ABSENT_RECHECK_SECONDS = 300.0
"""How often an API that answered 404 is listed again: an upgrade is seen within this, at one cheap GET."""


def watched_kinds(kinds: tuple[str, ...], *, resource_slices: bool = True) -> tuple[str, ...]:
    """The kinds a cache asked for `kinds` lists and watches: with Nodes, the ResourceSlices of their devices."""
    if resource_slices and "Node" in kinds and RESOURCE_SLICE not in kinds:
        return (*kinds, RESOURCE_SLICE)
    return kinds


def slice_node(obj: dict[str, Any]) -> str:
    """The node a ResourceSlice describes (spec.nodeName), "" for network-attached devices (allNodes,
    nodeSelector): those are no node's budget."""
    spec = obj.get("spec")
    name = spec.get("nodeName") if isinstance(spec, dict) else None
    return name if isinstance(name, str) else ""


def obj_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class ClusterCache:
    """Raw objects and budget translations for the watched kinds, with a cached ClusterView."""

    def __init__(
        self,
        api: Any,
        *,
        kinds: tuple[str, ...] = ("Node", "Pod", "Deployment", "InferenceModel"),
        namespace: str | None = None,
        label_selectors: dict[str, str] | None = None,
        watch_timeout_seconds: int = 300,
        resource_slices: bool = True,
        absent_recheck_seconds: float = ABSENT_RECHECK_SECONDS,
    ) -> None:
        self.api = api
        kinds = watched_kinds(kinds, resource_slices=resource_slices)
        self.kinds = kinds
        self.absent_recheck_seconds = absent_recheck_seconds
        self.namespace = namespace
        self.label_selectors = label_selectors or {"Pod": "inference.eh-ops.io/model"}
        self.watch_timeout_seconds = watch_timeout_seconds
        self._lock = threading.RLock()
        self._objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in kinds}
        self._nodes: dict[str, Node] = {}
        # ResourceSlices by the node they describe: node name -> {slice key: raw slice}, and slice key -> node.
        self._node_slices: dict[str, dict[str, dict[str, Any]]] = {}
        self._slice_of: dict[str, str] = {}
        self._im_models: dict[str, Model] = {}
        self._dep_models: dict[str, Model] = {}
        # Pods are translated when a view is built, against the models of that moment (a pod without the
        # memory annotation takes its model's), so the view never depends on which kind listed first.
        # Memo: pod key -> (the raw pod, the fallback it was translated with, its placement).
        self._pod_memo: dict[str, tuple[dict[str, Any], int | None, Placement | None]] = {}
        self._view: ClusterView | None = None
        self._synced = {k: threading.Event() for k in kinds}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, Any] = {}  # kind -> the open watch response, closed by stop()
        self.lists = {k: 0 for k in kinds}  # successful lists per kind: 1 + one per 410 or broken watch
        self.failures = {k: 0 for k in kinds}  # failed lists/watches per kind (each followed by a backoff)
        self.watches = {k: 0 for k in kinds}  # watch requests answered per kind (a new one per server timeout)
        self.absent = dict.fromkeys(kinds, 0)  # 404s in a row for an optional kind: > 0 while its API is not served
        self._listeners: list[Listener] = []
        self.generation = 0  # bumps on every change; cheap "did anything change" check

    # ----- lifecycle -----
    def start(self) -> ClusterCache:
        for kind in self.kinds:
            t = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop at once: close the open watch responses (a watch would otherwise linger until its server
        timeout, minutes), wake any backoff, and wait up to `timeout` s for the threads; True if all ended."""
        self._stop.set()
        with self._lock:
            responses = list(self._responses.values())
        for resp in responses:
            _shut(resp)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def synced(self) -> bool:
        return all(e.is_set() for e in self._synced.values())

    def wait_synced(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        for event in self._synced.values():
            if not event.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def add_listener(self, listener: Listener) -> None:
        """Called as listener(kind, event_type, obj) after each applied event, outside the lock."""
        self._listeners.append(listener)

    # ----- reads -----
    def view(self) -> ClusterView:
        """The view of the objects held now: a function of the objects alone, never of their order."""
        with self._lock:
            if self._view is None:
                models = merge_models(
                    (self._im_models[k] for k in sorted(self._im_models)),
                    (self._dep_models[k] for k in sorted(self._dep_models)),
                )
                self._view = ClusterView(
                    nodes=tuple(sorted(self._nodes.values(), key=lambda n: n.name)),
                    models=models,
                    placements=self._placements(models),
                )
            return self._view

    def _placements(self, models: dict[str, Model]) -> tuple[Placement, ...]:
        """Each stored pod's placement, translated again only when the pod or its model's memory changed."""
        memo: dict[str, tuple[dict[str, Any], int | None, Placement | None]] = {}
        for key, pod in sorted(self._objects.get("Pod", {}).items()):
            placement: Placement | None = None
            try:
                fallback = fallback_memory(pod, models)
                known = self._pod_memo.get(key)
                if known is not None and known[0] is pod and known[1] == fallback:
                    placement = known[2]
                else:
                    placement = placement_from_pod(pod, fallback_memory=fallback)
            except ObjectError as exc:
                fallback = None
                if key not in self._pod_memo or self._pod_memo[key][0] is not pod:
                    log.warning("ignoring malformed Pod %s: %s", key, exc)
            memo[key] = (pod, fallback, placement)
        self._pod_memo = memo
        return tuple(p for _, _, p in memo.values() if p is not None)

    def slices_of(self, node: str) -> list[dict[str, Any]]:
        """The ResourceSlices held for `node` (spec.nodeName), in a fixed order."""
        with self._lock:
            held = self._node_slices.get(node, {})
            return [held[k] for k in sorted(held)]

    def objects(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.get(kind, {}).values())

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self._lock:
            key = f"{namespace}/{name}" if namespace else name
            return self._objects.get(kind, {}).get(key)

    # ----- applying events (also used by tests and by writers that know better than the watch) -----
    def apply(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        obj.setdefault("kind", kind)
        key = obj_key(obj)
        with self._lock:
            store = self._objects.setdefault(kind, {})
            if event_type == "DELETED":
                store.pop(key, None)
            else:
                old = store.get(key)
                if old is not None and _rv(old) > _rv(obj) > 0:
                    return  # stale (a writer applied a newer copy already)
                store[key] = obj
            self._translate(kind, key, None if event_type == "DELETED" else obj)
            self._view = None
            self.generation += 1
        for listener in self._listeners:
            try:
                listener(kind, event_type, obj)
            except Exception:  # a listener's bug must not kill the watch
                log.exception("listener failed for %s %s", kind, key)

    def _translate(self, kind: str, key: str, obj: dict[str, Any] | None) -> None:
        if kind == RESOURCE_SLICE:
            self._index_slice(key, obj)
            return
        try:
            if kind == "Node":
                self._put(self._nodes, key, self._node(obj) if obj else None)
            elif kind == "InferenceModel":
                self._put(self._im_models, key, model_from_inferencemodel(obj) if obj else None)
            elif kind == "Deployment":
                self._put(self._dep_models, key, model_from_deployment(obj) if obj else None)
            # Pods: translated when a view is built (see _placements).
        except ObjectError as exc:
            log.warning("ignoring malformed %s %s: %s", kind, key, exc)
            self._put({"Node": self._nodes, "InferenceModel": self._im_models,
                       "Deployment": self._dep_models}[kind], key, None)

    def _node(self, obj: dict[str, Any]) -> Node:
        """A node with its devices: labels, annotations and the ResourceSlices that name it."""
        node = node_from_object(obj)
        slices = self.slices_of(node.name)
        return apply_resourceslices([node], slices)[0] if slices else node

    def _index_slice(self, key: str, obj: dict[str, Any] | None) -> None:
        """File a slice under its node and translate the node(s) it left or joined again."""
        before = self._slice_of.pop(key, "")
        if before:
            self._node_slices.get(before, {}).pop(key, None)
            if not self._node_slices.get(before):
                self._node_slices.pop(before, None)
        after = slice_node(obj) if obj is not None else ""
        if obj is not None and after:
            self._slice_of[key] = after
            self._node_slices.setdefault(after, {})[key] = obj
        for name in {before, after} - {""}:
            node = self._objects.get("Node", {}).get(name)
            if node is not None:
                self._translate("Node", name, node)

    @staticmethod
    def _put(store: dict[str, Any], key: str, value: Any) -> None:
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value

    # ----- list + watch -----
    def _path(self, kind: str) -> str:
        return RESOURCES[kind].path(self.namespace)

    def _request(self, path: str, query: dict[str, Any], timeout: float | tuple[float, float]) -> Any:
        return raw_request(self.api, "GET", path, query=query, timeout=timeout)

    def _list(self, kind: str) -> str:
        query: dict[str, Any] = {}
        if kind in self.label_selectors:
            query["labelSelector"] = self.label_selectors[kind]
        resp = self._request(self._path(kind), query, 60)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        fresh = {}
        for item in items:
            item["kind"] = kind
            fresh[obj_key(item)] = item
        with self._lock:
            gone = [k for k in self._objects.get(kind, {}) if k not in fresh]
        for k in gone:
            self.apply(kind, "DELETED", self._objects[kind][k])
        for item in fresh.values():
            self.apply(kind, "ADDED", item)
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, kind: str, rv: str) -> Iterator[dict[str, Any]]:
        query: dict[str, Any] = {
            "watch": "true",
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": self.watch_timeout_seconds,
        }
        if kind in self.label_selectors:
            query["labelSelector"] = self.label_selectors[kind]
        resp = self._request(self._path(kind), query, (10, self.watch_timeout_seconds + 30))
        with self._lock:
            self._responses[kind] = resp
            self.watches[kind] += 1
        try:
            if self._stop.is_set():  # stop() ran before the response was registered
                return
            buffer = b""
            for chunk in resp.stream(65536, decode_content=False):
                if self._stop.is_set():
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            with self._lock:
                self._responses.pop(kind, None)
            if self._stop.is_set():
                _shut(resp)  # its connection is not reused
            else:
                resp.release_conn()

    def _run(self, kind: str) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                rv = self._list(kind)
                self.lists[kind] += 1
                self.absent[kind] = 0
                self._synced[kind].set()
                backoff = 0.2
                while not self._stop.is_set():
                    for event in self._watch(kind, rv):
                        etype = event.get("type")
                        obj = event.get("object") or {}
                        if etype == "ERROR":
                            code = obj.get("code")
                            raise _Gone() if code == 410 else RuntimeError(f"watch error: {obj}")
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = new_rv
                        if etype == "BOOKMARK":
                            continue
                        self.apply(kind, str(etype), obj)
            except _Gone:
                log.info("watch of %s expired (410); re-listing", kind)
            except ApiError as exc:
                if exc.status == 410:
                    log.info("watch of %s expired (410); re-listing", kind)
                    continue
                if exc.status == 404 and kind in OPTIONAL_KINDS:
                    self._absent(kind)
                    self._stop.wait(self.absent_recheck_seconds)
                    continue
                if self._stop.is_set():
                    return
                self.failures[kind] += 1
                log.warning("list/watch of %s failed: %s (retry in %.1fs)", kind, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:
                if self._stop.is_set():
                    return  # the response was closed by stop()
                self.failures[kind] += 1
                log.warning("list/watch of %s broke: %s (retry in %.1fs)", kind, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _absent(self, kind: str) -> None:
        """The server does not serve `kind`'s API: hold none of it, and count the kind as synced."""
        with self._lock:
            held = list(self._objects.get(kind, {}).values())
            first = not self.absent[kind]
            self.absent[kind] += 1
        for obj in held:
            self.apply(kind, "DELETED", obj)
        if first:
            log.info(
                "the API server does not serve %s (404): no %ss, node budgets come from labels and annotations; "
                "listing again every %.0fs",
                RESOURCES[kind].api_version,
                kind,
                self.absent_recheck_seconds,
            )
        self._synced[kind].set()


def _shut(resp: Any) -> None:
    """Close a streaming response from any thread, unblocking a read in progress (urllib3 >= 2.3)."""
    try:
        shutdown = getattr(resp, "shutdown", None)
        if shutdown is not None:
            shutdown()
        resp.close()
    except Exception as exc:  # closing must never raise into stop()
        log.debug("closing a watch response: %s", exc)


class _Gone(Exception):
    """The watch's resourceVersion is too old; list again."""


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
