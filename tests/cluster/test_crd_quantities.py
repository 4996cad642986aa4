"""The memory grammar on the real apiserver: the CRD accepts and refuses exactly what the parser does.

tests/quantities.py is the one table; tests/unit/test_quantity.py runs it through `parse_quantity`, this
file through the InferenceModel CRD (its RE2 pattern and its CEL range rule) with server-side dry-run
creates, so nothing is stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from budget import parse_quantity
from tests.cluster import components
from tests.cluster.harness import ControlPlane
from tests.quantities import ACCEPTED, REFUSED, TOO_LARGE

GROUP, VERSION, PLURAL = "inference.eh-ops.io", "v1alpha1", "inferencemodels"


@pytest.fixture(scope="module")
def models(control_plane: ControlPlane, k8s_client: Any) -> Iterator[Any]:
    from kubernetes import client

    components.install_crd(control_plane)
    yield client.CustomObjectsApi(k8s_client)


def _dry_create(api: Any, memory: object) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceModel",
        "metadata": {"name": "q"},
        "spec": {"modelName": "q", "memory": memory, "backendUrl": "http://backend:8000"},
    }
    created: dict[str, Any] = api.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, body, dry_run="All", _request_timeout=30
    )
    return created


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, b, id=t) for t, b in ACCEPTED])
def test_the_crd_accepts_what_the_parser_accepts(models, text, expected):
    stored = _dry_create(models, text)["spec"]["memory"]
    assert stored == text
    assert parse_quantity(stored) == expected


def _refusal(api: Any, memory: object) -> str:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        _dry_create(api, memory)
    assert info.value.status == 422, info.value.body
    message: str = json.loads(info.value.body)["message"]
    return message


@pytest.mark.parametrize("text", [pytest.param(t, id=why) for t, why in REFUSED.items()])
def test_the_crd_pattern_refuses_what_the_parser_refuses(models, text):
    message = _refusal(models, text)
    assert "spec.memory" in message and "should match" in message, message


@pytest.mark.parametrize("text", [pytest.param(t, id=why) for t, why in TOO_LARGE.items()])
def test_the_crd_range_rule_refuses_what_the_parser_finds_too_large(models, text):
    message = _refusal(models, text)
    assert "spec.memory" in message and "less than 8Ei" in message, message


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        pytest.param(0, True, id="zero"),
        pytest.param(17179869184, True, id="16Gi"),
        pytest.param(2**63 - 2, True, id="largest"),
        pytest.param(2**63 - 1, False, id="int64-max"),
        pytest.param(-1, False, id="negative"),
    ],
)
def test_integers_get_the_same_range(models, value, accepted):
    if accepted:
        assert parse_quantity(_dry_create(models, value)["spec"]["memory"]) == value
    else:
        assert "spec.memory" in _refusal(models, value)
