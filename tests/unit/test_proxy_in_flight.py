"""The proxy publishes its requests in flight per backend (ibc_proxy_backend_in_flight): the controller's
load signal for replicas without vLLM metrics (controller/load.py sums it over every proxy)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import generate_latest

from proxy.forward import Upstream
from proxy.metrics import ProxyMetrics
from serving.signals import parse_in_flight

pytestmark = pytest.mark.unit

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


def published(metrics: ProxyMetrics) -> dict[str, int]:
    return parse_in_flight(generate_latest(metrics.registry).decode())


@pytest.mark.parametrize(
    ("steps", "want"),
    [
        (["+", "+"], {A: 1, B: 1}),  # least outstanding: one each
        (["+", "+", "+"], {A: 2, B: 1}),
        (["+", "+", "-A"], {A: 0, B: 1}),
        (["+", "+", "-A", "-B"], {A: 0, B: 0}),
    ],
    ids=["two-spread", "three", "one-finished", "all-finished"],
)
def test_upstream_publishes_what_it_has_in_flight(steps: list[str], want: dict[str, int]) -> None:
    metrics = ProxyMetrics()
    upstream = Upstream(
        transport=httpx.MockTransport(lambda r: httpx.Response(200)), on_in_flight=metrics.count_in_flight
    )
    for step in steps:
        if step == "+":
            upstream.acquire([A, B])
        else:
            upstream.release({"-A": A, "-B": B}[step])
    assert published(metrics) == want
    assert {k: v for k, v in want.items() if v} == dict(upstream.outstanding())
