"""The extender wire protocol (`k8s.io/kube-scheduler/extender/v1`): parse requests, build replies.

The Go types carry no json tags, so keys are PascalCase on the wire (`Pod`, `Nodes`, `NodeNames`,
`FailedNodes`, `Error`, `Host`, `Score`, `PodName`...). Go decodes keys case-insensitively; we accept
any case on input and always emit PascalCase. The embedded Pod and Node objects are ordinary
lowercase Kubernetes JSON. Parsing checks only the envelope; any :class:`WireError` becomes a 400
with `{"Error": "..."}`, the shape the scheduler's verbs use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict


class WireError(ValueError):
    """The request is not a well-formed extender request; the message says what is wrong."""


class NodeListDict(TypedDict):
    apiVersion: str
    kind: str
    metadata: dict[str, Any]
    items: list[dict[str, Any]]


class ExtenderFilterResult(TypedDict):
    Nodes: NodeListDict | None
    NodeNames: list[str] | None
    FailedNodes: dict[str, str]
    FailedAndUnresolvableNodes: dict[str, str]
    Error: str


class HostPriority(TypedDict):
    Host: str
    Score: int


class ExtenderBindingResult(TypedDict):
    Error: str


@dataclass(frozen=True)
class ExtenderArgs:
    """A filter or prioritize request: the pod and either full Nodes or NodeNames."""

    pod: dict[str, Any]
    nodes: list[dict[str, Any]] | None  # the Nodes form: full Node objects, as sent
    node_names: list[str]  # always filled: from NodeNames, or the names of the Nodes

    @property
    def form(self) -> str:
        """ "nodes" or "nodenames": which form the scheduler used (answer in the same form)."""
        return "nodes" if self.nodes is not None else "nodenames"

    @property
    def pod_ref(self) -> str:
        meta = self.pod.get("metadata") or {}
        return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


@dataclass(frozen=True)
class BindingArgs:
    """A bind request: bind pod `namespace/name` (with `uid`) to `node`."""

    pod_name: str
    pod_namespace: str
    pod_uid: str
    node: str


def _keys(body: object, what: str) -> dict[str, Any]:
    """The top-level object with lower-cased keys (Go's decoder matches keys case-insensitively)."""
    if not isinstance(body, Mapping):
        raise WireError(f"{what} must be a JSON object, got {_type(body)}")
    return {str(k).lower(): v for k, v in body.items()}


def _type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _object_name(obj: object, where: str) -> str:
    if not isinstance(obj, Mapping):
        raise WireError(f"{where} must be an object, got {_type(obj)}")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise WireError(f"{where}.metadata must be an object, got {_type(meta)}")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise WireError(f"{where}.metadata.name must be a non-empty string, got {_type(name)}")
    return name


def parse_extender_args(body: object) -> ExtenderArgs:
    """Validate ExtenderArgs: `Pod` an object with a name; exactly one of `Nodes` / `NodeNames`."""
    args = _keys(body, "ExtenderArgs")
    if "pod" not in args or args["pod"] is None:
        raise WireError("ExtenderArgs.Pod is required (the pod being scheduled)")
    pod = args["pod"]
    _object_name(pod, "Pod")
    meta = pod["metadata"]
    for field in ("namespace", "uid"):
        if meta.get(field) is not None and not isinstance(meta.get(field), str):
            raise WireError(f"Pod.metadata.{field} must be a string, got {_type(meta.get(field))}")
    raw_nodes, raw_names = args.get("nodes"), args.get("nodenames")
    if raw_nodes is not None and raw_names is not None:
        raise WireError("ExtenderArgs has both Nodes and NodeNames; send one (NodeNames when nodeCacheCapable)")
    if raw_nodes is None and raw_names is None:
        raise WireError("ExtenderArgs needs Nodes (a NodeList) or NodeNames (a list of node names)")
    if raw_names is not None:
        if not isinstance(raw_names, list):
            raise WireError(f"ExtenderArgs.NodeNames must be an array of strings, got {_type(raw_names)}")
        if not all(type(name) is str and name for name in raw_names):  # fast path; find the culprit below
            for i, name in enumerate(raw_names):
                if not isinstance(name, str) or not name:
                    raise WireError(f"ExtenderArgs.NodeNames[{i}] must be a non-empty string, got {_type(name)}")
        return ExtenderArgs(pod=dict(pod), nodes=None, node_names=list(raw_names))
    if not isinstance(raw_nodes, Mapping):
        raise WireError(f"ExtenderArgs.Nodes must be a NodeList object, got {_type(raw_nodes)}")
    items = raw_nodes.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise WireError(f"ExtenderArgs.Nodes.items must be an array of Node objects, got {_type(items)}")
    names = [_object_name(item, f"Nodes.items[{i}]") for i, item in enumerate(items)]
    return ExtenderArgs(pod=dict(pod), nodes=items, node_names=names)


def parse_binding_args(body: object) -> BindingArgs:
    """Validate ExtenderBindingArgs: PodName, PodNamespace and Node non-empty strings; PodUID a string."""
    args = _keys(body, "ExtenderBindingArgs")
    values: dict[str, str] = {}
    for key, wire in (("podname", "PodName"), ("podnamespace", "PodNamespace"), ("node", "Node")):
        value = args.get(key)
        if not isinstance(value, str) or not value:
            raise WireError(f"ExtenderBindingArgs.{wire} must be a non-empty string, got {_type(value)}")
        values[key] = value
    uid = args.get("poduid", "")
    if uid is None:
        uid = ""
    if not isinstance(uid, str):
        raise WireError(f"ExtenderBindingArgs.PodUID must be a string, got {_type(uid)}")
    return BindingArgs(values["podname"], values["podnamespace"], uid, values["node"])


def filter_result(
    args: ExtenderArgs,
    passed: list[str],
    failed: Mapping[str, str],
    unresolvable: Mapping[str, str],
    error: str = "",
) -> ExtenderFilterResult:
    """The reply in the request's form: a NodeList of the passing Node objects as sent, or NodeNames."""
    nodes: NodeListDict | None = None
    names: list[str] | None = None
    if args.nodes is not None:
        keep = set(passed)
        items = [item for item, name in zip(args.nodes, args.node_names, strict=True) if name in keep]
        nodes = {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": items}
    else:
        names = list(passed)
    return {
        "Nodes": nodes,
        "NodeNames": names,
        "FailedNodes": dict(failed),
        "FailedAndUnresolvableNodes": dict(unresolvable),
        "Error": error,
    }


def host_priorities(scores: Mapping[str, int]) -> list[HostPriority]:
    return [{"Host": host, "Score": score} for host, score in scores.items()]
