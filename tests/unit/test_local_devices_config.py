"""`ibc local` config per device: a node's `devices:` (the annotation's grammar) and a model's `devices:`."""

import re

import pytest

from budget import Device, decide_scale
from budget.view import ClusterView
from local.config import LocalConfigError, parse_config

pytestmark = pytest.mark.unit

GI = 2**30


def config(node, *models):
    return {"nodes": [{"name": "box", **node}],
            "models": [{"name": f"m{i}", "command": "serve --port {port}", **m} for i, m in enumerate(models)]}


@pytest.mark.parametrize(
    ("node", "model", "devices", "per_replica"),
    [
        pytest.param({"devices": "2x40Gi"}, {"memory": "30Gi"}, [Device(0, 40 * GI), Device(1, 40 * GI)], 1,
                     id="two-gpus"),
        pytest.param({"devices": "80Gi,40Gi"}, {"memory": "70Gi", "devices": 2}, [Device(0, 80 * GI),
                                                                                  Device(1, 40 * GI)], 2,
                     id="tensor-parallel-over-unequal-gpus"),
        pytest.param({"memory": "128Gi"}, {"memory": "80Gi"}, [Device(0, 128 * GI, "unified")], 1,
                     id="memory-is-one-unified-device"),
    ],
)
def test_devices_reach_the_budget(node, model, devices, per_replica):
    parsed = parse_config(config(node, model))
    (n,) = parsed.nodes
    assert list(n.to_node().devices) == devices and n.memory_bytes == sum(d.memory_bytes for d in devices)
    assert parsed.models[0].to_model().devices == per_replica


@pytest.mark.parametrize(
    ("node", "model", "message"),
    [
        pytest.param({"devices": "2x40Gi", "memory": "80Gi"}, {"memory": "1Gi"},
                     "nodes[0]: give memory (one unified-memory budget) or devices (per GPU), not both",
                     id="memory-and-devices"),
        pytest.param({"devices": "2x"}, {"memory": "1Gi"}, "nodes[0].devices: device '2x'", id="bad-grammar"),
        pytest.param({"devices": "2x40Gi", "env": {"CUDA_VISIBLE_DEVICES": "3"}}, {"memory": "1Gi"},
                     "nodes[0].env: CUDA_VISIBLE_DEVICES is set by ibc", id="env-would-be-overridden"),
        pytest.param({"devices": "2x40Gi"}, {"memory": "60Gi"},
                     "'60Gi' is more than the largest matching GPU has (40Gi)", id="larger-than-any-gpu"),
        pytest.param({"devices": "2x40Gi"}, {"memory": "1Gi", "devices": 3},
                     "models[0].devices: 3 devices: no matching node has that many", id="too-many-devices"),
        pytest.param({"devices": "80Gi,40Gi"}, {"memory": "100Gi", "devices": 2},
                     "more than the largest matching 2 devices of one node have (80Gi)", id="split-too-large"),
        pytest.param({"devices": "2x40Gi"}, {"memory": "1Gi", "devices": 0}, "models[0].devices: 0 must be at least 1",
                     id="zero-devices"),
    ],
)
def test_device_mistakes_are_named(node, model, message):
    with pytest.raises(LocalConfigError, match=re.escape(message)):
        parse_config(config(node, model))


def test_a_split_replica_is_placed_on_both_gpus():
    parsed = parse_config(config({"devices": "2x40Gi"}, {"memory": "70Gi", "devices": 2}))
    view = ClusterView.build(nodes=[n.to_node() for n in parsed.nodes], models=[m.to_model() for m in parsed.models])
    d = decide_scale(view, "local/m0", 1, 0.0)
    assert [tuple(s) for s in d.device_placements] == [("box", (0, 1))]


def test_check_prints_the_gpus(tmp_path, capsys):
    from ibc.__main__ import main

    path = tmp_path / "local.yaml"
    path.write_text("nodes:\n  - {name: gpu-box, devices: 2x40Gi}\n"
                    "models:\n  - {name: a, memory: 60Gi, devices: 2, command: 'x --port {port}'}\n")
    assert main(["local", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "  node  gpu-box: 80Gi in GPUs 40Gi,40Gi" in out and "  model a: 60Gi over 2 GPUs, cooldown 600s" in out
