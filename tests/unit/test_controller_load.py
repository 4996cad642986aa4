"""The controller's load loop against a fake API server: which /scale PATCHes, Events and reports follow
from what the pods' /metrics say (the real scrape and the real webhook: tests/cluster/test_load.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.load import LoadLoop, Replica, pod_url, replicas_of, signals_of
from controller.settings import LoadSettings
from controller.status import LoadReport, Observed, desired_status
from controller.translate import Workload
from serving.signals import ReplicaMetrics
from tests.unit.test_controller_reconciler import DENIAL, MODEL_PATH, NS, World, running_pod

pytestmark = pytest.mark.unit

SCALE = ("patch", MODEL_PATH + "/scale")
BUSY = ReplicaMetrics(waiting=6, running=2, kv_cache_usage=0.3)  # queue >= 5: saturated
IDLE = ReplicaMetrics(waiting=0, running=0, kv_cache_usage=0.0)
HALF = ReplicaMetrics(waiting=0, running=1, kv_cache_usage=0.2)  # load 0.25 of 0.8: not saturated, spare


def pod(name: str, *, ip: str = "10.0.0.1", ready: bool = True, ports: list[int] | None = None, **extra: Any) -> dict:
    body = running_pod(name, 0.0)
    body["status"]["podIP"] = ip
    if not ready:
        body["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    if ports is not None:
        body["spec"]["containers"] = [{"name": "s", "ports": [{"containerPort": p} for p in ports]}]
    for k, v in extra.items():
        body["metadata" if k == "deletionTimestamp" else "status"][k] = v
    return body


@pytest.mark.parametrize(
    ("body", "port", "url"),
    [
        (pod("a"), 9000, "http://10.0.0.1:9000"),
        (pod("a", ports=[7000]), None, "http://10.0.0.1:7000"),
        (pod("a"), None, "http://10.0.0.1:8000"),
        (pod("a"), True, "http://10.0.0.1:8000"),  # a bool is not a port
        (pod("a", ip="fd00::5"), 9000, "http://[fd00::5]:9000"),
        (pod("a", ip=""), 9000, None),
    ],
    ids=["spec-port", "container-port", "default-8000", "bool-port", "ipv6-bracketed", "no-ip-yet"],
)
def test_pod_url(body: dict[str, Any], port: Any, url: str | None) -> None:
    assert pod_url(body, port) == url


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (pod("a"), [Replica("a", "http://10.0.0.1:9000", True)]),
        (pod("a", ready=False), [Replica("a", "http://10.0.0.1:9000", False)]),
        (pod("a", ip=""), [Replica("a", "", False)]),  # scheduled, no IP yet: starting
        (pod("a", phase="Pending"), [Replica("a", "http://10.0.0.1:9000", False)]),
        (pod("a", deletionTimestamp="2026-01-01T00:00:00Z"), []),  # leaving: not counted
        (pod("a", phase="Failed"), []),
        (pod("a", phase="Succeeded"), []),
    ],
    ids=["ready", "not-ready", "no-ip", "pending", "deleting", "failed", "succeeded"],
)
def test_replicas_of(body: dict[str, Any], expected: list[Replica]) -> None:
    assert replicas_of([body], 9000) == expected


@pytest.mark.parametrize(
    ("replicas", "metrics", "current", "starting", "silent"),
    [
        ([Replica("a", "u", True)], {"a": BUSY}, 1, [False], []),
        ([Replica("a", "u", True)], {"a": None}, 1, [False], ["a"]),  # no answer: silent, never idle
        ([Replica("a", "u", False)], {}, 1, [True], []),  # not ready: starting, not scraped
        ([Replica("a", "u", True)], {"a": IDLE}, 3, [False, True, True], []),  # 2 not created yet
        ([Replica("a", "u", True), Replica("b", "u", True)], {"a": IDLE}, 2, [False, False], ["b"]),
        ([Replica("a", "u", True)], {"a": ReplicaMetrics()}, 1, [False], ["a"]),  # Prometheus text, no vLLM names
    ],
    ids=["ready-answers", "ready-silent", "starting", "pods-not-created-yet", "one-of-two-silent", "no-vllm-names"],
)
def test_signals_of(
    replicas: list[Replica], metrics: dict[str, Any], current: int, starting: list[bool], silent: list[str]
) -> None:
    signals, quiet = signals_of(replicas, metrics, current)
    assert [s.starting for s in signals] == starting
    assert quiet == silent
    if metrics.get("a") is BUSY:
        assert (signals[0].waiting, signals[0].running, signals[0].kv_cache_usage) == (6, 2, 0.3)


@pytest.mark.parametrize(
    ("metrics", "in_flight", "signal", "silent"),
    [
        ({"a": None}, {"http://a:1": 4}, (4, None), []),  # no vLLM gauges: the proxies' count is the signal
        ({"a": None}, {}, (0, None), []),  # every proxy answered, none sends to it: idle, truly
        ({"a": None}, None, (0, None), ["a"]),  # a proxy did not answer (or no concurrency): no signal
        ({"a": BUSY}, {"http://a:1": 4}, (4, 6), []),  # both: the replica's own queue wins in the rule
    ],
    ids=["proxy-count-only", "proxies-count-zero", "proxy-count-unknown", "both"],
)
def test_signals_of_with_the_proxies_count(
    metrics: dict[str, Any], in_flight: dict[str, int] | None, signal: tuple[int, int | None], silent: list[str]
) -> None:
    signals, quiet = signals_of([Replica("a", "http://a:1", True)], metrics, 1, in_flight)
    assert (signals[0].in_flight, signals[0].waiting) == signal
    assert quiet == silent


class LoadWorld(World):
    """The reconciler's fake world plus the load loop, its clock and what each pod's /metrics answers."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, ReplicaMetrics | None] = {}
        self.proxies: dict[str, dict[str, int] | None] = {}  # proxy URL -> in flight per backend URL
        self.loop = LoadLoop(
            self.api,  # type: ignore[arg-type]
            self.cache,
            self.recorder,
            self.queue,
            LoadSettings(blocked_recheck_seconds=10.0, proxy_metrics_urls=("http://p1", "http://p2")),
            scrape_fn=lambda url: self.answers.get(url),
            scrape_proxy_fn=lambda url: self.proxies.get(url),
            clock=lambda: self.now,
        )

    def load_model(self, replicas: int, *, min_replicas: int = 1, max_replicas: int = 3, **spec: Any) -> None:
        self.add_model(
            replicas=replicas,
            minReplicas=min_replicas,
            maxReplicas=max_replicas,
            port=9000,
            load={"scaleUpStabilization": "5s", "scaleDownStabilization": "60s"},
            **spec,
        )

    def pods(self, *answers: ReplicaMetrics | None, ready: bool = True) -> None:
        for i, answer in enumerate(answers):
            ip = f"10.0.0.{i + 1}"
            self.cache.apply("Pod", "ADDED", pod(f"model-a-{i}", ip=ip, ready=ready))
            self.answers[f"http://{ip}:9000"] = answer

    def look(self, times: int = 1, every: float = 1.0) -> None:
        """`times` passes `every` seconds apart, the cache following the API server's model as a watch would."""
        for _ in range(times):
            self.loop.run_once()
            self.cache.apply("InferenceModel", "MODIFIED", copy.deepcopy(self.api.objects[MODEL_PATH]))
            self.now += every

    def replicas(self) -> int:
        return int(self.api.objects[MODEL_PATH]["spec"]["replicas"])

    def events(self, reason: str) -> list[str]:
        return [n for _, r, n in self.recorder.seen if r == reason]


# (replicas, pods' answers, passes) -> (replicas after, scale PATCHes, Event reasons, report wanted/allowed)
CASES = [
    pytest.param(1, [BUSY], 7, 2, 1, ["LoadScaleUp"], (2, 2), id="saturated-past-the-window-steps-up-once"),
    pytest.param(1, [BUSY], 5, 1, 0, [], (1, 1), id="saturated-inside-the-window-holds"),
    pytest.param(2, [BUSY, BUSY], 7, 3, 1, ["LoadScaleUp"], (3, 3), id="two-saturated-step-to-three"),
    pytest.param(3, [BUSY, BUSY, BUSY], 7, 3, 0, [], (3, 3), id="at-max-replicas-holds"),
    pytest.param(2, [HALF, HALF], 7, 2, 0, [], (2, 2), id="spare-capacity-holds"),
    pytest.param(3, [IDLE, IDLE, IDLE], 62, 2, 1, ["LoadScaleDown"], (2, 2), id="idle-past-the-window-steps-down"),
    pytest.param(3, [IDLE, IDLE, IDLE], 30, 3, 0, [], (3, 3), id="idle-inside-the-window-holds"),
    pytest.param(1, [IDLE], 62, 1, 0, [], (1, 1), id="never-below-min-replicas"),
    pytest.param(2, [BUSY, None], 7, 2, 0, [], (2, 2), id="a-silent-pod-holds-the-model"),
    pytest.param(3, [IDLE, IDLE, None], 62, 3, 0, [], (3, 3), id="a-silent-pod-is-not-idle-load"),
    pytest.param(2, [BUSY], 7, 2, 0, [], (2, 2), id="a-pod-not-created-yet-holds"),
]


@pytest.mark.parametrize(("replicas", "answers", "passes", "after", "patches", "reasons", "report"), CASES)
def test_load_loop_steps(
    replicas: int,
    answers: list[ReplicaMetrics | None],
    passes: int,
    after: int,
    patches: int,
    reasons: list[str],
    report: tuple[int, int],
) -> None:
    w = LoadWorld()
    w.load_model(replicas)
    w.pods(*answers)
    w.look(passes)
    assert w.replicas() == after
    assert w.api.writes.count(SCALE) == patches
    assert [r for _, r, _ in w.recorder.seen] == reasons
    got = w.loop.report(f"{NS}/model-a")
    assert got is not None and (got.wanted, got.allowed) == report
    assert w.loop.gauge_rows() == [("model-a", NS, *report)]


def test_a_starting_replica_holds_even_under_pressure() -> None:
    w = LoadWorld()
    w.load_model(2)
    w.pods(BUSY)
    w.cache.apply("Pod", "ADDED", pod("model-a-9", ip="10.0.0.9", ready=False))
    w.look(10)
    assert w.api.writes.count(SCALE) == 0
    assert "starting" in w.loop.report(f"{NS}/model-a").message  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("spec", "replicas", "report"),
    [
        ({"maxReplicas": 1, "minReplicas": 0}, 1, None),
        ({"minReplicas": 0}, 0, LoadReport(0, 0, "0 replicas: a request starts one")),
        ({"minReplicas": 2}, 1, LoadReport(1, 1, "below minReplicas 2")),
    ],
    ids=["max-replicas-1-is-not-load-scaled", "zero-is-the-proxys", "below-min-is-the-warm-loops"],
)
def test_models_the_load_loop_leaves_alone(spec: dict[str, Any], replicas: int, report: LoadReport | None) -> None:
    w = LoadWorld()
    w.add_model(replicas=replicas, port=9000, **{"maxReplicas": 3, **spec})
    w.pods(BUSY)
    w.look(10)
    assert w.api.writes.count(SCALE) == 0
    assert w.recorder.seen == []
    assert w.loop.report(f"{NS}/model-a") == report


def reported(answer: ReplicaMetrics, passes: int) -> LoadWorld:
    """One replica answering `answer` for `passes` passes, then one reconcile with the loop's reports."""
    w = LoadWorld()
    w.reconciler.load_report = w.loop.report
    w.load_model(1)
    w.pods(answer)
    w.look(passes)
    w.reconcile()
    return w


def test_load_fields_leave_the_status_with_the_load_scaling() -> None:
    w = reported(IDLE, 1)
    assert w.status()["replicasWanted"] == 1
    w.api.objects[MODEL_PATH]["spec"]["maxReplicas"] = 1  # a person turns load scaling off
    w.api.objects[MODEL_PATH]["spec"]["minReplicas"] = 0
    w.look(1)
    w.reconcile()
    assert not {"replicasWanted", "replicasAllowed", "loadMessage"} & set(w.api.objects[MODEL_PATH]["status"])


def test_a_refused_step_is_one_event_quoting_the_webhook_and_is_asked_again_after_the_recheck() -> None:
    w = LoadWorld()
    w.api.deny_scale = DENIAL
    w.load_model(2)
    w.pods(BUSY, BUSY)
    w.look(7)  # the window passes at the 6th pass: refused
    assert w.api.writes.count(SCALE) == 1
    note = f"model-a wants 3, budget allows 2: {DENIAL}"
    assert w.events("LoadScaleBlocked") == [note]
    assert w.loop.report(f"{NS}/model-a") == LoadReport(3, 2, note)
    assert w.loop.gauge_rows() == [("model-a", NS, 3, 2)]
    w.look(8)  # inside the recheck interval (refused at the 6th pass): not asked again
    assert w.api.writes.count(SCALE) == 1
    w.look(2)  # asked again (no new stabilization window), still refused: no second Event
    assert w.api.writes.count(SCALE) == 2
    assert w.events("LoadScaleBlocked") == [note]
    w.api.deny_scale = ""
    w.look(11)
    assert w.replicas() == 3
    assert w.events("LoadScaleUp") and w.loop.report(f"{NS}/model-a") == LoadReport(3, 3, w.events("LoadScaleUp")[0])


def test_the_report_reaches_the_status_through_the_reconciler() -> None:
    w = reported(BUSY, 7)
    status = w.status()
    assert (status["replicasWanted"], status["replicasAllowed"]) == (2, 2)
    assert status["loadMessage"].startswith("replicas 1 -> 2: 1 of 1 saturated")


def test_a_conflict_is_retried_at_the_next_pass_without_an_event() -> None:
    w = LoadWorld()
    w.load_model(1)
    w.pods(BUSY)
    w.look(5)  # the window is not over yet
    w.api.objects[MODEL_PATH]["metadata"]["resourceVersion"] = "moved"  # a request or a person wrote meanwhile
    w.loop.run_once()  # the cache still has the old resourceVersion: 409
    assert w.replicas() == 1 and w.recorder.seen == []
    w.cache.apply("InferenceModel", "MODIFIED", copy.deepcopy(w.api.objects[MODEL_PATH]))  # the watch catches up
    w.look(1)
    assert w.replicas() == 2


def test_a_deleted_model_leaves_no_gauge() -> None:
    w = LoadWorld()
    w.load_model(1)
    w.pods(IDLE)
    w.look(1)
    assert w.loop.gauge_rows()
    w.cache.apply("InferenceModel", "DELETED", w.model())
    w.loop.run_once()
    assert w.loop.gauge_rows() == []


@pytest.mark.parametrize(
    ("load", "fields"),
    [
        (None, {}),
        (LoadReport(3, 2, "model-a wants 3, budget allows 2: x"), (3, 2, "model-a wants 3, budget allows 2: x")),
    ],
    ids=["not-load-scaled-no-fields", "refused-step"],
)
def test_desired_status_load_fields(load: LoadReport | None, fields: Any) -> None:
    status = desired_status("model-a", Observed(Workload("template", "model-a"), 1, 2, load=load))
    got = tuple(status[k] for k in ("replicasWanted", "replicasAllowed", "loadMessage") if k in status)
    assert got == (fields or ())


def test_the_no_signal_message_goes_once_every_pod_answers_again() -> None:
    w = LoadWorld()
    w.load_model(1)
    w.pods(None)
    w.look(1)
    assert w.loop.report(f"{NS}/model-a").message.startswith("no load signal from model-a-0")  # type: ignore[union-attr]
    w.answers["http://10.0.0.1:9000"] = IDLE
    w.look(1)
    assert w.loop.report(f"{NS}/model-a") == LoadReport(1, 1, "0 of 1 saturated, spare 1.00")


# Two proxies' counts (in flight per backend) -> replicas after 7 passes: summed, and all or nothing.
PROXY_CASES = [
    pytest.param({"concurrency": 2}, [{"http://10.0.0.1:9000": 4}, {"http://10.0.0.1:9000": 3}], 2, id="summed-7-of-2"),
    pytest.param({"concurrency": 2}, [{"http://10.0.0.1:9000": 1}, {}], 1, id="summed-1-of-2-has-room"),
    pytest.param({"concurrency": 2}, [{"http://10.0.0.1:9000": 9}, None], 1, id="one-proxy-silent-holds"),
    pytest.param({}, [{"http://10.0.0.1:9000": 9}, {}], 1, id="no-concurrency-no-count"),
    pytest.param({"concurrency": 2, "backendUrl": "http://svc"}, [{"http://10.0.0.1:9000": 9}, {}], 1,
                 id="behind-backend-url-counts-are-not-per-pod"),
]  # fmt: skip


@pytest.mark.parametrize(("load", "counts", "after"), PROXY_CASES)
def test_the_proxies_count_stands_in_for_vllm_metrics(load: dict[str, Any], counts: list[Any], after: int) -> None:
    w = LoadWorld()
    load = dict(load)  # the table's dict is shared by every run in this process (mutmut runs the tier twice)
    backend = load.pop("backendUrl", None)
    w.add_model(
        replicas=1,
        minReplicas=1,
        maxReplicas=3,
        port=9000,
        load={"scaleUpStabilization": "5s", **load},
        **({"backendUrl": backend} if backend else {}),
    )
    w.pods(None)  # its /metrics has no vLLM gauges
    w.proxies = dict(zip(("http://p1", "http://p2"), counts, strict=True))
    w.look(7)
    assert w.replicas() == after
