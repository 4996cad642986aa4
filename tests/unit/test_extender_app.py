"""The extender's HTTP API driven with the real ExtenderArgs kube-scheduler 1.36 sent (both forms).

The captured pods are ordinary pods and the captured nodes have no budget, so each test works on a
copy: nodes get a capacity annotation (their `gpu-mem` label in Gi: node-a 24Gi, node-b 48Gi,
node-c 80Gi) and pods become model replicas with the model label and memory annotation.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from budget import PodRequest
from budget.decide import REASON_INSUFFICIENT, REASON_NO_BUDGET, REASON_UNKNOWN_NODE
from budget.objects import ANNOTATION_CAPACITY, ANNOTATION_MEMORY, LABEL_MODEL
from extender import CacheSource, ReservationBook, Settings, create_app
from extender.source import BindingError
from kubeview.cache import ClusterCache

pytestmark = pytest.mark.unit

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures" / "captured"
GI = 2**30
CAPACITY_GI = {"node-a": 24, "node-b": 48, "node-c": 80}


def captured(name: str) -> dict[str, Any]:
    return json.loads((CAPTURED / f"extender-{name}.json").read_text())


def budgeted(node: dict[str, Any], capacity: str | None = None) -> dict[str, Any]:
    """A copy of a captured Node with a capacity annotation (its gpu-mem label in Gi by default)."""
    node = copy.deepcopy(node)
    node["kind"] = "Node"
    capacity = capacity or f"{node['metadata']['labels']['gpu-mem']}Gi"
    node["metadata"].setdefault("annotations", {})[ANNOTATION_CAPACITY] = capacity
    return node


def cluster_nodes() -> list[dict[str, Any]]:
    return [budgeted(n) for n in captured("filter-nodes")["Nodes"]["items"]]


def as_model_pod(args: dict[str, Any], memory: str = "40Gi", uid: str | None = None, model: str = "llama"):
    """The request with its Pod turned into a model replica (a copy; the fixture stays pristine)."""
    args = copy.deepcopy(args)
    meta = args["Pod"]["metadata"]
    meta.setdefault("labels", {})[LABEL_MODEL] = model
    meta.setdefault("annotations", {})[ANNOTATION_MEMORY] = memory
    if uid is not None:
        meta["uid"] = uid
    return args


def with_budgeted_nodes(args: dict[str, Any]) -> dict[str, Any]:
    """A Nodes-form request whose Node objects carry capacity annotations."""
    args = copy.deepcopy(args)
    args["Nodes"]["items"] = [budgeted(n) for n in args["Nodes"]["items"]]
    return args


def bound_pod(name: str, node: str, memory: str, uid: str | None = None, model: str = "other") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": uid or f"uid-{name}",
            "resourceVersion": "1",
            "labels": {LABEL_MODEL: model},
            "annotations": {ANNOTATION_MEMORY: memory},
        },
        "spec": {"nodeName": node},
        "status": {"phase": "Running"},
    }


class FakeWriter:
    """Records Bindings instead of posting them; can be told to fail, and to run `during_bind` while the POST
    is in flight (what the scheduler does meanwhile)."""

    def __init__(self, fail: str = "", pods: dict[tuple[str, str], dict[str, Any]] | None = None) -> None:
        self.fail = fail
        self.pods = pods or {}
        self.during_bind: Callable[[], None] | None = None
        self.bindings: list[tuple[str, str, str, str]] = []
        self.annotations: dict[str, dict[str, str]] = {}  # pod name -> the annotations its Binding carried
        self.timeouts: list[float] = []  # each posted Binding's timeout

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pods.get((namespace, name))

    def bind(
        self,
        namespace: str,
        name: str,
        uid: str,
        node: str,
        timeout_seconds: float,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        if self.during_bind is not None:
            self.during_bind()
        if self.fail:
            raise BindingError(self.fail)
        self.bindings.append((namespace, name, uid, node))
        self.annotations[name] = dict(annotations or {})
        self.timeouts.append(timeout_seconds)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Env:
    """An app over a snapshot-fed cache, with a fake writer and a controllable clock."""

    def __init__(self, objects: list[dict[str, Any]] | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.source = CacheSource.from_objects(cluster_nodes() + list(objects or []))
        self.writer = FakeWriter()
        self.source.writer = self.writer
        self.clock = Clock()
        self.book = ReservationBook(self.settings.reservation_ttl_seconds, clock=self.clock)
        self.app = create_app(self.settings, self.source, book=self.book)
        self.client = self.app.test_client()

    def filter(self, args: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/filter", json=args)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def reserved_per_node(self) -> dict[str, int]:
        return self.book.reserved_bytes(self.clock())


@pytest.fixture
def env() -> Env:
    return Env()


def answered(body: dict[str, Any]) -> list[str]:
    if body["Nodes"] is not None:
        return [n["metadata"]["name"] for n in body["Nodes"]["items"]]
    return body["NodeNames"]


# ----- filter: both forms -----


@pytest.mark.parametrize("form", ["nodenames", "nodes"])
def test_a_pod_that_is_no_model_replica_passes_every_node(env: Env, form: str) -> None:
    args = captured(f"filter-{form}")
    body = env.filter(args)
    assert sorted(answered(body)) == ["node-a", "node-b", "node-c"]
    assert body["FailedNodes"] == {} and body["FailedAndUnresolvableNodes"] == {} and body["Error"] == ""
    assert len(env.book) == 0, "no memory is reserved for pods outside the budget"


def test_nodes_form_answers_a_nodelist_of_the_objects_sent_and_no_nodenames(env: Env) -> None:
    args = with_budgeted_nodes(as_model_pod(captured("filter-nodes"), "60Gi"))
    body = env.filter(args)
    assert body["NodeNames"] is None
    assert body["Nodes"]["kind"] == "NodeList"
    sent = {n["metadata"]["name"]: n for n in args["Nodes"]["items"]}
    assert body["Nodes"]["items"] == [sent["node-c"]], "the passing Node object comes back as it was sent"


def test_nodenames_form_answers_nodenames_and_no_nodelist(env: Env) -> None:
    body = env.filter(as_model_pod(captured("filter-nodenames"), "60Gi"))
    assert body["Nodes"] is None
    assert body["NodeNames"] == ["node-c"]


FIT_TABLE = [
    # (memory, settings, bound pods, answered, failed, unresolvable)
    pytest.param("60Gi", Settings(), [], ["node-c"], set(), {"node-a", "node-b"}, id="only-the-80Gi-node-holds-60Gi"),
    pytest.param("100Gi", Settings(), [], [], set(), {"node-a", "node-b", "node-c"}, id="larger-than-every-node"),
    pytest.param("10Gi", Settings(score_strategy="spread"), [], ["node-c"], set(), set(), id="spread-takes-emptiest"),
    pytest.param("10Gi", Settings(score_strategy="binpack"), [], ["node-a"], set(), set(), id="binpack-takes-fullest"),
    pytest.param(
        "40Gi",
        Settings(),
        [bound_pod("big", "node-c", "50Gi")],
        ["node-b"],
        {"node-c"},
        {"node-a"},
        id="bound-pod-leaves-30Gi-on-node-c",
    ),
    pytest.param(
        "40Gi",
        Settings(),
        [bound_pod("b1", "node-b", "20Gi"), bound_pod("c1", "node-c", "50Gi")],
        [],
        {"node-b", "node-c"},
        {"node-a"},
        id="full-cluster-fits-nowhere",
    ),
]


@pytest.mark.parametrize("form", ["nodenames", "nodes"])
@pytest.mark.parametrize(("memory", "settings", "pods", "want", "failed", "unresolvable"), FIT_TABLE)
def test_model_pods_land_only_where_the_budget_allows(form, memory, settings, pods, want, failed, unresolvable):
    env = Env(pods, settings)
    args = as_model_pod(captured(f"filter-{form}"), memory)
    if form == "nodes":
        args = with_budgeted_nodes(args)
    body = env.filter(args)
    assert answered(body) == want
    assert set(body["FailedNodes"]) == failed
    assert set(body["FailedAndUnresolvableNodes"]) == unresolvable
    assert set(body["FailedNodes"].values()) | set(body["FailedAndUnresolvableNodes"].values()) <= {REASON_INSUFFICIENT}


def test_reasons_are_stable_and_number_free_so_the_scheduler_can_group_them() -> None:
    env = Env([bound_pod("c1", "node-c", "70Gi")])
    args = as_model_pod(captured("filter-nodenames"), "40Gi")
    args["NodeNames"] = ["node-a", "node-b", "node-c", "node-gone"]
    env.source.cache.apply("Node", "ADDED", {"kind": "Node", "metadata": {"name": "node-plain"}})
    args["NodeNames"].append("node-plain")
    env.book.reserve(  # another pod holds node-b
        PodRequest("default", "x", "uid-x", "default/llama", 40 * GI), "node-b"
    )
    body = env.filter(args)
    reasons = {**body["FailedNodes"], **body["FailedAndUnresolvableNodes"]}
    assert reasons == {
        "node-a": REASON_INSUFFICIENT,
        "node-b": REASON_INSUFFICIENT,
        "node-c": REASON_INSUFFICIENT,
        "node-gone": REASON_UNKNOWN_NODE,
        "node-plain": REASON_NO_BUDGET,
    }
    assert all(not re.search(r"\d", r) for r in reasons.values()), reasons
    # The scheduler's event then reads "0/5 nodes are available: 3 insufficient inference memory budget, ..."
    assert list(reasons.values()).count("insufficient inference memory budget") == 3


def test_nodes_form_takes_capacity_from_the_request_not_the_cache() -> None:
    env = Env()
    for name in ("node-a", "node-b", "node-c"):  # the cache believes every node is tiny
        node = budgeted(
            next(n for n in captured("filter-nodes")["Nodes"]["items"] if n["metadata"]["name"] == name), "1Gi"
        )
        env.source.cache.apply("Node", "MODIFIED", node)
    nodes_form = with_budgeted_nodes(as_model_pod(captured("filter-nodes"), "60Gi"))
    assert answered(env.filter(nodes_form)) == ["node-c"]
    names_form = as_model_pod(captured("filter-nodenames"), "60Gi", uid="other-uid")
    assert answered(env.filter(names_form)) == [], "the NodeNames form uses the cache's nodes"


def test_nodes_form_still_counts_placements_from_the_cache() -> None:
    env = Env([bound_pod("c1", "node-c", "50Gi")])
    body = env.filter(with_budgeted_nodes(as_model_pod(captured("filter-nodes"), "40Gi")))
    assert answered(body) == ["node-b"]
    assert body["FailedNodes"] == {"node-c": REASON_INSUFFICIENT}


def test_memory_falls_back_to_the_inferencemodel_when_the_pod_has_no_annotation() -> None:
    model = {
        "kind": "InferenceModel",
        "metadata": {"name": "llama", "namespace": "default"},
        "spec": {"memory": "60Gi", "modelName": "llama"},
    }
    env = Env([model])
    args = as_model_pod(captured("filter-nodenames"))
    del args["Pod"]["metadata"]["annotations"][ANNOTATION_MEMORY]
    assert answered(env.filter(args)) == ["node-c"]


def test_a_pod_with_an_unparsable_memory_annotation_gets_a_clear_error_not_a_crash(env: Env) -> None:
    body = env.filter(as_model_pod(captured("filter-nodenames"), "lots"))
    assert body["NodeNames"] == []
    assert ANNOTATION_MEMORY in body["Error"] and "lots" in body["Error"]


# ----- reservations through the API -----


def test_pods_filtered_back_to_back_never_get_promised_the_same_memory(env: Env) -> None:
    answers = []
    for i in range(5):
        body = env.filter(as_model_pod(captured("filter-nodenames"), "40Gi", uid=f"pod-{i}"))
        answers.append(answered(body))
    # 40Gi fits once on node-b (48Gi), twice on node-c (80Gi), never on node-a (24Gi).
    assert sorted(n for a in answers for n in a) == ["node-b", "node-c", "node-c"]
    assert all(len(a) <= 1 for a in answers), "a model pod is told about the one node that holds its memory"
    assert answers[3:] == [[], []]
    for node, reserved in env.reserved_per_node().items():
        assert reserved <= CAPACITY_GI[node] * GI


def test_filtering_the_same_pod_again_replaces_its_reservation(env: Env) -> None:
    args = as_model_pod(captured("filter-nodenames"), "40Gi", uid="same")
    for _ in range(3):
        assert answered(env.filter(args)) == ["node-c"]
    assert len(env.book) == 1 and env.reserved_per_node() == {"node-c": 40 * GI}


def test_a_pod_that_no_longer_fits_when_filtered_again_gives_its_reservation_up(env: Env) -> None:
    env.filter(as_model_pod(captured("filter-nodenames"), "40Gi", uid="p"))
    args = as_model_pod(captured("filter-nodenames"), "40Gi", uid="p")
    args["NodeNames"] = ["node-a"]  # the scheduler's own filters left only the small node
    assert answered(env.filter(args)) == []
    assert len(env.book) == 0


def test_the_watch_turns_a_reservation_into_a_placement(env: Env) -> None:
    args = as_model_pod(captured("filter-nodenames"), "60Gi", uid="first")
    assert answered(env.filter(args)) == ["node-c"]
    pod = copy.deepcopy(args["Pod"])
    pod["spec"]["nodeName"] = "node-c"
    env.source.cache.apply("Pod", "MODIFIED", pod)  # the watch shows it bound
    assert len(env.book) == 0, "the placement now holds the memory"
    second = as_model_pod(captured("filter-nodenames"), "60Gi", uid="second")
    assert answered(env.filter(second)) == [], "the bound pod still holds node-c's memory"
    env.source.cache.apply("Pod", "DELETED", pod)
    assert answered(env.filter(second)) == ["node-c"], "a deleted pod frees its memory at once"


def test_deleting_a_pod_drops_its_reservation(env: Env) -> None:
    args = as_model_pod(captured("filter-nodenames"), "60Gi", uid="gone")
    env.filter(args)
    env.source.cache.apply("Pod", "DELETED", copy.deepcopy(args["Pod"]))
    assert len(env.book) == 0
    assert answered(env.filter(as_model_pod(captured("filter-nodenames"), "60Gi", uid="next"))) == ["node-c"]


def test_a_reservation_ends_with_its_ttl(env: Env) -> None:
    env.filter(as_model_pod(captured("filter-nodenames"), "60Gi", uid="never-bound"))
    other = as_model_pod(captured("filter-nodenames"), "60Gi", uid="waiting")
    assert answered(env.filter(other)) == []
    env.clock.now += env.settings.reservation_ttl_seconds - 1
    assert answered(env.filter(other)) == []
    env.book.release("waiting")
    env.clock.now += 2
    assert answered(env.filter(other)) == ["node-c"], "the unbound pod's promise expired"


def test_without_reservations_every_passing_node_is_answered() -> None:
    env = Env(settings=Settings(reservations=False))
    body = env.filter(as_model_pod(captured("filter-nodenames"), "40Gi"))
    assert body["NodeNames"] == ["node-b", "node-c"]
    assert len(env.book) == 0


# ----- prioritize -----


@pytest.mark.parametrize("form", ["nodenames", "nodes"])
def test_prioritize_scores_zero_to_ten_by_the_budget(env: Env, form: str) -> None:
    args = as_model_pod(captured(f"prioritize-{form}"), "20Gi")
    if form == "nodes":
        args = with_budgeted_nodes(args)
    response = env.client.post("/prioritize", json=args)
    assert response.status_code == 200
    body = response.get_json()
    assert [h["Host"] for h in body] == ["node-b", "node-c"]
    scores = {h["Host"]: h["Score"] for h in body}
    assert all(isinstance(s, int) and 0 <= s <= 10 for s in scores.values())
    assert scores["node-c"] > scores["node-b"], "spread prefers the node left emptiest (60/80 vs 28/48 free)"


def test_prioritize_gives_the_reserved_node_the_top_score(env: Env) -> None:
    env.filter(as_model_pod(captured("filter-nodenames"), "20Gi", uid="r", model="llama"))
    env.book.reserve(PodRequest("default", "nc-pod-1", "r", "default/llama", 20 * GI), "node-b")
    body = env.client.post("/prioritize", json=as_model_pod(captured("prioritize-nodenames"), "20Gi", uid="r"))
    assert {h["Host"]: h["Score"] for h in body.get_json()}["node-b"] == 10


def test_prioritize_is_neutral_for_pods_outside_the_budget(env: Env) -> None:
    body = env.client.post("/prioritize", json=captured("prioritize-nodenames")).get_json()
    assert body == [{"Host": "node-b", "Score": 0}, {"Host": "node-c", "Score": 0}]


# ----- bind -----


def test_bind_posts_the_binding_and_answers_an_empty_error(env: Env) -> None:
    response = env.client.post("/bind", json=captured("bind"))
    assert response.status_code == 200
    assert response.get_json() == {"Error": ""}
    assert env.writer.bindings == [("default", "bind-pod-1", "6df6a11d-4ed5-4ac8-ab2b-f3b47a15f52b", "node-c")]


def test_bind_of_a_model_pod_keeps_its_reservation_until_the_watch_confirms(env: Env) -> None:
    args = as_model_pod(captured("filter-nodenames"), "60Gi", uid="m1")
    env.filter(args)
    pod = copy.deepcopy(args["Pod"])
    env.source.cache.apply("Pod", "ADDED", pod)  # the watch has seen the pending pod
    bind = {"PodName": "nc-pod-1", "PodNamespace": "default", "PodUID": "m1", "Node": "node-c"}
    assert env.client.post("/bind", json=bind).get_json() == {"Error": ""}
    assert env.reserved_per_node() == {"node-c": 60 * GI}
    pod["spec"]["nodeName"] = "node-c"
    env.source.cache.apply("Pod", "MODIFIED", pod)
    assert len(env.book) == 0


def test_bind_refuses_a_node_that_cannot_hold_the_pod_and_posts_nothing(env: Env) -> None:
    env.filter(as_model_pod(captured("filter-nodenames"), "60Gi", uid="first"))  # holds node-c
    second = as_model_pod(captured("filter-nodenames"), "30Gi", uid="second")
    second["Pod"]["metadata"]["name"] = "second"
    env.source.cache.apply("Pod", "ADDED", copy.deepcopy(second["Pod"]))
    bind = {"PodName": "second", "PodNamespace": "default", "PodUID": "second", "Node": "node-c"}
    body = env.client.post("/bind", json=bind).get_json()
    assert body["Error"] == f"pod default/second cannot be bound to node-c: {REASON_INSUFFICIENT}"
    assert env.writer.bindings == []


def test_a_failed_binding_releases_the_reservation_and_reports_the_error(env: Env) -> None:
    env.writer.fail = "binding default/nc-pod-1 to node-c failed: 409 pod already assigned"
    args = as_model_pod(captured("filter-nodenames"), "60Gi", uid="m1")
    env.filter(args)
    env.source.cache.apply("Pod", "ADDED", copy.deepcopy(args["Pod"]))
    bind = {"PodName": "nc-pod-1", "PodNamespace": "default", "PodUID": "m1", "Node": "node-c"}
    assert env.client.post("/bind", json=bind).get_json() == {"Error": env.writer.fail}
    assert len(env.book) == 0, "the scheduler will retry: the memory is free meanwhile"


def test_bind_is_refused_clearly_when_binding_is_disabled() -> None:
    env = Env(settings=Settings(bind_pods=False))
    body = env.client.post("/bind", json=captured("bind")).get_json()
    assert "--no-bind" in body["Error"]
    assert env.writer.bindings == []


# ----- bad input: 4xx with a clear JSON message, never a 500 -----

GOOD = captured("filter-nodenames")
BAD_REQUESTS = [
    pytest.param("/filter", b"{", "application/json", 400, "not valid JSON", id="malformed-json"),
    pytest.param("/filter", b"", "application/json", 400, "empty", id="empty-body"),
    pytest.param("/filter", b"[1, 2]", "application/json", 400, "must be a JSON object", id="array-not-object"),
    pytest.param("/filter", b"\xff\xfe{}", "application/json", 400, "not UTF-8", id="not-utf8"),
    pytest.param(
        "/filter",
        json.dumps({"NodeNames": ["node-a"]}).encode(),
        "application/json",
        400,
        "Pod is required",
        id="missing-pod",
    ),
    pytest.param(
        "/filter",
        json.dumps({"Pod": "nc-pod-1", "NodeNames": []}).encode(),
        "application/json",
        400,
        "Pod must be an object",
        id="pod-is-a-string",
    ),
    pytest.param(
        "/filter",
        json.dumps({"Pod": {"metadata": {}}, "NodeNames": []}).encode(),
        "application/json",
        400,
        "Pod.metadata.name",
        id="pod-without-name",
    ),
    pytest.param(
        "/filter",
        json.dumps({**GOOD, "NodeNames": {"node-a": 1}}).encode(),
        "application/json",
        400,
        "NodeNames must be an array",
        id="nodenames-is-an-object",
    ),
    pytest.param(
        "/filter",
        json.dumps({**GOOD, "NodeNames": ["node-a", 7]}).encode(),
        "application/json",
        400,
        "NodeNames[1] must be a non-empty string",
        id="nodename-is-a-number",
    ),
    pytest.param(
        "/filter", json.dumps({"Pod": GOOD["Pod"]}).encode(), "application/json", 400, "needs Nodes", id="neither-form"
    ),
    pytest.param(
        "/filter",
        json.dumps({**GOOD, "Nodes": {"items": []}}).encode(),
        "application/json",
        400,
        "both Nodes and NodeNames",
        id="both-forms",
    ),
    pytest.param(
        "/filter",
        json.dumps({"Pod": GOOD["Pod"], "Nodes": {"items": "node-a"}}).encode(),
        "application/json",
        400,
        "Nodes.items must be an array",
        id="items-not-a-list",
    ),
    pytest.param(
        "/filter",
        json.dumps({"Pod": GOOD["Pod"], "Nodes": {"items": [{"metadata": {}}]}}).encode(),
        "application/json",
        400,
        "Nodes.items[0].metadata.name",
        id="node-without-name",
    ),
    pytest.param(
        "/filter",
        json.dumps(GOOD).encode(),
        "text/plain",
        415,
        "Content-Type must be application/json",
        id="not-json-content-type",
    ),
    pytest.param(
        "/filter", json.dumps(GOOD).encode(), None, 415, "Content-Type must be application/json", id="no-content-type"
    ),
    pytest.param("/prioritize", b"nope", "application/json", 400, "not valid JSON", id="prioritize-malformed"),
    pytest.param(
        "/prioritize",
        json.dumps({"NodeNames": []}).encode(),
        "application/json",
        400,
        "Pod is required",
        id="prioritize-missing-pod",
    ),
    pytest.param(
        "/bind",
        json.dumps({"PodName": "p", "PodNamespace": "default"}).encode(),
        "application/json",
        400,
        "Node must be a non-empty string",
        id="bind-missing-node",
    ),
    pytest.param(
        "/bind",
        json.dumps({"PodName": 5, "PodNamespace": "d", "Node": "n"}).encode(),
        "application/json",
        400,
        "PodName must be a non-empty string",
        id="bind-name-is-a-number",
    ),
    pytest.param(
        "/bind",
        json.dumps({"PodName": "p", "PodNamespace": "d", "Node": "n", "PodUID": []}).encode(),
        "application/json",
        400,
        "PodUID must be a string",
        id="bind-uid-is-a-list",
    ),
    pytest.param("/bind", b"{}}", "application/json", 400, "not valid JSON", id="bind-malformed"),
]


@pytest.mark.parametrize(("path", "data", "content_type", "status", "phrase"), BAD_REQUESTS)
def test_bad_requests_get_a_clear_json_error(env: Env, path, data, content_type, status, phrase) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = env.client.post(path, data=data, headers=headers)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert phrase in response.get_json()["Error"]
    assert env.writer.bindings == []


@pytest.mark.parametrize("path", ["/filter", "/prioritize", "/bind"])
def test_a_huge_body_is_refused_before_it_is_read(path: str) -> None:
    env = Env(settings=Settings(max_request_bytes=4096))
    body = json.dumps({**GOOD, "NodeNames": [f"node-{i}" for i in range(2000)]})
    response = env.client.post(path, data=body, content_type="application/json")
    assert response.status_code == 413
    assert "limit of 4096 bytes" in response.get_json()["Error"] or "4096" in response.get_json()["Error"]


def test_a_huge_chunked_body_without_content_length_is_refused_too() -> None:
    env = Env(settings=Settings(max_request_bytes=4096))

    body = json.dumps({**GOOD, "NodeNames": [f"node-{i}" for i in range(2000)]}).encode()
    response = env.client.post(
        "/filter",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # what gunicorn sets for a chunked body
    )
    assert response.status_code == 413
    assert "4096" in response.get_json()["Error"]


def test_unknown_node_names_are_answered_per_node_not_refused(env: Env) -> None:
    args = as_model_pod(captured("filter-nodenames"), "20Gi")
    args["NodeNames"] = ["node-x", "node-c"]
    body = env.filter(args)
    assert body["NodeNames"] == ["node-c"]
    assert body["FailedAndUnresolvableNodes"] == {"node-x": REASON_UNKNOWN_NODE}
    plain = copy.deepcopy(captured("filter-nodenames"))
    plain["NodeNames"] = ["node-x"]
    assert env.filter(plain)["NodeNames"] == ["node-x"], "a pod outside the budget passes unknown nodes too"


def test_wrong_method_and_unknown_path_answer_json(env: Env) -> None:
    assert env.client.get("/filter").status_code == 405
    assert "Error" in env.client.get("/filter").get_json()
    response = env.client.post("/preempt", json={})
    assert response.status_code == 404 and "Error" in response.get_json()


# ----- probes and metrics -----


class UnsyncedCache(ClusterCache):
    is_synced = False

    @property
    def synced(self) -> bool:
        return self.is_synced


def test_ready_only_once_the_view_is_synced_and_filter_waits_for_it() -> None:
    cache = UnsyncedCache(None)  # type: ignore[arg-type]
    app = create_app(Settings(), CacheSource(cache))
    client = app.test_client()
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 503
    body = client.post("/filter", json=as_model_pod(captured("filter-nodenames"))).get_json()
    assert body["NodeNames"] == [] and "syncing" in body["Error"], "no decision on a partial view"
    cache.is_synced = True
    assert client.get("/readyz").status_code == 200


def test_metrics_show_filter_latency_decisions_and_reservations(env: Env) -> None:
    env.filter(as_model_pod(captured("filter-nodenames"), "60Gi", uid="a"))
    env.filter(as_model_pod(captured("filter-nodenames"), "60Gi", uid="b"))
    env.filter(with_budgeted_nodes(as_model_pod(captured("filter-nodes"), "10Gi", uid="c")))
    env.client.post("/filter", data=b"{", content_type="application/json")
    text = env.client.get("/metrics").get_data(as_text=True)
    assert 'ibc_extender_filter_duration_seconds_count{form="nodenames"} 2.0' in text
    assert 'ibc_extender_filter_duration_seconds_count{form="nodes"} 1.0' in text
    assert 'ibc_extender_decisions_total{reason="",result="reserved",verb="filter"} 2.0' in text
    assert (
        'ibc_extender_decisions_total{reason="insufficient inference memory budget",result="unschedulable",'
        'verb="filter"} 1.0'
    ) in text
    assert "ibc_extender_reservations 2.0" in text
    assert 'ibc_extender_bad_requests_total{verb="filter"} 1.0' in text


def test_debug_view_shows_what_each_node_holds(env: Env) -> None:
    env.source.cache.apply("Pod", "ADDED", bound_pod("c1", "node-c", "50Gi"))
    env.filter(as_model_pod(captured("filter-nodenames"), "20Gi", uid="r"))
    nodes = env.client.get("/debug/view").get_json()["nodes"]
    assert nodes["node-c"] == {
        "capacityBytes": 80 * GI,
        "capacitySource": "annotation",
        "boundBytes": 50 * GI,
        "reservedBytes": 0,
        "freeBytes": 30 * GI,
        "devices": [
            {"index": 0, "kind": "unified", "profile": "", "product": "", "capacityBytes": 80 * GI,
             "freeBytes": 30 * GI},
        ],
    }
    assert nodes["node-b"]["reservedBytes"] == 20 * GI and nodes["node-b"]["freeBytes"] == 28 * GI
    assert nodes["node-b"]["devices"][0]["freeBytes"] == 28 * GI, "a reservation holds its device's memory"


def test_bind_still_guards_the_node_when_filter_does_not_reserve() -> None:
    env = Env(settings=Settings(reservations=False))
    for name in ("first", "second"):
        args = as_model_pod(captured("filter-nodenames"), "60Gi", uid=name)
        args["Pod"]["metadata"]["name"] = name
        assert answered(env.filter(args)) == ["node-c"], "without reservations both are told node-c fits"
        env.source.cache.apply("Pod", "ADDED", copy.deepcopy(args["Pod"]))
    ok = env.client.post(
        "/bind", json={"PodName": "first", "PodNamespace": "default", "PodUID": "first", "Node": "node-c"}
    ).get_json()
    refused = env.client.post(
        "/bind", json={"PodName": "second", "PodNamespace": "default", "PodUID": "second", "Node": "node-c"}
    ).get_json()
    assert ok == {"Error": ""}
    assert REASON_INSUFFICIENT in refused["Error"]
    assert [b[1] for b in env.writer.bindings] == ["first"]


def test_keys_are_read_case_insensitively_like_gos_decoder_and_written_pascalcase(env: Env) -> None:
    args = as_model_pod(captured("filter-nodenames"), "60Gi")
    lower = {"pod": args["Pod"], "nodenames": args["NodeNames"]}
    body = env.filter(lower)
    assert list(body) == ["Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"]
    assert body["NodeNames"] == ["node-c"]
