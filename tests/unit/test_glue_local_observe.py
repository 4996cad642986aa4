"""What `ibc local` reports about a model's memory and says in its log: `GET /models/{name}/metrics` field by field,
the sizing hint (once per change), and the reason each stop is logged with.

A fake runtime stands in for processes (tests/unit/test_local_scaler.py); resident memory is set per process here.
"""

import logging

import pytest

from budget import metrics_body
from local.runtime import MemorySample
from tests.unit.test_glue_local_state import make_scaler
from tests.unit.test_local_scaler import Clock, FakeRuntime

pytestmark = pytest.mark.unit

GI = 2**30


class MeasuredRuntime(FakeRuntime):
    """Resident memory per process (by pid), as /proc would report it."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.rss_by_pid: dict[int, int] = {}

    def sample_memory(self, procs):
        return {p.pid: MemorySample(self.rss_by_pid[p.pid], "rss") for p in procs if p.pid in self.rss_by_pid}


def test_the_metrics_of_a_model_that_never_ran():
    scaler, _ = make_scaler()
    assert metrics_body(scaler.memory("model-a")) == {
        "model": "model-a",
        "namespace": "local",
        "modelName": "model-a",
        "declaredMemory": "80Gi",
        "declaredMemoryBytes": 80 * GI,
        "observedPeakMemory": None,
        "observedPeakMemoryBytes": None,
        "utilizationPercent": None,
        "utilizationRatio": None,
        "recommendedMemory": None,
        "recommendation": None,
        "lastObservation": None,
        "replicas": 0,
        "readyReplicas": 0,
        "source": "none",
        "state": "stopped",
        "observedMemory": None,
        "observedMemoryBytes": None,
        "lastFailure": None,
        "lastFailureTime": None,
        "nextStartAttempt": None,
        "recentFailures": [],
        "log": None,
    }


@pytest.mark.parametrize("later, attempt", [(0, "2023-11-14T22:13:30Z"), (9, "2023-11-14T22:13:30Z"), (10, None)],
                         ids=["at-once", "a-second-before", "backoff-over"])  # fmt: skip
def test_the_next_start_attempt_is_shown_during_the_backoff_only(later, attempt, tmp_path):
    scaler, runtime = make_scaler(log_dir=str(tmp_path))
    scaler.scale_up("model-a", 1)
    runtime.exit(runtime.spawned[0], 1, failure="exited with code 1: boom")
    runtime.clock.now += later
    body = metrics_body(scaler.memory("model-a"))
    assert (body["state"], body["nextStartAttempt"]) == ("failed", attempt)
    assert body["lastFailureTime"] == "2023-11-14T22:13:20Z"
    assert body["log"] == str(tmp_path / "model-a.log")
    assert scaler.log_path("local/model-a") == str(tmp_path / "model-a.log")


def test_the_largest_replica_is_observed_the_peak_kept_and_the_hint_logged_once_per_change(caplog):
    runtime = MeasuredRuntime(Clock())
    scaler, _ = make_scaler(runtime=runtime)
    scaler.scale_up("model-c", 2)  # 16Gi each
    a, b = runtime.spawned
    runtime.ready(a)
    runtime.rss_by_pid = {a.pid: 6 * GI, b.pid: 8 * GI}
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        scaler.sample_now()
        scaler.sample_now()  # the same peak: nothing new to say
        runtime.rss_by_pid = {a.pid: 6 * GI, b.pid: 7 * GI}
        scaler.sample_now()  # lower: the peak stays
        runtime.rss_by_pid = {a.pid: 10 * GI, b.pid: 7 * GI}
        scaler.sample_now()  # a new peak, a new recommendation
    assert [r.getMessage() for r in caplog.records] == [
        "model-c declared 16Gi but observed peak is 8Gi (50% overprovisioned); "
        "Consider reducing memory to 9Gi for better packing",
        "model-c declared 16Gi but observed peak is 10Gi (38% overprovisioned); "
        "Consider reducing memory to 11Gi for better packing",
    ]
    body = metrics_body(scaler.memory("model-c"))
    assert (body["observedMemoryBytes"], body["observedPeakMemoryBytes"], body["source"]) == (10 * GI, 10 * GI, "rss")
    assert (body["replicas"], body["readyReplicas"], body["lastObservation"]) == (2, 1, "2023-11-14T22:13:20Z")
    assert metrics_body(scaler.memory("model-a"))["observedMemoryBytes"] is None  # another model is not this one
    runtime.stop(a)
    runtime.exit(a, 0)
    runtime.stop(b)
    runtime.exit(b, 0)
    scaler.sample_now()
    body = metrics_body(scaler.memory("model-c"))
    assert (body["observedMemoryBytes"], body["observedPeakMemoryBytes"], body["source"]) == (None, 10 * GI, "none")


def test_a_process_not_measured_yet_is_left_out():
    runtime = MeasuredRuntime(Clock())
    scaler, _ = make_scaler(runtime=runtime)
    scaler.scale_up("model-c", 2)
    a, _b = runtime.spawned
    runtime.rss_by_pid = {a.pid: 4 * GI}
    scaler.sample_now()
    assert metrics_body(scaler.memory("model-c"))["observedMemoryBytes"] == 4 * GI


def test_a_stop_by_hand_is_logged_with_what_it_frees(caplog):
    scaler, runtime = make_scaler()
    scaler.scale_up("model-c", 2)
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        assert scaler.stop_model("model-c") == 2
        assert scaler.stop_model("model-c") == 0  # nothing left starting or ready
    assert [r.getMessage() for r in caplog.records] == ["model-c stopped by hand: stopping it to free 32Gi"]
    assert runtime.stopped == runtime.spawned
