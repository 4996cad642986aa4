"""InferenceModel -> Deployment/Service: what the cluster gets, and templates that cannot become one."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.errors import SpecError, TemplateError
from controller.translate import (
    Workload,
    adoption_config,
    contains,
    controlled_by,
    desired_deployment,
    desired_service,
    selector_string,
    workload_of,
)

pytestmark = pytest.mark.unit

LABEL = "inference.eh-ops.io/model"
MEMORY = "inference.eh-ops.io/memory"


def model(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "memory": "80Gi",
        "template": {
            "metadata": {"labels": {"app": "vllm"}},
            "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6"}]},
        },
    }
    base.update(spec)
    return {
        "apiVersion": "inference.eh-ops.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "model-a", "namespace": "ml", "uid": "uid-a", "generation": 3},
        "spec": {k: v for k, v in base.items() if v is not None},
    }


def test_deployment_carries_label_annotation_scheduler_pool_and_owner() -> None:
    dep = desired_deployment(model(replicas=2, nodeSelector={"pool": "gpu"}), scheduler_name="budget-sched")
    assert dep["metadata"] == {
        "name": "model-a",
        "namespace": "ml",
        "labels": {LABEL: "model-a", "app.kubernetes.io/managed-by": "inference-budget-controller"},
        "ownerReferences": [
            {
                "apiVersion": "inference.eh-ops.io/v1alpha1",
                "kind": "InferenceModel",
                "name": "model-a",
                "uid": "uid-a",
                "controller": True,
            }
        ],
    }
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"] == {"matchLabels": {LABEL: "model-a"}}
    pod = spec["template"]
    assert pod["metadata"]["labels"] == {"app": "vllm", LABEL: "model-a"}
    assert pod["metadata"]["annotations"] == {MEMORY: "80Gi"}
    assert pod["spec"]["schedulerName"] == "budget-sched"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert pod["spec"]["containers"] == [{"name": "server", "image": "vllm/vllm-openai:v0.6"}]
    # no surge: a rollout never needs memory beyond the budget
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_translation_does_not_mutate_the_model() -> None:
    m = model(nodeSelector={"pool": "gpu"})
    before = copy.deepcopy(m)
    desired_deployment(m)
    assert m == before


@pytest.mark.parametrize(
    ("spec", "replicas", "annotation"),
    [
        pytest.param({}, 1, "80Gi", id="replicas-default-1"),
        pytest.param({"replicas": 0}, 0, "80Gi", id="scaled-to-zero"),
        pytest.param({"memory": 17179869184}, 1, "17179869184", id="integer-memory-verbatim"),
        pytest.param({"memory": "60G"}, 1, "60G", id="decimal-suffix-verbatim"),
    ],
)
def test_replicas_and_memory_annotation(spec: dict[str, Any], replicas: int, annotation: str) -> None:
    dep = desired_deployment(model(**spec))
    assert dep["spec"]["replicas"] == replicas
    assert dep["spec"]["template"]["metadata"]["annotations"][MEMORY] == annotation


def test_template_memory_annotation_is_overridden_by_spec_memory() -> None:
    m = model()
    m["spec"]["template"]["metadata"]["annotations"] = {MEMORY: "1Gi", "keep": "me"}
    annotations = desired_deployment(m)["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {MEMORY: "80Gi", "keep": "me"}


def _with_template(template: Any) -> dict[str, Any]:
    m = model()
    m["spec"]["template"] = template
    return m


CONTAINER = {"name": "server", "image": "img"}


@pytest.mark.parametrize(
    ("m", "error"),
    [
        pytest.param(_with_template("nginx"), "spec.template must be an object", id="template-not-object"),
        pytest.param(_with_template({"metadata": {}}), "spec.template.spec is required", id="no-pod-spec"),
        pytest.param(_with_template({"spec": {}}), "at least one container", id="no-containers"),
        pytest.param(_with_template({"spec": {"containers": []}}), "at least one container", id="empty-containers"),
        pytest.param(
            _with_template({"spec": {"containers": ["img"]}}), r"containers\[0\] must be an object", id="container-str"
        ),
        pytest.param(_with_template({"spec": {"containers": [{"name": "server"}]}}), "needs an image", id="no-image"),
        pytest.param(
            _with_template({"spec": {"containers": [{"name": "Server_1", "image": "i"}]}}),
            "DNS-1123 label",
            id="bad-container-name",
        ),
        pytest.param(
            _with_template({"spec": {"containers": [CONTAINER, CONTAINER]}}), "used twice", id="duplicate-names"
        ),
        pytest.param(
            _with_template({"spec": {"containers": [CONTAINER], "restartPolicy": "Never"}}),
            "restartPolicy must be Always",
            id="restart-never",
        ),
        pytest.param(
            _with_template({"metadata": {"labels": {LABEL: "model-b"}}, "spec": {"containers": [CONTAINER]}}),
            "must be the model's name",
            id="label-names-another-model",
        ),
        pytest.param(
            _with_template({"metadata": {"labels": {"replicas": 3}}, "spec": {"containers": [CONTAINER]}}),
            "must map strings to strings",
            id="label-value-not-string",
        ),
        pytest.param(
            _with_template({"metadata": "x", "spec": {"containers": [CONTAINER]}}),
            "metadata must be an object",
            id="metadata-not-object",
        ),
        pytest.param(
            model(
                nodeSelector={"pool": "gpu"},
                template={"spec": {"containers": [CONTAINER], "nodeSelector": {"pool": "cpu"}}},
            ),
            "spec.nodeSelector says 'gpu'",
            id="pool-conflict",
        ),
    ],
)
def test_bad_templates_name_the_field(m: dict[str, Any], error: str) -> None:
    with pytest.raises(TemplateError, match=error) as info:
        desired_deployment(m)
    assert info.value.reason == "InvalidTemplate"


@pytest.mark.parametrize(
    ("spec", "error", "reason"),
    [
        pytest.param({"memory": None}, "spec.memory is required", "InvalidSpec", id="no-memory"),
        pytest.param({"memory": "lots"}, "not a memory quantity", "InvalidSpec", id="bad-memory"),
        pytest.param({"replicas": -1}, "non-negative integer", "InvalidSpec", id="negative-replicas"),
    ],
)
def test_bad_spec_fields(spec: dict[str, Any], error: str, reason: str) -> None:
    with pytest.raises(SpecError, match=error) as info:
        desired_deployment(model(**spec))
    assert info.value.reason == reason


def test_model_name_too_long_for_a_label() -> None:
    m = model()
    m["metadata"]["name"] = "m" * 64
    with pytest.raises(SpecError, match="cannot be a label value"):
        desired_deployment(m)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({}, Workload("template", "model-a"), id="template"),
        pytest.param(
            {"template": None, "deploymentRef": {"name": "vllm"}}, Workload("deploymentRef", "vllm"), id="ref"
        ),
        pytest.param({"template": None, "backendUrl": "http://vllm:8000"}, Workload("external"), id="external"),
        pytest.param({"template": None}, Workload("none"), id="nothing"),
    ],
)
def test_workload_modes(spec: dict[str, Any], expected: Workload) -> None:
    assert workload_of(model(**spec)) == expected


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        pytest.param({"deploymentRef": {"name": "x"}}, "exclusive", id="template-and-ref"),
        pytest.param({"template": None, "deploymentRef": {}}, "must name a Deployment", id="ref-without-name"),
        pytest.param({"template": None, "deploymentRef": "x"}, "must name a Deployment", id="ref-not-object"),
    ],
)
def test_workload_errors(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(SpecError, match=error):
        workload_of(model(**spec))


def existing_deployment(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "vllm", "namespace": "ml", "generation": 5},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "vllm"}},
            "template": {
                "metadata": {"labels": labels or {"app": "vllm"}},
                "spec": {"containers": [{"name": "server", "image": "img"}]},
            },
        },
    }


def test_adoption_sets_only_the_fields_the_controller_owns() -> None:
    m = model(template=None, deploymentRef={"name": "vllm"}, replicas=0, nodeSelector={"pool": "gpu"})
    config = adoption_config(m, existing_deployment(), scheduler_name="s")
    assert config == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "vllm", "namespace": "ml", "labels": {LABEL: "model-a"}},
        "spec": {
            "replicas": 0,
            "template": {
                "metadata": {"labels": {LABEL: "model-a"}, "annotations": {MEMORY: "80Gi"}},
                "spec": {"schedulerName": "s", "nodeSelector": {"pool": "gpu"}},
            },
        },
    }


def test_adopting_another_models_deployment_is_refused() -> None:
    m = model(template=None, deploymentRef={"name": "vllm"})
    with pytest.raises(SpecError, match="belongs to another model") as info:
        adoption_config(m, existing_deployment({"app": "vllm", LABEL: "model-z"}))
    assert info.value.reason == "DeploymentConflict"


def test_service_selects_model_pods_on_its_port() -> None:
    svc = desired_service(model(port=9000))
    assert svc is not None
    assert svc["spec"]["selector"] == {LABEL: "model-a"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": 9000, "protocol": "TCP"}]
    assert desired_service(model())["spec"]["ports"][0]["port"] == 8000  # type: ignore[index]


def test_no_service_for_a_name_that_cannot_be_one() -> None:
    m = model()
    m["metadata"]["name"] = "llama-3.1-8b"  # dots: fine for a label, not for a Service
    assert desired_service(m) is None


def test_selector_string_is_what_the_scale_subresource_reads() -> None:
    assert selector_string("model-a") == "inference.eh-ops.io/model=model-a"


def test_controlled_by_checks_the_uid() -> None:
    dep = desired_deployment(model())
    assert controlled_by(dep, model())
    other = model()
    other["metadata"]["uid"] = "uid-recreated"
    assert not controlled_by(dep, other)


@pytest.mark.parametrize(
    ("live", "desired", "expected"),
    [
        pytest.param({"a": 1, "b": 2}, {"a": 1}, True, id="extra-defaulted-field"),
        pytest.param({"a": 1}, {"a": 2}, False, id="changed-value"),
        pytest.param({"a": 1}, {"b": 1}, False, id="missing-field"),
        pytest.param(
            {"c": [{"name": "x", "imagePullPolicy": "IfNotPresent"}]}, {"c": [{"name": "x"}]}, True, id="list-defaults"
        ),
        pytest.param({"c": [{"name": "x"}, {"name": "y"}]}, {"c": [{"name": "x"}]}, False, id="list-length"),
        pytest.param({"a": {"b": 1}}, {"a": 1}, False, id="type-change"),
    ],
)
def test_contains_ignores_server_defaults_only(live: Any, desired: Any, expected: bool) -> None:
    assert contains(live, desired) is expected
