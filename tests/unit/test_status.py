"""The status document (`budget.status`) and `ibc status`: the numbers a user reads after a 429.

The seed scenario's status must say what its 429 says (same function); per-node and per-pool room,
states and timers are checked on small tables; `ibc status` is checked against golden output on
fixed snapshots at a fixed `--now`.
"""

import json
import os
from pathlib import Path

import pytest

from budget import ClusterView, Model, Node, Placement, Reservation, decide_scale, explain
from budget.objects import parse_time
from budget.snapshot import load_snapshot
from budget.status import Counters, Refusal, build_status, observed_peaks, status_body
from ibc.__main__ import main

pytestmark = pytest.mark.unit

GI = 2**30
ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed-scenario.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "status"
NOW = 1_000_000.0


def test_seed_status_matches_the_429():
    """After model-b's 429, /status says the same: its numbers come from the same decision."""
    snap = load_snapshot(SEED)
    now = snap.captured_at
    decision = decide_scale(snap.view, "default/model-b", 1, now)
    body = explain(decision)
    assert not decision.allowed and body["available"] == "48Gi"  # the seed's 429

    counters = Counters(refusals={"default/model-b": Refusal(now, decision)})
    doc = status_body(build_status(snap.view, now, counters))
    models = {m["name"]: m for m in doc["models"]}

    refusal = models["model-b"]["last_refusal"]
    for field in ("message", "requested", "available", "blocking", "retry_after_seconds"):
        assert refusal[field] == body[field], field
    assert refusal["reason"] == body["error"] == "insufficient_memory"
    # What a user reads elsewhere on the page agrees with the 429 too.
    assert doc["pools"][0]["largest_placeable"] == body["available"]
    assert doc["nodes"][0]["largest_placeable"] == body["available"]
    assert models["model-b"]["next_start"]["available"] == body["available"]
    assert models["model-b"]["next_start"]["blocking"] == body["blocking"]
    assert models["model-a"]["idle_for"] == body["blocking"][0]["idle_for"] == "120s"
    assert models["model-a"]["cooldown_remaining_seconds"] == decision.retry_after_seconds == 480


def _view(nodes, models, placements=(), reservations=()):
    return ClusterView.build(nodes=nodes, models=models, placements=placements, reservations=reservations)


def _node(name, gi, pool="gpu"):
    return Node(name, {"pool": pool}, gi * GI, "annotation")


def _model(name, gi, replicas=0, cooldown=600.0, pool="gpu", last=None):
    return Model("ns", name, gi * GI, name, {"pool": pool}, cooldown, replicas, last)


def _placed(model, node, gi, ready=True, started=NOW - 100):
    return Placement(
        f"ns/{model}-{node}", node, gi * GI, f"ns/{model}", uid=f"{model}-{node}", started_at=started, ready=ready
    )


# (id, view, {node: (used Gi, free Gi, largest placeable Gi)}, {model: state})
ROOM = [
    (
        "one-model-running",
        _view([_node("n1", 128)], [_model("a", 80, 1)], [_placed("a", "n1", 80)]),
        {"n1": (80, 48, 48)},
        {"a": "ready"},
    ),
    (
        "extender-reservation-counts-as-used",
        _view(
            [_node("n1", 100)],
            [_model("a", 30, 1)],
            reservations=[Reservation("uid-1", "ns/a", 30 * GI, NOW + 30, "n1", "ns/a-pod")],
        ),
        {"n1": (30, 70, 70)},
        {"a": "starting"},
    ),
    (
        "expired-reservation-is-free",
        _view(
            [_node("n1", 100)],
            [_model("a", 30, 0)],
            reservations=[Reservation("uid-1", "ns/a", 30 * GI, NOW - 1, "n1", "ns/a-pod")],
        ),
        {"n1": (0, 100, 100)},
        {"a": "stopped"},
    ),
    (
        "admitted-not-placed-takes-room-from-what-fits",
        _view([_node("n1", 100), _node("n2", 50)], [_model("a", 60, 1), _model("b", 10)]),
        {"n1": (0, 100, 40), "n2": (0, 50, 50)},
        {"a": "starting", "b": "stopped"},
    ),
    (
        "scaled-to-zero-but-still-holding-is-stopping",
        _view([_node("n1", 100)], [_model("a", 60, 0)], [_placed("a", "n1", 60)]),
        {"n1": (60, 40, 40)},
        {"a": "stopping"},
    ),
    (
        "not-ready-replica-is-starting",
        _view([_node("n1", 100)], [_model("a", 60, 1)], [_placed("a", "n1", 60, ready=False)]),
        {"n1": (60, 40, 40)},
        {"a": "starting"},
    ),
    (
        "unbudgeted-node-not-shown",
        _view([_node("n1", 100), Node("cpu-1", {"pool": "gpu"})], [_model("a", 10)]),
        {"n1": (0, 100, 100)},
        {"a": "stopped"},
    ),
]


@pytest.mark.parametrize(("view", "nodes", "states"), [r[1:] for r in ROOM], ids=[r[0] for r in ROOM])
def test_room_per_node_and_state_per_model(view, nodes, states):
    doc = status_body(build_status(view, NOW))
    got = {
        n["name"]: (n["used_bytes"] // GI, n["free_bytes"] // GI, n["largest_placeable_bytes"] // GI)
        for n in doc["nodes"]
    }
    assert got == nodes
    assert {m["name"]: m["state"] for m in doc["models"]} == states


def test_pools_split_by_node_selector_and_sum_their_nodes():
    view = _view(
        [_node("g1", 80), _node("g2", 80), _node("mac", 192, pool="unified")],
        [_model("big", 70, 2), _model("small", 4, pool="unified")],
        [_placed("big", "g1", 70), _placed("big", "g2", 70)],
    )
    pools = {p["name"]: p for p in status_body(build_status(view, NOW))["pools"]}
    gpu, unified = pools["pool=gpu"], pools["pool=unified"]
    assert (gpu["nodes"], gpu["capacity"], gpu["used"], gpu["free"], gpu["largest_placeable"]) == (
        ["g1", "g2"],
        "160Gi",
        "140Gi",
        "20Gi",
        "10Gi",
    )
    assert (unified["nodes"], unified["free"], unified["models"]) == (["mac"], "192Gi", ["ns/small"])


# (id, model, placements, expected idle_for_seconds, expected cooldown_remaining_seconds)
TIMERS = [
    ("idle-since-start", _model("a", 10, 1), [_placed("a", "n1", 10, started=NOW - 100)], 100.0, 500.0),
    (
        "request-after-start",
        _model("a", 10, 1, last=NOW - 30),
        [_placed("a", "n1", 10, started=NOW - 100)],
        30.0,
        570.0,
    ),
    ("cooldown-over", _model("a", 10, 1, cooldown=60), [_placed("a", "n1", 10, started=NOW - 100)], 100.0, 0.0),
    ("never-idles-out", _model("a", 10, 1, cooldown=0), [_placed("a", "n1", 10, started=NOW - 100)], 100.0, None),
    ("not-running-no-timer", _model("a", 10, 0, last=NOW - 30), [], None, None),
]


@pytest.mark.parametrize(
    ("model", "placements", "idle", "remaining"), [t[1:] for t in TIMERS], ids=[t[0] for t in TIMERS]
)
def test_idle_and_cooldown_timers(model, placements, idle, remaining):
    view = _view([_node("n1", 100)], [model], placements)
    (m,) = status_body(build_status(view, NOW))["models"]
    assert (m["idle_for_seconds"], m["cooldown_remaining_seconds"]) == (idle, remaining)


def test_counters_from_the_request_path_are_shown():
    view = _view([_node("n1", 100)], [_model("a", 80, 1)], [_placed("a", "n1", 80)])
    counters = Counters(
        states={"ns/a": "failed"}, held={"ns/a": 3}, queue_limit=256, observed_peak_bytes={"ns/a": 50 * GI}
    )
    (m,) = status_body(build_status(view, NOW, counters))["models"]
    assert (m["state"], m["held_requests"], m["queue_limit"], m["observed_peak"]) == ("failed", 3, 256, "50Gi")
    assert m["advice"]["recommended_memory"] == "52Gi"  # the controller's advice: peak plus headroom


def test_models_are_sorted_largest_holder_first():
    view = _view(
        [_node("n1", 200)],
        [_model("small", 10, 1), _model("big", 100), _model("mid", 50, 1)],
        [_placed("small", "n1", 10), _placed("mid", "n1", 50)],
    )
    assert [m["name"] for m in status_body(build_status(view, NOW))["models"]] == ["mid", "small", "big"]


# (id, objects, expected peaks)
PEAKS = [
    (
        "written-by-the-controller",
        [
            {
                "kind": "InferenceModel",
                "metadata": {"name": "a", "namespace": "x"},
                "status": {"observedPeakMemory": "52Gi"},
            }
        ],
        {"x/a": 52 * GI},
    ),
    (
        "list-items-without-kind",
        [{"metadata": {"name": "a"}, "status": {"observedPeakMemory": "1Gi"}}],
        {"default/a": GI},
    ),
    (
        "malformed-quantity-skipped",
        [{"kind": "InferenceModel", "metadata": {"name": "a"}, "status": {"observedPeakMemory": "lots"}}],
        {},
    ),
    ("no-status", [{"kind": "InferenceModel", "metadata": {"name": "a"}}], {}),
    ("other-kinds-ignored", [{"kind": "Pod", "metadata": {"name": "a"}, "status": {"observedPeakMemory": "1Gi"}}], {}),
]


@pytest.mark.parametrize(("objects", "peaks"), [p[1:] for p in PEAKS], ids=[p[0] for p in PEAKS])
def test_observed_peaks_from_objects(objects, peaks):
    assert observed_peaks(objects) == peaks


# ----- ibc status -----

GOLDEN = [
    ("seed", SEED, "2026-01-15T10:32:00Z", "seed-status.txt"),
    ("seed-later", SEED, "2026-01-15T10:41:00Z", "seed-status-later.txt"),
    ("two-pools", FIXTURES / "two-pools.yaml", "2026-03-01T12:00:00Z", "two-pools-status.txt"),
    ("gpu-devices", ROOT / "examples" / "gpu-devices.yaml", "2026-01-15T10:32:00Z", "gpu-devices-status.txt"),
]


@pytest.mark.parametrize(("snapshot", "now", "golden"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_ibc_status_golden_output(snapshot, now, golden, capsys, monkeypatch):
    """The terminal table, byte for byte (IBC_UPDATE_GOLDEN=1 rewrites the files; review the diff)."""
    monkeypatch.chdir(ROOT)
    assert main(["status", "--cluster-state", str(snapshot.relative_to(ROOT)), "--now", now]) == 0
    out = capsys.readouterr().out
    path = FIXTURES / golden
    if os.environ.get("IBC_UPDATE_GOLDEN"):
        path.write_text(out)
    assert out == path.read_text()


def test_ibc_status_json_is_the_status_document(capsys):
    assert main(["status", "--cluster-state", str(SEED), "--output", "json", "--now", "2026-01-15T10:32:00Z"]) == 0
    doc = json.loads(capsys.readouterr().out)
    snap = load_snapshot(SEED)
    expected = status_body(build_status(snap.view, parse_time("2026-01-15T10:32:00Z"), source=f"snapshot {SEED}"))
    assert doc == json.loads(json.dumps(expected))


def test_ibc_status_watch_redraws_in_place(capsys):
    assert main(["status", "--cluster-state", str(SEED), "--watch", "0.01", "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\x1b[H\x1b[2J") == 3 and out.count("NODE") == 3


BAD = [
    ("watch-zero", ["--cluster-state", str(SEED), "--watch", "0"], "--watch 0"),
    ("count-zero", ["--cluster-state", str(SEED), "--watch", "--count", "0"], "--count 0"),
    ("url-and-file", ["--url", "http://127.0.0.1:1", "--cluster-state", str(SEED)], "give one"),
    ("now-with-url", ["--now", "2026-01-15T10:32:00Z"], "--now applies"),
    ("bad-now", ["--cluster-state", str(SEED), "--now", "yesterday"], "--now"),
    ("missing-file", ["--cluster-state", "/nonexistent.yaml"], "no such file"),
    ("missing-kubeconfig", ["--kubeconfig", "/nonexistent"], "no such file"),
]


@pytest.mark.parametrize(("argv", "said"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_ibc_status_bad_input_is_one_line(argv, said, capsys):
    code = main(["status", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and said in err and len(err.splitlines()) == 1, err
    assert err.startswith("ibc status: ")


def test_docs_show_the_golden_output():
    """docs/status.md shows `ibc status` as it prints (the golden file), so the docs cannot drift."""
    docs = (ROOT / "docs" / "status.md").read_text()
    assert (FIXTURES / "seed-status.txt").read_text() in docs
    for image in ("status-page.png", "status-page-phone.png"):
        assert image in docs and (ROOT / "docs" / image).read_bytes()[:4] == b"\x89PNG"


BAD_CONTROL = [
    ("wait-negative", ["start", "model-a", "--wait", "-1"], "--wait -1"),
    ("wait-too-long", ["start", "model-a", "--wait", "99999"], "--wait 99999"),
    ("url-and-kubeconfig", ["stop", "model-a", "--url", "http://x", "--kubeconfig", "/k"], "not both"),
    ("missing-kubeconfig", ["stop", "model-a", "--kubeconfig", "/nonexistent"], "no such file"),
    ("missing-key-file", ["start", "model-a", "--api-key-file", "/nonexistent"], "--api-key-file /nonexistent"),
    ("url-without-scheme", ["stop", "model-a", "--url", "127.0.0.1:8080"], "--url 127.0.0.1:8080"),
]


@pytest.mark.parametrize(("argv", "said"), [b[1:] for b in BAD_CONTROL], ids=[b[0] for b in BAD_CONTROL])
def test_ibc_start_stop_bad_input_is_one_line(argv, said, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and err.startswith(f"ibc {argv[0]}: "), err
    assert code == 2
