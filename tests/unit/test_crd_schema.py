"""The InferenceModel CRD: what kubectl shows, what the apiserver accepts, and that the samples pass it.

The patterns are taken from the CRD file itself and run with `re` (they are written in the subset that
RE2, the apiserver's engine, and Python agree on). A small validator applies the schema's own rules to
the samples and to InferenceModels captured from a real apiserver, so a schema change that would
reject them fails here first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from budget.quantity import MEMORY_QUANTITY_PATTERN
from tests.quantities import ACCEPTED, REFUSED, TOO_LARGE

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "deploy/crd/inferencemodels.inference.eh-ops.io.yaml"
SAMPLES = [REPO / "deploy/samples/llama-2-7b.yaml", REPO / "deploy/samples/seed-models.yaml"]
CAPTURED = REPO / "tests/fixtures/captured"


def _crd() -> dict[str, Any]:
    documents = list(yaml.safe_load_all(CRD_FILE.read_text()))
    assert len(documents) == 1
    return documents[0]


CRD = _crd()
VERSION = CRD["spec"]["versions"][0]
ROOT = VERSION["schema"]["openAPIV3Schema"]
SPEC = ROOT["properties"]["spec"]
STATUS = ROOT["properties"]["status"]
QUANTITY = SPEC["properties"]["memory"]["pattern"]
DURATION = SPEC["properties"]["cooldownPeriod"]["pattern"]


# --- what users see ------------------------------------------------------------------------------------


def test_names_group_and_scope():
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["metadata"]["name"] == "inferencemodels.inference.eh-ops.io"
    assert CRD["spec"]["group"] == "inference.eh-ops.io"
    assert CRD["spec"]["scope"] == "Namespaced"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "InferenceModel",
        "inferencemodels",
        "inferencemodel",
    )
    assert names["shortNames"] == ["im", "infm"]
    assert "categories" not in names, "not in `kubectl get all`: models are not workloads of every namespace"
    assert [(v["name"], v["served"], v["storage"]) for v in CRD["spec"]["versions"]] == [("v1alpha1", True, True)]


def test_scale_and_status_subresources():
    assert VERSION["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert STATUS["properties"]["selector"]["type"] == "string", "the scale subresource reads a string selector"


def test_kubectl_get_shows_ready_replicas_memory_age_and_model_and_devices_with_wide():
    columns = [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in VERSION["additionalPrinterColumns"]]
    assert columns == [
        ("Ready", ".status.ready", 0),
        ("Replicas", ".status.replicas", 0),
        ("Memory", ".spec.memory", 0),
        ("Age", ".metadata.creationTimestamp", 0),
        ("Model", ".spec.modelName", 1),
        ("Devices", ".spec.devices", 1),
    ]


# --- the patterns ------------------------------------------------------------------------------------


def test_the_memory_pattern_is_the_parsers_grammar_word_for_word():
    assert QUANTITY == MEMORY_QUANTITY_PATTERN, "paste budget.quantity.MEMORY_QUANTITY_PATTERN into the CRD"


@pytest.mark.parametrize(
    ("value", "accepted"),
    [pytest.param(t, True, id=t) for t, _ in ACCEPTED]
    + [pytest.param(t, False, id=why) for t, why in REFUSED.items()]
    # the range rule (CEL), not the pattern, refuses these; tests/cluster checks it on the apiserver
    + [pytest.param(t, True, id=why) for t, why in TOO_LARGE.items()],
)
def test_memory_quantity_pattern(value, accepted):
    assert bool(re.search(QUANTITY, value)) is accepted


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("10m", True),
        ("90s", True),
        ("1h30m", True),
        ("0", True),
        ("1.5h", True),
        ("500ms", True),
        ("2h0m0s", True),
        ("0s", True),
        ("10 minutes", False),
        ("-5m", False),
        ("10", False),
        ("1d", False),
        ("m", False),
        ("", False),
        ("10M", False),
        ("1h 30m", False),
        ("00", False),
    ],
    ids=lambda v: v if isinstance(v, str) and v else ("accept" if v is True else "reject" if v is False else "empty"),
)
def test_cooldown_duration_pattern(value, accepted):
    assert bool(re.search(DURATION, value)) is accepted


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, child in node.get("properties", {}).items():
        out += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}.*")
    return out


def test_every_pattern_is_anchored_and_free_of_constructs_re2_lacks():
    patterns = [(path, n["pattern"]) for path, n in _walk(ROOT) if "pattern" in n]
    assert len(patterns) >= 4
    for path, pattern in patterns:
        assert pattern.startswith("^"), path
        assert pattern.endswith("$") or path.endswith("backendUrl"), path
        for construct in ("(?=", "(?!", "(?<=", "(?<!", "\\1", "(?P"):
            assert construct not in pattern, f"{path}: {construct} is not RE2"
        re.compile(pattern)


# --- the schema is structural (the apiserver refuses it otherwise) -------------------------------------


def test_the_schema_is_structural():
    for path, node in _walk(ROOT):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path or '<root>'} has no type"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object", path
        if re.fullmatch(r"\.(spec|status)\.\w+", path):
            assert node.get("description"), f"{path} has no description (kubectl explain shows it)"


def test_defaults_satisfy_their_own_rules():
    for path, node in _walk(SPEC, ".spec"):
        if "default" in node:
            assert _validate(node, node["default"], path) == [], path
    props = SPEC["properties"]
    assert (props["cooldownPeriod"]["default"], props["replicas"]["default"], props["port"]["default"]) == (
        "10m",
        1,
        8000,
    )


def test_conditions_are_a_map_keyed_by_type():
    conditions = STATUS["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(item["required"])
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["observedGeneration"]["format"] == "int64"


def test_status_carries_the_observed_memory_fields():
    props = STATUS["properties"]
    for name in ("declaredMemory", "observedPeakMemory", "recommendation"):
        assert props[name]["type"] == "string", name
    assert props["utilizationPercent"]["type"] == "integer"
    for name in ("lastObservation", "lastRequestTime"):
        assert props[name]["format"] == "date-time", name
    assert props["observedGeneration"]["format"] == "int64"
    assert {props[n]["type"] for n in ("replicas", "readyReplicas")} == {"integer"}
    assert props["ready"]["type"] == "boolean"


# --- a validator with the schema's own rules -----------------------------------------------------------

# The CEL rules of the CRD, as Python; a new rule must be added here, so it is exercised below.
_CEL = {
    "!(has(self.template) && has(self.deploymentRef))": lambda obj: not ("template" in obj and "deploymentRef" in obj),
    "self.all(k, k in ['kind', 'profile', 'product'])": lambda obj: set(obj) <= {"kind", "profile", "product"},
    "!has(self.kind) || self.kind in ['gpu', 'mig', 'unified']": lambda obj: obj.get("kind", "gpu")
    in ("gpu", "mig", "unified"),
}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _validate(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Errors the apiserver (with fieldValidation=Strict) would report for `value` under `schema`."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: must be an integer or a string"]
    elif schema.get("type") == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{path}: must be an integer"]
    elif schema.get("type") in _TYPES and not isinstance(value, _TYPES[schema["type"]]):
        return [f"{path}: must be {schema['type']}"]
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            errors.append(f"{path}: length out of bounds")
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < schema.get("minimum", -(1 << 63)) or value > schema.get("maximum", 1 << 63):
            errors.append(f"{path}: {value} out of range")
    if isinstance(value, dict):
        errors += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        props = schema.get("properties")
        for name, child in value.items():
            if props is not None and name in props:
                errors += _validate(props[name], child, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(schema["additionalProperties"], child, f"{path}.{name}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{path}.{name}: unknown field")
        for rule in schema.get("x-kubernetes-validations", []):
            if not _CEL[rule["rule"]](value):
                errors.append(f"{path}: {rule['message']}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += _validate(schema["items"], item, f"{path}[{index}]")
    return errors


def _model(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "inference.eh-ops.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "m"},
        "spec": {"modelName": "m", "memory": "16Gi", **spec},
    }


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({}, None),
        ({"memory": 17179869184}, None),
        ({"memory": "16GB"}, "does not match"),
        ({"memory": -1}, "out of range"),
        ({"memory": True}, "integer or a string"),
        ({"modelName": ""}, "length out of bounds"),
        ({"cooldownPeriod": "10 minutes"}, "does not match"),
        ({"cooldownPeriod": "0"}, None),
        ({"replicas": -1}, "out of range"),
        ({"port": 0}, "out of range"),
        ({"port": 65536}, "out of range"),
        ({"nodeSelector": {"pool": 1}}, "must be string"),
        ({"backendUrl": "vllm-server:8000"}, "does not match"),
        ({"backendUrl": "http://vllm-server:8000"}, None),
        ({"cooldown": "10m"}, "unknown field"),
        ({"template": {"spec": {"containers": [{"name": "x", "image": "y"}]}}}, None),
        ({"deploymentRef": {}}, ".spec.deploymentRef.name: required"),
        ({"template": {}, "deploymentRef": {"name": "d"}}, "not both"),
        ({"eviction": {"idleAfter": "60s"}, "priority": 2, "pinned": False, "admission": {"maxWait": "2m"}}, None),
        ({"eviction": {"idleAfter": "a minute"}}, "does not match"),
        ({"eviction": {"idleAfer": "60s"}}, "unknown field"),
        ({"priority": "high"}, "must be an integer"),
        ({"pinned": "yes"}, "must be boolean"),
        ({"admission": {"maxWait": "2 minutes"}}, "does not match"),
        ({"devices": 2, "deviceSelector": {"kind": "gpu", "product": "NVIDIA-A100-SXM4-40GB"}}, None),
        ({"deviceSelector": {"kind": "mig", "profile": "1g.10gb"}}, None),
        ({"deviceSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}}, "keys must be kind, profile"),
        ({"deviceSelector": {"kind": "tpu"}}, "kind must be gpu, mig or unified"),
        ({"devices": 0}, "out of range"),
        ({"devices": 65}, "out of range"),
        ({"devices": "2"}, "must be an integer"),
        ({"devices": True}, "must be an integer"),
        ({"deviceSelector": {"nvidia.com/mig.profile": 1}}, "must be string"),
        ({"deviceSelector": "1g.10gb"}, "must be object"),
    ],
    ids=[
        "minimal",
        "integer-bytes",
        "GB-typo",
        "negative-integer",
        "bool-memory",
        "empty-model",
        "prose-duration",
        "zero-cooldown",
        "negative-replicas",
        "port-zero",
        "port-too-big",
        "non-string-selector",
        "url-no-scheme",
        "url",
        "misspelt-field",
        "template",
        "ref-without-name",
        "template-and-ref",
        "eviction-policy",
        "prose-idle-after",
        "misspelt-idle-after",
        "priority-string",
        "pinned-string",
        "prose-max-wait",
        "tensor-parallel-on-a-product",
        "mig-profile",
        "label-as-selector-key",
        "unknown-device-kind",
        "zero-devices",
        "more-devices-than-any-node",
        "devices-string",
        "devices-bool",
        "non-string-device-selector",
        "device-selector-not-a-map",
    ],
)
def test_the_schema_refuses_what_it_should(spec, error):
    errors = _validate(ROOT, _model(**spec))
    if error is None:
        assert errors == []
    else:
        assert any(error in e for e in errors), errors


def test_required_spec_fields():
    errors = _validate(ROOT, {"apiVersion": "x", "kind": "InferenceModel", "spec": {}})
    assert ".spec.modelName: required" in errors and ".spec.memory: required" in errors


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_pass_the_schema(sample: Path):
    documents = _documents(sample)
    assert documents
    for document in documents:
        assert document["apiVersion"] == "inference.eh-ops.io/v1alpha1"
        assert document["kind"] == "InferenceModel"
        assert _validate(ROOT, document) == [], document["metadata"]["name"]


def test_samples_are_the_seed_scenario():
    (llama,) = _documents(SAMPLES[0])
    assert llama["metadata"]["name"] == "llama-2-7b"
    assert {k: llama["spec"][k] for k in ("modelName", "memory", "nodeSelector", "cooldownPeriod", "port")} == {
        "modelName": "llama-2-7b",
        "memory": "16Gi",
        "nodeSelector": {"inference-pool": "gpu-nodes"},
        "cooldownPeriod": "10m",
        "port": 8000,
    }
    (container,) = llama["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("vllm/vllm-openai:")
    assert "--served-model-name=llama-2-7b" in container["args"] and "--port=8000" in container["args"]

    seed = {d["metadata"]["name"]: d["spec"] for d in _documents(SAMPLES[1])}
    assert {name: spec["memory"] for name, spec in seed.items()} == {
        "model-a": "80Gi",
        "model-b": "60Gi",
        "model-c": "16Gi",
    }
    assert all("template" in spec for spec in seed.values())


@pytest.mark.parametrize(
    "capture", ["admission-create-inferencemodel.json", "admission-update-inferencemodel-status.json"]
)
def test_inference_models_captured_from_a_real_apiserver_pass_the_schema(capture: str):
    request = json.loads((CAPTURED / capture).read_text())["request"]
    for obj in (request["object"], request.get("oldObject")):
        if obj is not None:
            assert _validate(ROOT, obj) == []
