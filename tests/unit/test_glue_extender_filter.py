"""The extender's service called directly (no HTTP): what filter and prioritize answer, for every path.

Each case is a small cluster (nodes with a capacity annotation, or GPUs from GPU Feature Discovery labels,
including the non-round 81559 MiB of an H100 80GB), one pod and the nodes the scheduler sends; the test
asserts the whole answer the scheduler gets (nodes, per-node reasons, error), the reservation behind it,
and the decision an operator reads in `ibc_extender_decisions_total` and the logs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytest

from budget import PodRequest, Reservation
from budget.decide import (
    REASON_DEVICES,
    REASON_INSUFFICIENT,
    REASON_NO_BUDGET,
    REASON_SELECTOR,
    REASON_UNKNOWN_NODE,
)
from budget.objects import (
    ANNOTATION_CAPACITY,
    ANNOTATION_DEVICES,
    ANNOTATION_MEMORY,
    GFD_COUNT,
    GFD_MEMORY,
    LABEL_MODEL,
)
from extender import CacheSource, ReservationBook, Settings
from extender.metrics import Metrics
from extender.service import NOT_SYNCED, BindAnswer, Extender, FilterAnswer
from extender.wire import ExtenderArgs, parse_extender_args
from kubeview.cache import ClusterCache
from tests.unit.test_extender_app import Clock, FakeWriter

pytestmark = pytest.mark.unit

GI = 2**30
H100_MIB = 81559  # what GPU Feature Discovery labels an H100 80GB with: not a round number of GiB
NOW = Clock().now
LOGGER = "extender.service"


# ----- a small world: objects in the cache, a recording writer, a fixed clock -----


def node(name: str, capacity: str | None = None, *, gpus: tuple[int, int] | None = None) -> dict[str, Any]:
    """A Node with a capacity annotation (one unified-memory device), or `gpus` = (count, MiB each) from GFD labels."""
    meta: dict[str, Any] = {"name": name, "labels": {}, "annotations": {}}
    if capacity is not None:
        meta["annotations"][ANNOTATION_CAPACITY] = capacity
    if gpus is not None:
        meta["labels"].update({GFD_COUNT: str(gpus[0]), GFD_MEMORY: str(gpus[1])})
    return {"kind": "Node", "metadata": meta}


def model(name: str, memory: str, *, devices: int = 1, selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"modelName": name, "memory": memory, "replicas": 1, "devices": devices}
    if selector:
        spec["deviceSelector"] = dict(selector)
    return {"kind": "InferenceModel", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def pod(
    name: str,
    memory: str | None = None,
    *,
    uid: str | None = None,
    model_name: str | None = "llama",
    namespace: str | None = "default",
    on: str | None = None,
    phase: str = "Pending",
) -> dict[str, Any]:
    """A pod: a model replica (model label; memory annotation unless None), bound when `on` names a node."""
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}" if uid is None else uid, "labels": {}, "annotations": {}}
    if namespace is not None:
        meta["namespace"] = namespace
    if model_name is not None:
        meta["labels"][LABEL_MODEL] = model_name
    if memory is not None:
        meta["annotations"][ANNOTATION_MEMORY] = memory
    return {"kind": "Pod", "metadata": meta, "spec": {"nodeName": on} if on else {}, "status": {"phase": phase}}


def running(name: str, memory: str, on: str, devices: str | None = None) -> dict[str, Any]:
    """Another model's replica, bound to `on` (on the GPUs `devices` names, "0,1")."""
    obj = pod(name, memory, on=on, phase="Running", model_name="other")
    if devices is not None:
        obj["metadata"]["annotations"][ANNOTATION_DEVICES] = devices
    return obj


def names(pod_obj: dict[str, Any], nodes: list[str]) -> ExtenderArgs:
    """The NodeNames form (nodeCacheCapable)."""
    return parse_extender_args({"Pod": pod_obj, "NodeNames": nodes})


def objects_form(pod_obj: dict[str, Any], nodes: list[dict[str, Any]]) -> ExtenderArgs:
    """The Nodes form: full Node objects in the request."""
    return parse_extender_args({"Pod": pod_obj, "Nodes": {"items": nodes}})


class World:
    """An Extender over a snapshot-fed cache of `objects`, with its own book, metrics, writer and clock."""

    def __init__(self, *objects: dict[str, Any], settings: Settings | None = None, synced: bool = True) -> None:
        self.settings = settings or Settings()
        if synced:
            self.source = CacheSource.from_objects(list(objects))
        else:
            self.source = CacheSource(ClusterCache(None))  # type: ignore[arg-type]  # never started: never synced
        self.writer = FakeWriter()
        self.source.writer = self.writer
        self.clock = Clock()
        self.book = ReservationBook(self.settings.reservation_ttl_seconds, clock=self.clock)
        self.metrics = Metrics()
        self.extender = Extender(self.settings, self.source, book=self.book, metrics=self.metrics)

    def filter(self, args: ExtenderArgs) -> FilterAnswer:
        return self.extender.filter(args)

    def bind(self, name: str, node: str, uid: str | None = None, namespace: str = "default") -> BindAnswer:
        return self.extender.bind(namespace, name, f"uid-{name}" if uid is None else uid, node)

    def see(self, event_type: str, obj: dict[str, Any]) -> None:
        """The watch delivers an event (the cache applies it and tells the extender)."""
        self.source.cache.apply(str(obj["kind"]), event_type, obj)

    def reserve(
        self, name: str, memory_gi: int, node: str, devices: tuple[int, ...] = (), now: float | None = None
    ) -> Reservation:
        """Pod `name` of model default/llama holds memory on `node` (made at the book's clock unless `now`)."""
        request = PodRequest("default", name, f"uid-{name}", "default/llama", memory_gi * GI)
        return self.book.reserve(request, node, devices=devices, now=now)

    def held(self) -> dict[str, tuple[str, tuple[int, ...], int]]:
        """Live reservations: pod uid -> (node, device indices, bytes)."""
        return {r.uid: (r.node, r.devices, r.memory_bytes) for r in self.book.live(self.clock())}

    def decisions(self) -> dict[tuple[str, str, str], float]:
        """ibc_extender_decisions_total as an operator reads it: (verb, result, reason) -> count."""
        return self._samples("ibc_extender_decisions_total", ("verb", "result", "reason"))

    def verdicts(self) -> dict[tuple[str, str], float]:
        """ibc_extender_node_verdicts_total: (result, reason) -> nodes counted."""
        return self._samples("ibc_extender_node_verdicts_total", ("result", "reason"))

    def _samples(self, name: str, labels: tuple[str, ...]) -> dict[Any, float]:
        return {
            tuple(sample.labels[k] for k in labels): sample.value
            for metric in self.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == name
        }


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


# ----- filter: the answer for every path -----

CLUSTER = (node("small", "24Gi"), node("mid", "48Gi"), node("big", "80Gi"))
ALL = ["small", "mid", "big"]
FULL = (*CLUSTER, running("b1", "20Gi", "mid"), running("c1", "50Gi", "big"))  # 24, 28 and 30Gi free
LOTS = (
    "pod default/p: Pod default/p: annotation inference.eh-ops.io/memory: 'lots' is not a memory quantity in whole "
    "bytes (examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9)"
)

FILTER_CASES = [
    # (objects, settings, pod, nodes sent, answer, reservation (node, devices) or None, decision (result, reason))
    pytest.param(
        CLUSTER, Settings(), pod("p", "lots"), ALL,
        FilterAnswer("invalid_pod", [], error=LOTS), None, ("invalid_pod", ""),
        id="unparsable-memory-is-an-error-naming-the-pod",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p", model_name=None), ["big", "gone", "small"],
        FilterAnswer("passthrough", ["big", "gone", "small"]), None, ("passthrough", ""),
        id="no-model-label-passes-every-node-sent-in-order",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p"), ALL,
        FilterAnswer("passthrough", ALL), None, ("passthrough", ""),
        id="model-pod-without-memory-anywhere-passes-every-node",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p", "40Gi"), ALL,
        FilterAnswer("reserved", ["big"], {}, {"small": REASON_INSUFFICIENT}), ("big", (0,)), ("reserved", ""),
        id="spread-reserves-the-emptiest-node-and-answers-it-alone",
    ),
    pytest.param(
        CLUSTER, Settings(score_strategy="binpack"), pod("p", "40Gi"), ALL,
        FilterAnswer("reserved", ["mid"], {}, {"small": REASON_INSUFFICIENT}), ("mid", (0,)), ("reserved", ""),
        id="binpack-reserves-the-fullest-node-that-fits",
    ),
    pytest.param(
        CLUSTER, Settings(reservations=False), pod("p", "40Gi"), ALL,
        FilterAnswer("fits", ["mid", "big"], {}, {"small": REASON_INSUFFICIENT}), None, ("fits", ""),
        id="without-reservations-every-passing-node-in-the-order-sent",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p", "40Gi", uid=""), ["big", "mid"],
        FilterAnswer("fits", ["big", "mid"]), None, ("fits", ""),
        id="a-pod-without-uid-cannot-be-reserved-so-every-passing-node",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p", "48Gi"), ["mid"],
        FilterAnswer("reserved", ["mid"]), ("mid", (0,)), ("reserved", ""),
        id="exactly-full-fits",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p", str(48 * GI + 1)), ["mid"],
        FilterAnswer("unschedulable", [], {}, {"mid": REASON_INSUFFICIENT}), None,
        ("unschedulable", REASON_INSUFFICIENT),
        id="one-byte-over-fits-nowhere",
    ),
    pytest.param(
        FULL, Settings(), pod("p", "40Gi"), ["small", "mid", "big", "gone"],
        FilterAnswer(
            "unschedulable", [], {"mid": REASON_INSUFFICIENT, "big": REASON_INSUFFICIENT},
            {"small": REASON_INSUFFICIENT, "gone": REASON_UNKNOWN_NODE},
        ),
        None, ("unschedulable", REASON_INSUFFICIENT),
        id="full-cluster-failed-where-a-replica-could-go-unresolvable-elsewhere",
    ),
    pytest.param(
        (node("plain"), node("plain2"), node("small", "24Gi")), Settings(), pod("p", "40Gi"),
        ["plain", "small", "plain2"],
        FilterAnswer("unschedulable", [], {}, {"plain": REASON_NO_BUDGET, "small": REASON_INSUFFICIENT,
                                                "plain2": REASON_NO_BUDGET}),
        None, ("unschedulable", REASON_NO_BUDGET),
        id="the-metric-names-the-most-common-reason",
    ),
    pytest.param(
        CLUSTER, Settings(), pod("p", "40Gi"), [],
        FilterAnswer("unschedulable", []), None, ("unschedulable", "no nodes"),
        id="no-nodes-sent",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("objects", "settings", "pod_obj", "sent", "want", "reserved", "decision"), FILTER_CASES)
def test_filter_answers(
    objects: tuple[dict[str, Any], ...],
    settings: Settings,
    pod_obj: dict[str, Any],
    sent: list[str],
    want: FilterAnswer,
    reserved: tuple[str, tuple[int, ...]] | None,
    decision: tuple[str, str],
) -> None:
    w = World(*objects, settings=settings)
    answer = w.filter(names(pod_obj, sent))
    assert without_reservation(answer) == want
    held = w.held()
    if reserved is None:
        assert held == {} and answer.reservation is None
    else:
        node_name, devices = reserved
        memory = int(pod_obj["metadata"]["annotations"][ANNOTATION_MEMORY].removesuffix("Gi")) * GI
        assert answer.reservation == Reservation(
            uid="uid-p",
            model="default/llama",
            memory_bytes=memory,
            expires_at=NOW + settings.reservation_ttl_seconds,
            node=node_name,
            pod="default/p",
            devices=devices,
        )
        assert held == {"uid-p": (node_name, devices, memory)}
    assert w.decisions() == {("filter", *decision): 1.0}


def without_reservation(answer: FilterAnswer) -> FilterAnswer:
    """The answer without its reservation (asserted on its own)."""
    return FilterAnswer(answer.result, answer.passed, answer.failed, answer.unresolvable, answer.error)


# ----- filter: what an operator reads (log lines, per-node verdict counts) -----

FILTER_LOGS = [
    # (objects, pod, nodes sent, log lines, node verdicts counted)
    pytest.param(
        CLUSTER, pod("p", "40Gi"), ALL,
        [(logging.DEBUG, "filter: default/p (40Gi) -> ['big'] of 3 nodes")],
        {("passed", "none"): 2.0, ("unresolvable", REASON_INSUFFICIENT): 1.0},
        id="fits-debug-line-names-the-answer",
    ),
    pytest.param(
        FULL, pod("p", "40Gi"), ["small", "mid", "big", "gone"],
        [(logging.INFO, "filter: default/p needs 40Gi and fits none of 4 nodes (3 insufficient inference memory "
                        "budget, 1 node is unknown to the inference budget; largest free 30Gi)")],
        {("failed", REASON_INSUFFICIENT): 2.0, ("unresolvable", REASON_INSUFFICIENT): 1.0,
         ("unresolvable", REASON_UNKNOWN_NODE): 1.0},
        id="unschedulable-info-line-counts-reasons-and-the-largest-hole",
    ),
    pytest.param(
        (node("over", "24Gi"), running("b1", "30Gi", "over")), pod("p", "1Gi"), ["over"],
        [(logging.INFO, "filter: default/p needs 1Gi and fits none of 1 nodes (1 insufficient inference memory "
                        "budget; largest free 0)")],
        {("failed", REASON_INSUFFICIENT): 1.0},
        id="an-overcommitted-node-has-0-free-not-a-negative-number",
    ),
    pytest.param(
        CLUSTER, pod("p", "1Gi"), ["gone"],
        [(logging.INFO, "filter: default/p needs 1Gi and fits none of 1 nodes (1 node is unknown to the inference "
                        "budget; largest free 0)")],
        {("unresolvable", REASON_UNKNOWN_NODE): 1.0},
        id="no-node-short-of-memory-largest-free-0",
    ),
    pytest.param(
        CLUSTER, pod("p", "lots"), ALL,
        [(logging.WARNING, "filter: pod default/p is malformed: " + LOTS.removeprefix("pod default/p: "))],
        {},
        id="malformed-pod-warning",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("objects", "pod_obj", "sent", "lines", "verdicts"), FILTER_LOGS)
def test_filter_tells_the_operator(
    caplog: pytest.LogCaptureFixture,
    objects: tuple[dict[str, Any], ...],
    pod_obj: dict[str, Any],
    sent: list[str],
    lines: list[tuple[int, str]],
    verdicts: dict[tuple[str, str], float],
) -> None:
    w = World(*objects)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        w.filter(names(pod_obj, sent))
    assert messages(caplog) == lines
    assert w.verdicts() == verdicts


def test_filter_before_the_view_has_synced_decides_nothing() -> None:
    w = World(node("big", "80Gi"), synced=False)
    assert w.filter(names(pod("p", "1Gi"), ["big"])) == FilterAnswer("not_ready", [], error=NOT_SYNCED)
    assert w.extender.prioritize(names(pod("p", "1Gi"), ["big", "x"])) == {"big": 0, "x": 0}
    assert w.bind("p", "big") == BindAnswer("not_ready", NOT_SYNCED)
    assert w.held() == {} and w.writer.bindings == []
    assert w.decisions() == {("filter", "not_ready", ""): 1.0, ("bind", "not_ready", ""): 1.0}


# ----- which node filter answers (and reserves): the strategy over the exact share left free -----

BEST_CASES = [
    # (nodes, bound pods, pod memory, sent, spread's node, binpack's node)
    pytest.param(
        [node("wide", "100Gi"), node("narrow", "20Gi")], [running("w1", "70Gi", "wide")], "10Gi",
        ["wide", "narrow"], "narrow", "wide",
        id="by-share-left-not-bytes-left",  # wide keeps 20Gi of 100 (0.2), narrow 10Gi of 20 (0.5)
    ),
    pytest.param(
        [node("a", "24Gi"), node("c", "80Gi")], [], "10Gi", ["a", "c"], "c", "a",
        id="by-share-left-after-the-pod",  # a keeps 14/24, c keeps 70/80
    ),
    pytest.param(
        [node("n2", "40Gi"), node("n1", "40Gi")], [], "10Gi", ["n2", "n1"], "n1", "n1",
        id="a-tie-goes-to-the-first-name",
    ),
    pytest.param(
        [node("a", "100Gi"), node("b", "100Gi")], [running("b1", "1Gi", "b")], "10Gi", ["a", "b"],
        "a", "b",
        id="same-rounded-score-still-the-strategys-way",  # 0.90 and 0.89 both score 9
    ),
    pytest.param(
        [node("h", gpus=(2, H100_MIB)), node("u", "200Gi")], [], "70Gi", ["h", "u"], "u", "h",
        id="gpus-and-unified-memory-by-the-same-share",  # h keeps 91438Mi of 163118Mi (0.56), u 130 of 200
    ),
    pytest.param(
        [node("zero", "0"), node("one", "1"), node("big", "10Gi")], [], "0", ["zero", "one", "big"], "big", "zero",
        id="a-node-of-0-bytes-is-full-even-for-a-0-byte-replica",  # no share left on zero; one and big keep all
    ),
]  # fmt: skip


@pytest.mark.parametrize("strategy", ["spread", "binpack"])
@pytest.mark.parametrize(("nodes", "bound", "memory", "sent", "spread", "binpack"), BEST_CASES)
def test_filter_reserves_the_node_the_strategy_prefers(
    strategy: str,
    nodes: list[dict[str, Any]],
    bound: list[dict[str, Any]],
    memory: str,
    sent: list[str],
    spread: str,
    binpack: str,
) -> None:
    w = World(*nodes, *bound, settings=Settings(score_strategy=strategy))  # type: ignore[arg-type]
    want = spread if strategy == "spread" else binpack
    answer = w.filter(names(pod("p", memory), sent))
    assert answer.passed == [want]
    assert w.held()["uid-p"][0] == want


# ----- why a node was refused, per device: the words the scheduler's FailedScheduling event shows -----


def mig_node(name: str) -> dict[str, Any]:
    """An A100 in GFD's mixed MIG strategy: MIG 1g.5gb 0 (4864Mi) and MIG 3g.20gb 1 (19968Mi)."""
    labels = {
        "nvidia.com/mig-1g.5gb.count": "1",
        "nvidia.com/mig-1g.5gb.memory": "4864",
        "nvidia.com/mig-3g.20gb.count": "1",
        "nvidia.com/mig-3g.20gb.memory": "19968",
    }
    return {"kind": "Node", "metadata": {"name": name, "labels": labels, "annotations": {}}}


def h100s(count: int) -> str:
    return ", ".join(f"GPU {i} has 81559Mi free of 81559Mi" for i in range(min(count, 4)))


WORDS_CASES = [
    # (objects, pod, node sent, the node's reason)
    *[
        pytest.param(
            [node("g", gpus=(count, H100_MIB))], pod("p", "90Gi"), "g",
            f"{REASON_INSUFFICIENT} (90Gi on 1 device; {h100s(count)}{more})",
            id=f"{count}-gpus-the-event-names-{min(count, 4)}",
        )
        for count, more in [(8, ", 4 more"), (5, ", 1 more"), (4, "")]
    ],
    pytest.param(
        [node("g", gpus=(2, 40960)), running("x", "40Gi", "g", "0"), running("y", "50Gi", "g", "1")],
        pod("p", "20Gi"), "g",
        f"{REASON_INSUFFICIENT} (20Gi on 1 device; GPU 0 has 0 free of 40Gi, GPU 1 has 0 free of 40Gi)",
        id="exactly-full-and-overcommitted-gpus-have-0-free",
    ),
    pytest.param(
        [node("g", gpus=(1, H100_MIB))], pod("p", "80Gi"), "g",
        f"{REASON_INSUFFICIENT} (80Gi on 1 device; GPU 0 has 81559Mi free of 81559Mi)",
        id="80Gi-does-not-fit-an-h100-of-81559Mi",
    ),
    pytest.param(
        [node("g", gpus=(2, 20480)), model("llama", "60Gi", devices=2)], pod("p", "60Gi"), "g",
        f"{REASON_INSUFFICIENT} (30Gi on each of 2 devices; GPU 0 has 20Gi free of 20Gi, GPU 1 has 20Gi free of 20Gi)",
        id="tensor-parallel-share-per-device",
    ),
    pytest.param(
        [mig_node("m"), model("llama", "8Gi", selector={"profile": "1g.5gb"})], pod("p", "8Gi"), "m",
        f"{REASON_INSUFFICIENT} (8Gi on 1 device; MIG 1g.5gb 0 has 4864Mi free of 4864Mi)",
        id="only-the-devices-the-selector-matches",
    ),
    pytest.param(
        [mig_node("m"), model("llama", "4Gi", selector={"profile": "7g.80gb"})], pod("p", "4Gi"), "m",
        f"{REASON_DEVICES} (needs 1 matching its deviceSelector, has 0)",
        id="selector-matches-no-device",
    ),
    pytest.param(
        [mig_node("m"), model("llama", "4Gi", devices=3)], pod("p", "4Gi"), "m",
        f"{REASON_DEVICES} (needs 3, has 2)",
        id="too-few-devices",
    ),
    pytest.param(
        [node("u", "24Gi"), model("llama", "4Gi", devices=2)], pod("p", "4Gi"), "u",
        f"{REASON_DEVICES} (needs 2, has 1)",
        id="unified-memory-is-one-device",
    ),
    pytest.param(
        [node("u", "24Gi"), model("llama", "4Gi", selector={"kind": "gpu"})], pod("p", "4Gi"), "u",
        f"{REASON_DEVICES} (needs 1 matching its deviceSelector, has 0)",
        id="unified-memory-matches-no-gpu-selector",
    ),
    pytest.param(
        [node("u", "24Gi"), model("llama", "30Gi")], pod("p", "30Gi"), "u", REASON_INSUFFICIENT,
        id="unified-memory-keeps-the-bare-reason",
    ),
    pytest.param([node("plain")], pod("p", "4Gi"), "plain", REASON_NO_BUDGET, id="no-budget-bare"),
    pytest.param([node("g", gpus=(1, H100_MIB))], pod("p", "4Gi"), "gone", REASON_UNKNOWN_NODE, id="unknown-bare"),
    pytest.param(
        [node("g", gpus=(1, H100_MIB))], pod("p", "4Gi") | {"spec": {"nodeSelector": {"zone": "x"}}}, "g",
        REASON_SELECTOR,
        id="node-selector-bare",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("objects", "pod_obj", "sent", "reason"), WORDS_CASES)
def test_a_refused_node_says_why_per_device(
    objects: list[dict[str, Any]], pod_obj: dict[str, Any], sent: str, reason: str
) -> None:
    answer = World(*objects).filter(names(pod_obj, [sent]))
    assert answer.passed == [] and answer.error == ""
    assert {**answer.failed, **answer.unresolvable} == {sent: reason}


def test_a_pods_own_reservation_is_free_for_it_in_the_words() -> None:
    """Filtered again (the scheduler retries), the pod's own promise on GPU 0 does not count against it."""
    w = World(node("g", gpus=(1, 40960)), node("other", "1Gi"))
    w.reserve("p", 30, "g", (0,))
    w.reserve("q", 5, "g", (0,))
    answer = w.filter(names(pod("p", "50Gi"), ["g"]))
    assert answer.unresolvable == {"g": f"{REASON_INSUFFICIENT} (50Gi on 1 device; GPU 0 has 35Gi free of 40Gi)"}
    assert w.held() == {"uid-q": ("g", (0,), 5 * GI)}, "fitting nowhere, the pod gives its old promise up"


# ----- prioritize: 0..10 per node; the node holding the pod's reservation gets 10 -----

PRIORITIZE_CASES = [
    # (settings, pod, reservation of uid-p on a node or None, scores, decision)
    pytest.param(
        Settings(), pod("p", "10Gi"), None, {"small": 6, "mid": 8, "big": 9, "gone": 0}, ("scored", ""),
        id="spread-scores-the-share-left",
    ),
    pytest.param(
        Settings(score_strategy="binpack"), pod("p", "10Gi"), None, {"small": 4, "mid": 2, "big": 1, "gone": 0},
        ("scored", ""),
        id="binpack-scores-the-share-used",
    ),
    pytest.param(
        Settings(), pod("p", "10Gi"), "small", {"small": 10, "mid": 8, "big": 9, "gone": 0}, ("scored", ""),
        id="the-reserved-node-scores-10",
    ),
    pytest.param(
        Settings(), pod("p", "10Gi"), "elsewhere", {"small": 6, "mid": 8, "big": 9, "gone": 0}, ("scored", ""),
        id="a-reservation-on-a-node-not-sent-adds-no-node",
    ),
    pytest.param(
        Settings(), pod("p", model_name=None), None, {"small": 0, "mid": 0, "big": 0, "gone": 0}, ("passthrough", ""),
        id="not-a-model-pod-neutral",
    ),
    pytest.param(
        Settings(), pod("p", "lots"), None, {"small": 0, "mid": 0, "big": 0, "gone": 0}, ("invalid_pod", ""),
        id="malformed-pod-neutral",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "pod_obj", "reserved_on", "scores", "decision"), PRIORITIZE_CASES)
def test_prioritize_scores(
    settings: Settings,
    pod_obj: dict[str, Any],
    reserved_on: str | None,
    scores: dict[str, int],
    decision: tuple[str, str],
) -> None:
    w = World(*CLUSTER, settings=settings)
    if reserved_on is not None:
        w.reserve("p", 10, reserved_on)
    assert w.extender.prioritize(names(pod_obj, ["small", "mid", "big", "gone"])) == scores
    assert w.decisions() == {("prioritize", *decision): 1.0}


def test_prioritize_ignores_an_expired_reservation_and_another_pods() -> None:
    w = World(*CLUSTER)
    w.reserve("q", 10, "small")  # another pod's promise: it only takes memory
    w.reserve("p", 10, "mid")
    w.clock.now += Settings().reservation_ttl_seconds
    assert w.extender.prioritize(names(pod("p", "10Gi"), ALL)) == {"small": 6, "mid": 8, "big": 9}


def test_prioritize_warns_about_a_malformed_pod(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        World(*CLUSTER).extender.prioritize(names(pod("p", "lots"), ALL))
    malformed = LOTS.removeprefix("pod default/p: ")
    assert messages(caplog) == [(logging.WARNING, f"prioritize: pod default/p is malformed: {malformed}")]


# ----- the Nodes form: the request's Node objects, with the devices the watch knows from ResourceSlices -----


def test_the_nodes_form_scores_the_nodes_sent_not_the_cached_ones() -> None:
    w = World(*CLUSTER, settings=Settings(score_strategy="binpack"))
    sent = [node("small", "80Gi"), node("mid", "48Gi")]  # the request says small has 80Gi
    assert w.extender.prioritize(objects_form(pod("p", "10Gi"), sent)) == {"small": 1, "mid": 2}


def test_a_requested_node_with_a_malformed_capacity_has_no_budget(caplog: pytest.LogCaptureFixture) -> None:
    w = World(*CLUSTER)
    bad = node("small", "lots")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        answer = w.filter(objects_form(pod("p", "10Gi"), [bad, node("mid", "48Gi")]))
    assert answer == FilterAnswer("reserved", ["mid"], {}, {"small": REASON_NO_BUDGET}, reservation=answer.reservation)
    assert messages(caplog) == [
        (
            logging.WARNING,
            "node small in the request has no usable budget: Node small: annotation "
            "inference.eh-ops.io/memory-capacity: 'lots' is not a memory quantity in whole bytes (examples: 16Gi, "
            "60G, 1.5Ti, 512Mi, 1e9)",
        )
    ]


def test_gpu_labels_in_the_cache_do_not_replace_the_requests_node() -> None:
    """Only ResourceSlices (which a Node object cannot carry) come from the watch; labels come with the request."""
    w = World(node("g", gpus=(2, 40960)))
    answer = w.filter(objects_form(pod("p", "50Gi"), [node("g", "60Gi")]))
    assert answer.passed == ["g"], "the request's 60Gi of unified memory, not the cache's two 40Gi GPUs"
