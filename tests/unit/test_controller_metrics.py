"""The controller's HTTP side: the three memory gauges and GET /models/{name}/metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from budget import ModelMemory
from controller.metrics import ControllerMetrics, MetricsSettings, create_app
from serving.bind import parse_bind
from serving.metrics import MemoryCollector

pytestmark = pytest.mark.unit

GI = 2**30
A = ModelMemory("ml", "model-a", "llama-70b", 80 * GI, 75 * GI, 93, 78 * GI, "Consider reducing memory to 78Gi")
B = ModelMemory("ml", "model-b", "model-b", 60 * GI)
A_OTHER_NS = ModelMemory("dev", "model-a", "model-a", 8 * GI)


def client(models: list[ModelMemory], ready: bool = True):  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    registry.register(MemoryCollector(lambda: models))
    ControllerMetrics(registry)
    app = create_app(MetricsSettings(models=lambda: models, registry=registry, ready=lambda: ready))
    return app.test_client()


def samples(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("inference_model_memory_"):
                out[(s.name, s.labels["model"])] = s.value
    return out


def test_gauges_follow_the_records() -> None:
    resp = client([A, B]).get("/metrics")
    assert resp.status_code == 200
    assert samples(resp.text) == {
        ("inference_model_memory_declared_bytes", "model-a"): 85899345920.0,
        ("inference_model_memory_observed_peak_bytes", "model-a"): 80530636800.0,
        ("inference_model_memory_utilization_ratio", "model-a"): 0.9375,
        ("inference_model_memory_declared_bytes", "model-b"): 64424509440.0,
    }
    assert "inference_controller_reconcile_total" in resp.text


def test_deleted_model_leaves_no_stale_series() -> None:
    models = [A, B]
    c = client(models)
    models.remove(A)
    assert ("inference_model_memory_declared_bytes", "model-a") not in samples(c.get("/metrics").text)


@pytest.mark.parametrize(
    ("url", "status", "model", "namespace"),
    [
        pytest.param("/models/model-b/metrics", 200, "model-b", "ml", id="unique-name"),
        pytest.param("/models/model-a/metrics?namespace=dev", 200, "model-a", "dev", id="query-namespace"),
        pytest.param("/models/ml/model-a/metrics", 200, "model-a", "ml", id="path-namespace"),
        pytest.param("/models/model-a/metrics", 400, None, None, id="ambiguous-name"),
        pytest.param("/models/model-z/metrics", 404, None, None, id="unknown"),
        pytest.param("/models/prod/model-a/metrics", 404, None, None, id="unknown-in-namespace"),
        pytest.param("/models/a/b/c/metrics", 404, None, None, id="bad-path"),
    ],
)
def test_model_metrics_endpoint(url: str, status: int, model: str | None, namespace: str | None) -> None:
    resp = client([A, B, A_OTHER_NS]).get(url)
    assert resp.status_code == status
    body = resp.get_json()
    if status == 200:
        assert (body["model"], body["namespace"]) == (model, namespace)
    else:
        assert body["error"] and body["message"]


def test_model_metrics_body() -> None:
    body = client([A]).get("/models/model-a/metrics").get_json()
    assert body == {
        "model": "model-a",
        "namespace": "ml",
        "modelName": "llama-70b",
        "declaredMemory": "80Gi",
        "declaredMemoryBytes": 85899345920,
        "observedPeakMemory": "75Gi",
        "observedPeakMemoryBytes": 80530636800,
        "utilizationPercent": 93,
        "utilizationRatio": 0.9375,
        "recommendedMemory": "78Gi",
        "recommendation": "Consider reducing memory to 78Gi",
        "lastObservation": None,
        "replicas": 0,
        "readyReplicas": 0,
        "source": "none",
    }


def test_unobserved_model_has_nulls_not_zeros() -> None:
    body = client([B]).get("/models/model-b/metrics").get_json()
    assert body["observedPeakMemory"] is None and body["utilizationRatio"] is None


def test_wrong_method_is_a_json_405() -> None:
    resp = client([A]).post("/models/model-a/metrics")
    assert resp.status_code == 405 and resp.get_json()["error"] == "method_not_allowed"


def test_readyz_waits_for_the_cache() -> None:
    assert client([], ready=False).get("/readyz").status_code == 503
    assert client([], ready=True).get("/readyz").status_code == 200
    assert client([]).get("/healthz").status_code == 200
    assert client([]).get("/livez").status_code == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0.0.0.0:8080", ("0.0.0.0", 8080), id="ipv4"),
        pytest.param(":9090", ("0.0.0.0", 9090), id="port-only"),
        pytest.param("[::1]:8080", ("::1", 8080), id="ipv6"),
    ],
)
def test_parse_bind(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["8080", "host:", "host:http", "h:70000"])
def test_parse_bind_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind(text)
