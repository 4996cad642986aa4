"""Memory advice as status shows it, and the observed peak that survives a controller restart."""

from __future__ import annotations

import pytest

from controller.advice import recommend, status_advice
from controller.observations import ObservationStore
from controller.status import Advice

pytestmark = pytest.mark.unit

GI = 2**30
MI = 2**20
T0 = 1_768_473_000.0  # 2026-01-15T10:30:00Z


@pytest.mark.parametrize(
    ("declared_text", "declared", "peak", "expected"),
    [
        pytest.param(
            "80Gi",
            80 * GI,
            75 * GI,
            Advice("80Gi", "75Gi", 93, "Consider reducing memory to 78Gi for better packing", "2026-01-15T10:30:00Z"),
            id="seed-model-a",
        ),
        pytest.param(
            "60Gi",
            60 * GI,
            58 * GI,
            Advice("60Gi", "58Gi", 96, "Declared memory matches observed usage", "2026-01-15T10:30:00Z"),
            id="seed-model-b-right-sized",
        ),
        pytest.param(
            "16Gi",
            16 * GI,
            18 * GI,
            Advice(
                "16Gi",
                "18Gi",
                112,
                "Observed peak exceeds declared memory: raise memory to 19Gi to avoid OOM",
                "2026-01-15T10:30:00Z",
            ),
            id="underprovisioned",
        ),
        pytest.param(
            "8G",
            8 * 10**9,
            5000 * MI,
            Advice("8G", "5000Mi", 65, "Consider reducing memory to 5376Mi for better packing", "2026-01-15T10:30:00Z"),
            id="decimal-declaration-kept-as-written",
        ),
        pytest.param(
            "4Gi",
            4 * GI,
            1_000_000_123,
            Advice(
                "4Gi", "1000000123", 23, "Consider reducing memory to 1Gi for better packing", "2026-01-15T10:30:00Z"
            ),
            id="odd-peak-stored-exactly",
        ),
    ],
)
def test_status_advice_table(declared_text: str, declared: int, peak: int, expected: Advice) -> None:
    advice = recommend("model-a", declared, peak)
    assert status_advice(declared_text, advice, peak, T0) == expected


def test_recommend_seed_log_hint() -> None:
    advice = recommend("model-a", 80 * GI, 75 * GI)
    assert advice is not None
    assert advice.hint == "model-a declared 80Gi but observed peak is 75Gi (6% overprovisioned)"


def test_headroom_changes_the_recommendation() -> None:
    advice = recommend("model-a", 80 * GI, 75 * GI, headroom_percent=0)
    assert advice is not None and advice.recommendation_bytes == 75 * GI


def test_nothing_declared_means_no_advice() -> None:
    assert recommend("m", 0, GI) is None
    assert status_advice("0", None, GI, T0) == Advice("0")


def test_peak_is_seeded_from_status_after_a_restart() -> None:
    store = ObservationStore()
    store.seed("ns/m", {"observedPeakMemory": "75Gi", "lastObservation": "2026-01-15T10:30:00Z"})
    obs = store.get("ns/m")
    assert obs is not None and (obs.peak_bytes, obs.published) == (75 * GI, T0)
    # a lower measurement after the restart does not lower the persisted peak, nor write status
    assert store.record("ns/m", 70 * GI, T0 + 30) is False
    assert store.get("ns/m").peak_bytes == 75 * GI  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("measurements", "writes"),
    [
        pytest.param([(10, 0.0)], [True], id="first-measurement-publishes"),
        pytest.param([(10, 0.0), (12, 30.0)], [True, True], id="new-peak-publishes"),
        pytest.param([(10, 0.0), (9, 30.0), (10, 60.0)], [True, False, False], id="steady-does-not-publish"),
        pytest.param([(10, 0.0), (9, 299.0), (9, 300.0)], [True, False, True], id="publish-interval-refresh"),
    ],
)
def test_observation_store_writes_only_when_status_should_change(
    measurements: list[tuple[int, float]], writes: list[bool]
) -> None:
    store = ObservationStore(publish_every_seconds=300)
    assert [store.record("k", b, T0 + t) for b, t in measurements] == writes


def test_bad_persisted_peak_is_ignored() -> None:
    store = ObservationStore()
    store.seed("k", {"observedPeakMemory": "lots"})
    assert store.get("k") is None


def test_hints_are_rate_limited() -> None:
    store = ObservationStore()
    store.record("k", GI, T0)
    kwargs = {"every_seconds": 3600.0, "min_gap_seconds": 60.0}
    assert store.should_hint("k", "a", T0, **kwargs)
    assert not store.should_hint("k", "a", T0 + 30, **kwargs)
    assert not store.should_hint("k", "b", T0 + 30, **kwargs)  # changed, but too soon
    assert store.should_hint("k", "b", T0 + 61, **kwargs)
    assert not store.should_hint("k", "b", T0 + 600, **kwargs)
    assert store.should_hint("k", "b", T0 + 61 + 3600, **kwargs)
