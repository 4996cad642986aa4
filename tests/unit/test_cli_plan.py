"""`ibc plan`: exit codes, the same explanation as the 429, and one-line errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from budget.decide import Blocking
from ibc.commands.plan import _blocking_line

pytestmark = pytest.mark.unit

SEED = "examples/seed-scenario.yaml"


def ibc(*args):
    return subprocess.run([sys.executable, "-m", "ibc", *args], capture_output=True, text=True, timeout=60)


def test_seed_denial_explains_itself():
    r = ibc("plan", "--cluster-state", SEED, "--scale", "default/model-b=1", "--output", "json")
    assert r.returncode == 1
    body = json.loads(r.stdout)
    assert body["error"] == "insufficient_memory"
    assert body["available"] == "48Gi"
    assert body["blocking"] == [{"model": "model-a", "memory": "80Gi", "idle_for": "120s"}]


@pytest.mark.parametrize(
    ("scale", "lines"),
    [
        pytest.param("default/model-b=1", [
            "DOES NOT FIT: model-b needs 60Gi in pool inference-pool=gpu-nodes; 48Gi available; "
            "blocked by model-a (80Gi, idle 120s)",
            "  blocking:  model-a 80Gi, idle 120s, cooldown ends in 480s  <- must go for it to fit",
            "  retry after: 480s",
        ], id="seed-waits-for-model-a"),
        pytest.param("default/model-b=1000", [
            "DOES NOT FIT: model-b cannot have 1000 replica(s) of 60Gi in pool inference-pool=gpu-nodes even with "
            "nothing else running (1 node(s), 128Gi in all); it can never fit without more nodes",
            "  retry after: never (waiting cannot help; see the message)",
        ], id="never-fits-says-so"),
    ],
)
def test_text_output_names_the_plan(scale, lines):
    r = ibc("plan", "--cluster-state", SEED, "--scale", scale)
    assert r.returncode == 1
    for line in lines:
        assert line in r.stdout.splitlines()


@pytest.mark.parametrize(
    ("blocking", "line"),
    [
        pytest.param(Blocking("gone", 80 * 2**30, 3600.0, 0.0, state="orphan", pods=("default/gone-0",)),
                     "gone 80Gi, orphan (its model is gone), frees its memory only when default/gone-0 is deleted",
                     id="orphan-pod"),
        pytest.param(Blocking("gone", 80 * 2**30, 0.0, 0.0, state="orphan", pods=("ns/g-0", "ns/g-1")),
                     "gone 80Gi, orphan (its model is gone), frees its memory only when ns/g-0, ns/g-1 are deleted",
                     id="orphan-pods"),
        pytest.param(Blocking("a", 80 * 2**30, 120.0, 0.0), "a 80Gi, idle 120s, never frees its memory on its own "
                     "(cooldown 0)", id="no-cooldown"),
    ],
)
def test_blocking_lines(blocking, line):
    assert _blocking_line(blocking) == line


def test_never_fits_json_has_no_retry():
    r = ibc("plan", "--cluster-state", SEED, "--scale", "default/model-b=1000", "--output", "json")
    body = json.loads(r.stdout)
    assert (body["error"], body["retry_after_seconds"]) == ("exceeds_pool_capacity", None)


def test_fit_exits_zero_with_text():
    r = ibc("plan", "--cluster-state", SEED, "--scale", "model-c=1")
    assert r.returncode == 0
    assert r.stdout.startswith("FITS: model-c")


def test_now_override_changes_idle_time():
    r = ibc("plan", "--cluster-state", SEED, "--scale", "model-b=1", "--now", "2026-01-15T10:35:00Z")
    assert r.returncode == 1
    assert "idle 300s" in r.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["--cluster-state", "absent.yaml", "--scale", "m=1"], "absent.yaml: no such file", id="no-file"),
        pytest.param(["--cluster-state", SEED, "--scale", "model-b"], "expected NAMESPACE/NAME=REPLICAS",
                     id="no-count"),
        pytest.param(["--cluster-state", SEED, "--scale", "model-b=-1"], "expected NAMESPACE/NAME=REPLICAS",
                     id="negative"),
        pytest.param(["--cluster-state", SEED, "--scale", "other/model-b=1"], "unknown model 'other/model-b'",
                     id="unknown-model"),
        pytest.param(["--cluster-state", SEED, "--scale", "model-b=1", "--now", "noon"], "--now", id="bad-now"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    r = ibc("plan", *args)
    assert r.returncode == 2
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_is_useful():
    top = ibc("--help")
    assert top.returncode == 0
    for command in ("plan", "local", "proxy", "extender", "webhook", "controller", "certs", "mock-backend"):
        assert command in top.stdout
    plan = ibc("plan", "--help")
    assert "--cluster-state" in plan.stdout and "Exit 0 when it fits" in plan.stdout


GPUS = "examples/gpu-devices.yaml"


@pytest.mark.parametrize(
    ("scale", "code", "placements", "available", "lines"),
    [
        pytest.param("default/llama-60g=1", 0, [{"node": "gpu-node-2", "devices": [0]}], "80Gi",
                     ["  placement: gpu-node-2 GPU 0"], id="60gi-goes-to-the-80gi-gpu-not-the-2x40gi-node"),
        pytest.param("default/llama-tp2=1", 1, [], "2 x 10Gi on gpu-node-1",
                     ["  requested: llama-tp2 x1 at 70Gi each over 2 devices",
                      "  blocking:  mistral 30Gi, idle 120s, cooldown ends in 480s  <- must go for it to fit"],
                     id="tensor-parallel-waits-for-the-gpu-mistral-holds"),
        pytest.param("default/mistral=2", 0, [{"node": "gpu-node-1", "devices": [1]}], "80Gi",
                     ["  placement: gpu-node-1 GPU 1"], id="second-replica-on-the-other-gpu"),
        pytest.param("default/mistral=4", 0,
                     [{"node": "gpu-node-1", "devices": [1]}, {"node": "gpu-node-2", "devices": [0]},
                      {"node": "gpu-node-2", "devices": [0]}], "80Gi",
                     ["  placement: gpu-node-1 GPU 1", "  placement: gpu-node-2 GPU 0"], id="two-share-the-80gi-gpu"),
    ],
)
def test_plan_places_per_device(scale, code, placements, available, lines):
    as_json = ibc("plan", "--cluster-state", GPUS, "--scale", scale, "--output", "json")
    body = json.loads(as_json.stdout)
    assert (as_json.returncode, body["placements"], body["available"]) == (code, placements, available)
    text = ibc("plan", "--cluster-state", GPUS, "--scale", scale).stdout.splitlines()
    for line in lines:
        assert line in text
