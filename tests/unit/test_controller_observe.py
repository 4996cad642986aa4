"""Observed-memory sources: the Prometheus HTTP API and the metrics API, including what they get wrong."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from controller.errors import ObservationError
from controller.observe import (
    DEFAULT_PROMETHEUS_QUERY,
    MetricsApiSource,
    PrometheusSource,
    check_query_template,
    parse_prometheus_value,
    render_query,
)
from kubeview.api import ApiError as KubeError

pytestmark = pytest.mark.unit

MI = 2**20


def vector(*values: str) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.7e9, v]} for v in values]},
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(vector("80530636800"), 80530636800, id="one-gpu-bytes"),
        pytest.param(vector("1048576", "2097152"), 3 * MI, id="two-gpus-summed"),
        pytest.param(vector("1.5"), 2, id="fraction-rounded-up"),
        pytest.param(vector(), None, id="no-sample"),
        pytest.param({"status": "success", "data": {"resultType": "scalar", "result": [1.7e9, "42"]}}, 42, id="scalar"),
    ],
)
def test_prometheus_answers(body: dict[str, Any], expected: int | None) -> None:
    assert parse_prometheus_value(body) == expected


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param({"status": "error", "error": "parse error at char 5"}, "parse error", id="promql-error"),
        pytest.param(
            {"status": "success", "data": {"resultType": "matrix", "result": []}}, "instant vector", id="matrix"
        ),
        pytest.param(vector("NaN"), "not a byte count", id="nan"),
        pytest.param(vector("-5"), "not a byte count", id="negative"),
        pytest.param(vector("lots"), "not a number", id="not-number"),
        pytest.param(["x"], "not a Prometheus API answer", id="not-object"),
        pytest.param({"status": "success"}, "without data", id="no-data"),
    ],
)
def test_prometheus_bad_answers_are_observation_errors(body: Any, error: str) -> None:
    with pytest.raises(ObservationError, match=error):
        parse_prometheus_value(body)


def test_default_query_asks_for_one_pods_framebuffer_in_bytes() -> None:
    query = render_query(DEFAULT_PROMETHEUS_QUERY, namespace="ml", pod="model-a-5d9-x", model="model-a")
    assert query == 'sum(DCGM_FI_DEV_FB_USED{namespace="ml",pod="model-a-5d9-x"}) * 1048576'


def test_render_escapes_quotes() -> None:
    assert render_query('m{pod="{pod}"}', namespace="", pod='a"b', model="") == 'm{pod="a\\"b"}'


def test_template_must_name_a_pod_or_model() -> None:
    with pytest.raises(ValueError, match=r"\{pod\} or \{model\}"):
        check_query_template('sum(DCGM_FI_DEV_FB_USED{namespace="{namespace}"})')


def test_prometheus_source_queries_each_pod() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/prom/api/v1/query"
        query = request.url.params["query"]
        seen.append(query)
        return httpx.Response(200, json=vector("1048576" if '"p1"' in query else "3145728"))

    source = PrometheusSource("http://prom/prom/", 'used{pod="{pod}"}', transport=httpx.MockTransport(handler))
    assert source.observe("ml", "m", ["p1", "p2"]) == {"p1": MI, "p2": 3 * MI}
    assert seen == ['used{pod="p1"}', 'used{pod="p2"}']


def test_prometheus_source_down_is_an_observation_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    source = PrometheusSource("http://prom", transport=httpx.MockTransport(handler))
    with pytest.raises(ObservationError, match="unreachable"):
        source.observe("ml", "m", ["p1"])


def test_prometheus_html_error_page_is_an_observation_error() -> None:
    source = PrometheusSource(
        "http://prom", transport=httpx.MockTransport(lambda r: httpx.Response(502, text="<html>bad gateway"))
    )
    with pytest.raises(ObservationError, match="HTTP 502 without JSON"):
        source.observe("ml", "m", ["p1"])


class FakeKube:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[tuple[str, Any]] = []

    def request(self, method: str, path: str, *, query: Any = None, **_: Any) -> Any:
        self.asked.append((path, query))
        if isinstance(self.answer, Exception):
            raise self.answer
        return json.loads(json.dumps(self.answer))


def test_metrics_api_sums_containers_per_pod() -> None:
    kube = FakeKube(
        {
            "items": [
                {
                    "metadata": {"name": "p1"},
                    "containers": [{"usage": {"memory": "60Gi"}}, {"usage": {"memory": "512Mi"}}],
                },
                {"metadata": {"name": "p-old"}, "containers": [{"usage": {"memory": "1Gi"}}]},
            ]
        }
    )
    source = MetricsApiSource(kube)  # type: ignore[arg-type]
    assert source.observe("ml", "model-a", ["p1"]) == {"p1": 60 * 2**30 + 512 * MI}
    assert kube.asked == [
        ("/apis/metrics.k8s.io/v1beta1/namespaces/ml/pods", {"labelSelector": "inference.eh-ops.io/model=model-a"})
    ]


def test_metrics_api_missing_is_an_observation_error() -> None:
    kube = FakeKube(KubeError(404, "NotFound", "the server could not find the requested resource"))
    with pytest.raises(ObservationError, match="metrics API"):
        MetricsApiSource(kube).observe("ml", "m", ["p"])  # type: ignore[arg-type]
