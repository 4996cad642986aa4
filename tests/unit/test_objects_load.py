"""spec.minReplicas, spec.maxReplicas and spec.load land in the model; every bad value is named exactly."""

from __future__ import annotations

from typing import Any

import pytest

from budget import ObjectError
from budget.load import LoadTuning
from budget.objects import model_from_inferencemodel

pytestmark = pytest.mark.unit


def im(**spec: Any) -> dict[str, Any]:
    return {
        "kind": "InferenceModel",
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"memory": "8Gi", **spec},
    }


GOOD = {
    "defaults: one replica, no warm ones": ({}, 0, 1, LoadTuning()),
    "min and max": ({"minReplicas": 1, "maxReplicas": 3}, 1, 3, LoadTuning()),
    "min equals max": ({"minReplicas": 2, "maxReplicas": 2}, 2, 2, LoadTuning()),
    "max 0 (never runs)": ({"maxReplicas": 0}, 0, 0, LoadTuning()),
    "every load field": (
        {
            "maxReplicas": 4,
            "load": {
                "kvCacheSaturation": 0.9,
                "waitingSaturation": 3,
                "concurrency": 8,
                "margin": "0.25",
                "scaleUpStabilization": "2s",
                "scaleDownStabilization": "5m",
            },
        },
        0,
        4,
        LoadTuning(0.9, 3, 8, 0.25, 2.0, 300.0),
    ),
    "kv saturation 1": ({"load": {"kvCacheSaturation": 1}}, 0, 1, LoadTuning(kv_saturation=1.0)),
    "the smallest concurrency and queue": (
        {"load": {"concurrency": 1, "waitingSaturation": 1}},
        0,
        1,
        LoadTuning(concurrency=1, waiting_saturation=1),
    ),
}


@pytest.mark.parametrize(("spec", "low", "high", "tuning"), GOOD.values(), ids=GOOD.keys())
def test_fields(spec: dict[str, Any], low: int, high: int, tuning: LoadTuning) -> None:
    model = model_from_inferencemodel(im(**spec))
    assert (model.min_replicas, model.max_replicas, model.load) == (low, high, tuning)


BAD = {
    "min over max": ({"minReplicas": 3, "maxReplicas": 2}, "spec.minReplicas (3) must not exceed spec.maxReplicas (2)"),
    "min over the default max": ({"minReplicas": 2}, "spec.minReplicas (2) must not exceed spec.maxReplicas (1)"),
    "negative max": ({"maxReplicas": -1}, "spec.maxReplicas must be a non-negative integer, got -1"),
    "string min": ({"minReplicas": "1"}, "spec.minReplicas must be a non-negative integer, got '1'"),
    "bool max": ({"maxReplicas": True}, "spec.maxReplicas must be a non-negative integer, got True"),
    "kv 0": ({"load": {"kvCacheSaturation": 0}}, "spec.load.kvCacheSaturation must be a number above 0 and at most 1"),
    "kv over 1": ({"load": {"kvCacheSaturation": 1.5}}, "spec.load.kvCacheSaturation must be a number above 0"),
    "kv text": (
        {"load": {"kvCacheSaturation": "high"}},
        "spec.load.kvCacheSaturation must be a number above 0 and at most 1, got 'high'",
    ),
    "kv bool": (
        {"load": {"kvCacheSaturation": True}},
        "spec.load.kvCacheSaturation must be a number above 0 and at most 1, got True",
    ),
    "margin list": ({"load": {"margin": [1]}}, "spec.load.margin must be a number above 0 and at most 1, got [1]"),
    "waiting 0": ({"load": {"waitingSaturation": 0}}, "spec.load.waitingSaturation must be at least 1, got 0"),
    "waiting text": ({"load": {"waitingSaturation": "5"}}, "spec.load.waitingSaturation must be a non-negative"),
    "concurrency 0": ({"load": {"concurrency": 0}}, "spec.load.concurrency must be a positive integer, got 0"),
    "concurrency bool": ({"load": {"concurrency": True}}, "spec.load.concurrency must be a positive integer, got True"),
    "concurrency float": ({"load": {"concurrency": 2.5}}, "spec.load.concurrency must be a positive integer, got 2.5"),
    "window not a duration": ({"load": {"scaleUpStabilization": "soon"}}, "spec.load.scaleUpStabilization"),
    "down window not a duration": ({"load": {"scaleDownStabilization": "x"}}, "spec.load.scaleDownStabilization"),
    "load not an object": ({"load": 3}, "spec.load must be an object, got int"),
    "kv not a number": ({"load": {"kvCacheSaturation": "nan"}}, "spec.load.kvCacheSaturation must be a number above 0"),
}


@pytest.mark.parametrize(("spec", "message"), BAD.values(), ids=BAD.keys())
def test_bad_fields(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ObjectError) as caught:
        model_from_inferencemodel(im(**spec))
    assert str(caught.value).startswith(f"InferenceModel ns/chat: {message}"), str(caught.value)
