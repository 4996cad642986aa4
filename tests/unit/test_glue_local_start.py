"""Starting and idling out under `ibc local`: which devices a process gets, which replicas a cooldown stops, and
what the log says when it does.

A fake runtime stands in for processes (tests/unit/test_local_scaler.py); the spawned ProcessSpec is what the
real runtime would run (its environment and devices), so it is the thing asserted on.
"""

import logging

import pytest

from local.runtime import Phase, ProcessSpec
from tests.unit.test_glue_local_state import make_scaler

pytestmark = pytest.mark.unit


def _model(name, memory, **extra):
    return {"name": name, "memory": memory, "command": f"serve {name} --port {{port}}", **extra}


GPUS = {
    "nodes": [
        {"name": "box", "devices": "2x40Gi", "labels": {"kind": "gpu"}, "env": {"NODE": "box"}},
        {"name": "cpu", "memory": "8Gi", "labels": {"kind": "cpu"}, "env": {"NODE": "cpu"}},
    ],
    "models": [
        _model("one", "30Gi", node_selector={"kind": "gpu"}),
        _model("split", "60Gi", devices=2, node_selector={"kind": "gpu"}),
        _model("tiny", "1Gi", node_selector={"kind": "cpu"}, env={"NODE": "mine"}),
    ],
}

STARTS = [
    # (id, model, replicas, per process: (node, devices, CUDA_VISIBLE_DEVICES or None))
    ("one-per-gpu", "one", 2, [("box", (0,), "0"), ("box", (1,), "1")]),
    ("split-over-both-gpus", "split", 1, [("box", (0, 1), "0,1")]),
    ("a-node-without-devices-sets-none", "tiny", 2, [("cpu", (), None), ("cpu", (), None)]),
]


@pytest.mark.parametrize("name, replicas, procs", [c[1:] for c in STARTS], ids=[c[0] for c in STARTS])
def test_each_process_sees_only_the_devices_the_decision_gave_it(name, replicas, procs):
    scaler, runtime = make_scaler(GPUS)
    seen = []
    runtime.on_spawn = lambda proc: seen.append([(p.node, p.devices, p.state) for p in scaler.view().placements])
    scaler.scale_up(name, replicas)
    got = [
        (p.spec.node, p.spec.devices, p.spec.env.get("CUDA_VISIBLE_DEVICES"), p.spec.env.get("HIP_VISIBLE_DEVICES"))
        for p in runtime.spawned
    ]
    assert got == [(node, devices, env, env) for node, devices, env in procs]
    # While the first is forked, every granted one already holds its devices (a second start cannot take them).
    assert seen[0] == [(node, devices or (0,), "starting") for node, devices, _ in procs]
    # The model's env wins over the node's; the devices variables are ibc's alone.
    assert {p.spec.env.get("NODE") for p in runtime.spawned} == {"mine" if name == "tiny" else "box"}


def test_a_gpu_freed_by_an_exit_is_the_one_given_next_not_a_busy_one():
    scaler, runtime = make_scaler(GPUS)
    scaler.scale_up("one", 2)
    first, second = runtime.spawned
    for proc in runtime.spawned:
        runtime.ready(proc)
    runtime.stop(first)
    runtime.exit(first, 0)  # GPU 0 is free again; GPU 1 still holds 30Gi of its 40Gi
    scaler.scale_up("one", 2)
    third = runtime.spawned[-1]
    assert (second.spec.devices, third.spec.devices) == ((1,), (0,))
    assert third.spec.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert [(p.node, p.devices) for p in scaler.view().placements] == [("box", (1,)), ("box", (0,))]


COOLDOWN = {
    "nodes": [{"name": "shadow", "memory": "128Gi"}],
    "models": [
        _model("model-z", "16Gi", cooldown="0"),
        _model("model-c", "16Gi", cooldown="90s", max_replicas=3),
        _model("model-s", "1Gi", cooldown="1s"),
        _model("model-a", "80Gi", cooldown="10m"),
    ],
}

IDLE = [
    # (id, model, phases of its processes, seconds idle, stopped, the log line)
    ("cooldown-over", "model-a", ("ready",), 600, ["model-a"],
     "model-a idle for 600s (cooldown 600s): stopping it to free 80Gi"),
    ("a-second-short", "model-a", ("ready",), 599, [], None),
    ("every-ready-replica-goes", "model-c", ("ready", "ready"), 95, ["model-c"],
     "model-c idle for 95s (cooldown 90s): stopping it to free 32Gi"),
    ("a-replica-starting-keeps-it", "model-c", ("ready", "starting"), 3600, [], None),
    ("only-a-stopping-one-left", "model-c", ("stopping",), 3600, [], None),
    ("cooldown-0-never", "model-z", ("ready",), 10**6, [], None),
    ("a-one-second-cooldown", "model-s", ("ready",), 1, ["model-s"],
     "model-s idle for 1s (cooldown 1s): stopping it to free 1Gi"),
]  # fmt: skip


@pytest.mark.parametrize("name, phases, idle, stopped, line", [c[1:] for c in IDLE], ids=[c[0] for c in IDLE])
def test_the_cooldown_stops_a_model_idle_that_long(name, phases, idle, stopped, line, caplog):
    scaler, runtime = make_scaler(COOLDOWN)
    scaler.scale_up(name, len(phases))
    for proc, phase in zip(runtime.spawned, phases, strict=True):
        if phase != "starting":
            runtime.ready(proc)
        if phase == "stopping":
            runtime.stop(proc)
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        assert scaler.stop_idle(now=runtime.clock.now + idle) == stopped
    assert [r.getMessage() for r in caplog.records] == ([line] if line else [])
    if stopped:
        assert [p.phase for p in runtime.spawned] == [Phase.STOPPING] * len(phases)


def test_a_start_in_flight_keeps_a_model_from_idling_out():
    scaler, runtime = make_scaler(COOLDOWN)
    scaler.scale_up("model-c", 1)
    runtime.ready(runtime.spawned[0])
    runtime.clock.now += 3600
    seen = []
    runtime.on_spawn = lambda _proc: seen.append(scaler.stop_idle())
    scaler.scale_up("model-c", 2)  # someone waits for the second replica: the model is not idle
    assert seen == [[]]
    assert runtime.stopped == []


OTHERS = [
    # (id, model-z and model-c, listed before model-a: their phases and seconds since their last request)
    ("one-without-cooldown", {"model-z": (("ready",), 600)}),
    ("one-not-running", {}),
    ("one-starting-again", {"model-c": (("ready", "starting"), 600)}),
    ("one-used-recently", {"model-c": (("ready",), 10)}),
]


@pytest.mark.parametrize("others", [c[1] for c in OTHERS], ids=[c[0] for c in OTHERS])
def test_a_model_kept_running_does_not_keep_the_next_one_from_idling_out(others):
    scaler, runtime = make_scaler(COOLDOWN)
    for name, (phases, _) in others.items():
        scaler.scale_up(name, len(phases))
        for proc, phase in zip(runtime.spawned[-len(phases) :], phases, strict=True):
            if phase == "ready":
                runtime.ready(proc)
    scaler.scale_up("model-a", 1)
    runtime.ready(runtime.spawned[-1])
    for name, (_, idle) in others.items():
        scaler.touch(name, runtime.clock.now + 600 - idle)
    assert scaler.stop_idle(now=runtime.clock.now + 600) == ["model-a"]


def test_the_process_is_run_as_the_config_says(tmp_path):
    config = {
        "nodes": [{"name": "box", "memory": "8Gi", "env": {"NODE": "box", "HOME": "/srv"}}],
        "models": [
            _model(
                "m",
                "1Gi",
                command="serve --port {port} --node {node} --model {model}",
                health="http://127.0.0.1:{port}/ready?node={node}",
                startup_timeout="2m",
                stop_grace_period="7s",
                env={"NODE": "mine"},
            )
        ],
    }
    scaler, runtime = make_scaler(config, log_dir=str(tmp_path))
    scaler.scale_up("m", 1)
    (proc,) = runtime.spawned
    assert proc.spec == ProcessSpec(
        owner="local/m",
        name="m",
        argv=("serve", "--port", "20000", "--node", "box", "--model", "m"),
        port=20000,
        health_url="http://127.0.0.1:20000/ready?node=box",
        node="box",
        env={"NODE": "mine", "HOME": "/srv"},
        devices=(),
        startup_timeout_seconds=120.0,
        stop_grace_seconds=7.0,
        log_path=str(tmp_path / "m.log"),
    )
