"""Right-sizing advice reads like the seed's examples and never suggests below the observed peak."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budget.advice import advise

pytestmark = pytest.mark.unit

GI = 2**30


@pytest.mark.parametrize(
    ("declared", "peak", "utilization", "recommendation", "hint"),
    [
        pytest.param(80 * GI, 75 * GI, 93, "Consider reducing memory to 78Gi for better packing",
                     "model-a declared 80Gi but observed peak is 75Gi (6% overprovisioned)", id="seed-model-a"),
        pytest.param(60 * GI, 58 * GI, 96, "Declared memory matches observed usage", None, id="seed-model-b-close"),
        pytest.param(16 * GI, 18 * GI, 112, "Observed peak exceeds declared memory: raise memory to 19Gi to avoid OOM",
                     "model-a declared 16Gi but observed peak is 18Gi (13% underprovisioned)", id="under"),
        pytest.param(4 * GI, 1 * GI, 25, "Consider reducing memory to 1280Mi for better packing",
                     "model-a declared 4Gi but observed peak is 1Gi (75% overprovisioned)", id="small-model-mi-steps"),
        pytest.param(8 * GI, 0, 0, "Consider reducing memory to 256Mi for better packing",
                     "model-a declared 8Gi but observed peak is 0 (100% overprovisioned)", id="nothing-observed"),
    ],
)
def test_advice_table(declared, peak, utilization, recommendation, hint):
    a = advise("model-a", declared, peak)
    assert a.utilization_percent == utilization
    assert a.recommendation == recommendation
    assert a.hint == hint


def test_bad_input_names_the_model():
    with pytest.raises(ValueError, match="model-x"):
        advise("model-x", 0, 1)
    with pytest.raises(ValueError, match="model-x"):
        advise("model-x", GI, -1)


@given(declared=st.integers(1, 2**44), peak=st.integers(0, 2**44))
def test_never_recommends_less_than_the_peak(declared, peak):
    a = advise("m", declared, peak)
    if a.recommendation_bytes is not None:
        assert a.recommendation_bytes >= peak


@pytest.mark.parametrize(
    ("declared", "peak", "over", "recommendation_bytes", "recommendation"),
    [
        pytest.param(16 * GI, 16 * GI, 0, None, "Declared memory matches observed usage", id="peak-equals-declared"),
        pytest.param(16 * GI, 16 * GI + 1, 0, 17 * GI, "Observed peak exceeds declared memory: raise memory to 17Gi "
                     "to avoid OOM", id="one-byte-over"),
        pytest.param(100 * GI, 97 * GI, 3, None, "Declared memory matches observed usage",
                     id="suggestion-not-below-declared"),
        pytest.param(104 * GI, 97 * GI, 7, 101 * GI, "Consider reducing memory to 101Gi for better packing",
                     id="headroom-is-four-percent"),
        pytest.param(10 * GI, 8 * GI, 20, 9 * GI, "Consider reducing memory to 9Gi for better packing",
                     id="from-8gi-up-whole-gi"),
        pytest.param(60 * GI, 50 * GI + 2**20, 17, 53 * GI, "Consider reducing memory to 53Gi for better packing",
                     id="a-mebibyte-over-the-headroom-edge"),
        pytest.param(26 * GI, 25 * GI, 4, None, "Declared memory matches observed usage",
                     id="suggestion-equals-declared"),
        pytest.param(8 * GI, 7 * GI, 13, 7 * GI + 512 * 2**20,
                     "Consider reducing memory to 7680Mi for better packing", id="below-8gi-in-256mi-steps"),
        pytest.param(33 * GI, 32 * GI, 3, None, "Declared memory matches observed usage",
                     id="three-percent-but-suggestion-is-higher"),
    ],
)
def test_advice_fields_at_the_thresholds(declared, peak, over, recommendation_bytes, recommendation):
    a = advise("m", declared, peak)
    assert (a.declared_bytes, a.observed_peak_bytes, a.overprovisioned_percent) == (declared, peak, over)
    assert a.utilization_ratio == peak / declared
    assert (a.recommendation_bytes, a.recommendation) == (recommendation_bytes, recommendation)


def test_without_headroom_three_percent_is_worth_a_change():
    a = advise("m", 100 * GI, 97 * GI, headroom_percent=0)
    assert (a.overprovisioned_percent, a.recommendation_bytes) == (3, 97 * GI)


def test_the_metrics_body_in_local_mode_shows_the_process_side():
    from budget import ModelMemory, metrics_body

    m = ModelMemory("local", "m", "m-7b", 3 * GI, GI + 1, 33, 2 * GI, "Consider reducing memory to 2Gi",
                    "2026-01-01T00:00:00Z", 1, 1, "process", "running", 512 * 2**20 + 1, "exit 1: oom")
    assert metrics_body(m) == {
        "model": "m", "namespace": "local", "modelName": "m-7b",
        "declaredMemory": "3Gi", "declaredMemoryBytes": 3 * GI,
        "observedPeakMemory": "1025Mi", "observedPeakMemoryBytes": GI + 1,
        "utilizationPercent": 33, "utilizationRatio": 0.3333,
        "recommendedMemory": "2Gi", "recommendation": "Consider reducing memory to 2Gi",
        "lastObservation": "2026-01-01T00:00:00Z", "replicas": 1, "readyReplicas": 1, "source": "process",
        "state": "running", "observedMemory": "513Mi", "observedMemoryBytes": 512 * 2**20 + 1,
        "lastFailure": "exit 1: oom", "lastFailureTime": None, "log": None, "nextStartAttempt": None,
        "recentFailures": [],
    }
    stopped = metrics_body(ModelMemory("local", "m", "m", GI, state="stopped", observed_bytes=0))
    assert (stopped["observedMemory"], stopped["observedMemoryBytes"], stopped["utilizationRatio"]) == (None, 0, None)


def test_the_metrics_body_of_a_crash_looping_local_model_says_why_when_and_where_to_look():
    from budget import ModelMemory, metrics_body

    failures = (("2026-01-01T00:00:00Z", "exit 1: oom"), ("2026-01-01T00:00:10Z", "exit 1: oom again"))
    m = ModelMemory("local", "m", "m", GI, state="failed", last_failure="exit 1: oom again",
                    last_failure_time="2026-01-01T00:00:10Z", next_start_attempt="2026-01-01T00:00:40Z",
                    recent_failures=failures, log="/var/log/ibc/m.log")
    body = metrics_body(m)
    assert {k: body[k] for k in ("state", "lastFailure", "lastFailureTime", "nextStartAttempt", "recentFailures",
                                 "log")} == {
        "state": "failed",
        "lastFailure": "exit 1: oom again",
        "lastFailureTime": "2026-01-01T00:00:10Z",
        "nextStartAttempt": "2026-01-01T00:00:40Z",
        "recentFailures": [
            {"time": "2026-01-01T00:00:00Z", "message": "exit 1: oom"},
            {"time": "2026-01-01T00:00:10Z", "message": "exit 1: oom again"},
        ],
        "log": "/var/log/ibc/m.log",
    }


def test_the_metrics_body_in_a_cluster_has_no_process_side():
    from budget import ModelMemory, metrics_body

    body = metrics_body(ModelMemory("ns", "m", "m", None))
    assert (body["declaredMemory"], body["utilizationRatio"]) == (None, None)
    assert not {"state", "observedMemory", "observedMemoryBytes", "lastFailure"} & set(body)
