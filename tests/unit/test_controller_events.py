"""Events about models: events.k8s.io/v1 as kubectl shows them, deduplicated into a series."""

from __future__ import annotations

from typing import Any

import pytest

from controller.events import REPORTING_CONTROLLER, EventRecorder, event_body
from kubeview.api import ApiError as KubeError
from kubeview.events import truncate_note

pytestmark = pytest.mark.unit

MODEL = {
    "apiVersion": "inference.eh-ops.io/v1alpha1",
    "kind": "InferenceModel",
    "metadata": {"name": "model-b", "namespace": "ml", "uid": "uid-b", "resourceVersion": "42"},
}


class FakeKube:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = False

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            raise KubeError(403, "Forbidden", "events.events.k8s.io is forbidden")
        self.calls.append(("create", path, body))
        return body

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", path, patch))
        return patch


class Clock:
    def __init__(self) -> None:
        self.now = 1_768_473_000.0

    def __call__(self) -> float:
        return self.now


def test_event_body_is_a_valid_events_k8s_io_v1_event() -> None:
    body = event_body(
        MODEL,
        event_type="Warning",
        reason="PodUnschedulable",
        action="Schedule",
        note="0/1 nodes are available",
        instance="host_12",
        now=1_768_473_000.5,
        name="model-b.abc",
    )
    assert body == {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "model-b.abc", "namespace": "ml"},
        "eventTime": "2026-01-15T10:30:00.500000Z",
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": "host_12",
        "action": "Schedule",
        "reason": "PodUnschedulable",
        "note": "0/1 nodes are available",
        "type": "Warning",
        "regarding": {
            "apiVersion": "inference.eh-ops.io/v1alpha1",
            "kind": "InferenceModel",
            "namespace": "ml",
            "name": "model-b",
            "uid": "uid-b",
            "resourceVersion": "42",
        },
    }
    assert REPORTING_CONTROLLER == "inference.eh-ops.io/controller"


def test_repeats_become_a_series_written_at_most_once_a_minute() -> None:
    kube, clock = FakeKube(), Clock()
    rec = EventRecorder(kube, "i", clock=clock)  # type: ignore[arg-type]
    assert rec.emit(MODEL, "Warning", "PodUnschedulable", "Schedule", "full")
    for _ in range(10):  # resyncs and pod updates re-find the same Pending pod
        clock.now += 5
        assert not rec.emit(MODEL, "Warning", "PodUnschedulable", "Schedule", "full")
    clock.now += 15
    assert rec.emit(MODEL, "Warning", "PodUnschedulable", "Schedule", "full")
    kinds = [c[0] for c in kube.calls]
    assert kinds == ["create", "patch"]
    event_name = kube.calls[0][2]["metadata"]["name"]
    assert kube.calls[1][1] == f"/apis/events.k8s.io/v1/namespaces/ml/events/{event_name}"
    assert kube.calls[1][2]["series"]["count"] == 12


@pytest.mark.parametrize(
    ("second", "new_event"),
    [
        pytest.param(("Warning", "PodUnschedulable", "Schedule", "other reason"), True, id="different-note"),
        pytest.param(("Normal", "ScaledUp", "ScaleUp", "full"), True, id="different-reason"),
        pytest.param(("Warning", "PodUnschedulable", "Schedule", "full"), False, id="same"),
    ],
)
def test_dedup_key_is_object_reason_and_note(second: tuple[Any, str, str, str], new_event: bool) -> None:
    kube, clock = FakeKube(), Clock()
    rec = EventRecorder(kube, "i", clock=clock)  # type: ignore[arg-type]
    rec.emit(MODEL, "Warning", "PodUnschedulable", "Schedule", "full")
    assert rec.emit(MODEL, *second) is new_event


def test_after_the_window_a_new_event_is_created() -> None:
    kube, clock = FakeKube(), Clock()
    rec = EventRecorder(kube, "i", clock=clock, window_seconds=600)  # type: ignore[arg-type]
    rec.emit(MODEL, "Normal", "IdleScaleDown", "ScaleDown", "n")
    clock.now += 601
    rec.emit(MODEL, "Normal", "IdleScaleDown", "ScaleDown", "n")
    assert [c[0] for c in kube.calls] == ["create", "create"]


def test_a_failed_event_write_is_not_an_error() -> None:
    kube = FakeKube()
    kube.fail = True
    rec = EventRecorder(kube, "i")  # type: ignore[arg-type]
    assert rec.emit(MODEL, "Normal", "ScaledUp", "ScaleUp", "n") is False


def test_long_notes_are_cut_to_the_api_limit() -> None:
    note = truncate_note("é" * 2000)
    assert len(note.encode()) <= 1024 and note.endswith("...")
