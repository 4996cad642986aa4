"""Status the controller writes: what `kubectl get inferencemodels` shows, and only when it changed."""

from __future__ import annotations

from typing import Any

import pytest

from budget.objects import rfc3339
from controller.status import (
    Advice,
    Observed,
    PendingPod,
    Problem,
    desired_status,
    live_pods,
    pending_pods,
    status_patch,
    with_times,
)
from controller.translate import Workload

pytestmark = pytest.mark.unit

T0 = 1_768_473_000.0  # 2026-01-15T10:30:00Z
TEMPLATE = Workload("template", "model-a")


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


UNSCHEDULABLE = PendingPod(
    "model-b-x1", "Unschedulable", "0/1 nodes are available: 1 insufficient inference memory budget."
)


@pytest.mark.parametrize(
    ("observed", "ready", "ready_reason", "scheduled", "scheduled_reason"),
    [
        pytest.param(
            Observed(TEMPLATE, 1, 1, replicas=1, ready_replicas=1, pods_total=1),
            True,
            "Available",
            "True",
            "AllScheduled",
            id="running",
        ),
        pytest.param(Observed(TEMPLATE, 1, 0), False, "ScaledToZero", "True", "NoPods", id="scaled-to-zero"),
        pytest.param(
            Observed(TEMPLATE, 1, 1, replicas=1, pods_total=1, pending=(UNSCHEDULABLE,)),
            False,
            "Unschedulable",
            "False",
            "Unschedulable",
            id="pending-unschedulable",
        ),
        pytest.param(
            Observed(TEMPLATE, 1, 1, replicas=1, pods_total=1, pending=(PendingPod("p", "", ""),)),
            False,
            "Starting",
            "Unknown",
            "Scheduling",
            id="waiting-for-scheduler",
        ),
        pytest.param(Observed(Workload("external"), 1, 1), True, "External", "True", "NoPods", id="external-backend"),
        pytest.param(Observed(Workload("none"), 1, 1), False, "NoWorkload", "True", "NoPods", id="no-workload"),
        pytest.param(
            Observed(TEMPLATE, 2, 1, problem=Problem("InvalidTemplate", "spec.template.spec is required")),
            False,
            "InvalidTemplate",
            "True",
            "NoPods",
            id="bad-template",
        ),
        pytest.param(
            Observed(TEMPLATE, 2, 1, replicas=1, ready_replicas=1, pods_total=1, problem=Problem("ScaleDenied", "no")),
            True,
            "Available",
            "True",
            "AllScheduled",
            id="serving-despite-problem",
        ),
    ],
)
def test_ready_and_scheduled(
    observed: Observed, ready: bool, ready_reason: str, scheduled: str, scheduled_reason: str
) -> None:
    status = desired_status("model-a", observed)
    conds = conditions(status)
    assert status["ready"] is ready
    assert conds["Ready"]["status"] == ("True" if ready else "False")
    assert conds["Ready"]["reason"] == ready_reason
    assert conds["Scheduled"]["status"] == scheduled
    assert conds["Scheduled"]["reason"] == scheduled_reason
    assert status["selector"] == "inference.eh-ops.io/model=model-a"
    assert all(c["observedGeneration"] == observed.generation for c in status["conditions"])


def test_scheduled_condition_quotes_the_scheduler() -> None:
    other = PendingPod("model-b-x2", "Unschedulable", "same")
    status = desired_status("model-b", Observed(TEMPLATE, 1, 2, pending=(UNSCHEDULABLE, other), pods_total=2))
    message = conditions(status)["Scheduled"]["message"]
    assert message == ("pod model-b-x1 (and 1 more): 0/1 nodes are available: 1 insufficient inference memory budget.")


def test_reconciled_condition_says_why_not() -> None:
    problem = Problem("InvalidTemplate", "spec.template.spec.containers must list at least one container")
    status = desired_status("m", Observed(TEMPLATE, 4, 1, problem=problem))
    reconciled = conditions(status)["Reconciled"]
    assert (reconciled["status"], reconciled["reason"], reconciled["message"]) == (
        "False",
        "InvalidTemplate",
        problem.message,
    )
    assert status["observedGeneration"] == 4


def test_advice_fields_only_when_known() -> None:
    bare = desired_status("m", Observed(TEMPLATE, 1, 1, advice=Advice("80Gi")))
    assert bare["declaredMemory"] == "80Gi"
    assert "observedPeakMemory" not in bare and "recommendation" not in bare
    full = desired_status(
        "m",
        Observed(
            TEMPLATE,
            1,
            1,
            advice=Advice("80Gi", "75Gi", 93, "Consider reducing memory to 78Gi", "2026-01-15T10:30:00Z"),
        ),
    )
    assert (full["observedPeakMemory"], full["utilizationPercent"], full["lastObservation"]) == (
        "75Gi",
        93,
        "2026-01-15T10:30:00Z",
    )


def test_status_never_includes_last_request_time() -> None:
    status = desired_status("m", Observed(TEMPLATE, 1, 1, advice=Advice("1Gi", "1Gi", 100, "x", "y")))
    assert "lastRequestTime" not in status


def test_transition_time_kept_while_condition_status_unchanged() -> None:
    first = with_times(desired_status("m", Observed(TEMPLATE, 1, 1)), {}, T0)
    assert {c["lastTransitionTime"] for c in first["conditions"]} == {rfc3339(T0)}
    running = Observed(TEMPLATE, 1, 1, replicas=1, ready_replicas=1, pods_total=1)
    second = with_times(desired_status("m", running), first, T0 + 60)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Ready"] == rfc3339(T0 + 60)  # False -> True
    assert times["Reconciled"] == rfc3339(T0)  # True -> True


def test_foreign_conditions_are_kept() -> None:
    current = {"conditions": [{"type": "Progressing", "status": "True", "lastTransitionTime": "x"}]}
    out = with_times(desired_status("m", Observed(TEMPLATE, 1, 1)), current, T0)
    assert [c["type"] for c in out["conditions"]] == ["Ready", "Scheduled", "Reconciled", "Progressing"]


def test_nothing_to_write_after_a_restart() -> None:
    observed = Observed(TEMPLATE, 2, 1, replicas=1, ready_replicas=1, pods_total=1, advice=Advice("8Gi"))
    written = with_times(desired_status("m", observed), {}, T0)
    stored = {**written, "lastRequestTime": "2026-01-15T10:29:00Z"}  # the proxy's field, untouched
    again = with_times(desired_status("m", observed), stored, T0 + 3600)
    assert status_patch(stored, again) is None


@pytest.mark.parametrize(
    ("current", "desired", "patch"),
    [
        pytest.param({}, {"ready": False}, {"ready": False}, id="empty-status"),
        pytest.param({"ready": True, "replicas": 1}, {"ready": True, "replicas": 0}, {"replicas": 0}, id="one-field"),
        pytest.param({"ready": True}, {"ready": True}, None, id="unchanged"),
        pytest.param({"ready": True, "lastRequestTime": "t"}, {"ready": True}, None, id="others-fields-ignored"),
        pytest.param(
            {"conditions": [{"type": "Ready", "status": "True"}]},
            {"conditions": [{"type": "Ready", "status": "False"}]},
            {"conditions": [{"type": "Ready", "status": "False"}]},
            id="conditions-replaced-whole",
        ),
    ],
)
def test_status_patch(current: dict[str, Any], desired: dict[str, Any], patch: dict[str, Any] | None) -> None:
    assert status_patch(current, desired) == patch


def pod(name: str, *, node: str | None = None, phase: str = "Pending", **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name}, "spec": {}, "status": {"phase": phase}}
    if node:
        obj["spec"]["nodeName"] = node
    obj["status"].update(extra.get("status", {}))
    obj["metadata"].update(extra.get("metadata", {}))
    return obj


def test_pending_pods_read_the_pod_scheduled_condition() -> None:
    refused = pod(
        "b",
        status={
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes..."}
            ]
        },
    )
    pods = [pod("a", node="n1", phase="Running"), refused, pod("c"), pod("d", metadata={"deletionTimestamp": "t"})]
    assert pending_pods(pods) == [PendingPod("b", "Unschedulable", "0/3 nodes..."), PendingPod("c", "", "")]


def test_live_pods_skip_terminated_and_deleting() -> None:
    pods = [
        pod("a"),
        pod("b", phase="Failed"),
        pod("c", phase="Succeeded"),
        pod("d", metadata={"deletionTimestamp": "t"}),
    ]
    assert [p["metadata"]["name"] for p in live_pods(pods)] == ["a"]
