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


# (id, view, model asking) -> next_start must carry the very retry hint its 429 carries
RETRY_HINTS = [
    ("no-node-in-pool", lambda: _view([_node("g1", 80)], [_model("a", 8, pool="tpu")]), "ns/a", None),
    ("larger-than-any-node", lambda: _view([_node("g1", 80)], [_model("a", 100)]), "ns/a", None),
    (
        "waits-for-cooldown",
        lambda: _view(
            [_node("g1", 80)], [_model("b", 60, 1, last=NOW - 100), _model("a", 40)], [_placed("b", "g1", 60)]
        ),
        "ns/a",
        500,
    ),
    (
        "blocker-without-cooldown-uses-the-default",
        lambda: _view(
            [_node("g1", 80)], [_model("b", 60, 1, cooldown=0.0), _model("a", 40)], [_placed("b", "g1", 60)]
        ),
        "ns/a",
        30,
    ),
]


@pytest.mark.parametrize(("make", "ask", "hint"), [r[1:] for r in RETRY_HINTS], ids=[r[0] for r in RETRY_HINTS])
def test_next_start_gives_the_retry_hint_of_its_429(make, ask, hint):
    """`/status` next_start and the 429 for the same request agree; null where waiting cannot help."""
    view = make()
    body = explain(decide_scale(view, ask, 1, NOW))
    doc = status_body(build_status(view, NOW))
    start = {m["key"]: m["next_start"] for m in doc["models"]}[ask]
    assert body["retry_after_seconds"] == start["retry_after_seconds"] == hint


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
    ("status-not-a-map", [{"kind": "InferenceModel", "metadata": {"name": "a"}, "status": "Ready"}], {}),
    ("metadata-not-a-map", [{"kind": "InferenceModel", "metadata": "a", "status": {"observedPeakMemory": "1Gi"}}], {}),
    (
        "a-malformed-one-hides-nothing-after-it",
        [
            {"kind": "InferenceModel", "metadata": {"name": "a"}, "status": {"observedPeakMemory": "lots"}},
            {
                "kind": "InferenceModel",
                "metadata": {"name": "b", "namespace": "x"},
                "status": {"observedPeakMemory": "2Gi"},
            },
        ],
        {"x/b": 2 * GI},
    ),
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


def test_ibc_status_says_waiting_will_not_help_when_nothing_frees_up():
    """A model whose pool has no node: the table says so, not `retry after 0s` (or `Nones`)."""
    from ibc.commands.status import render

    view = _view([_node("g1", 80)], [_model("lost", 8, pool="tpu")])
    text = render(status_body(build_status(view, NOW)))
    assert "  lost: 429 no_matching_nodes, waiting will not help: lost needs 8Gi but no budgeted node" in text


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


# ----- the whole document, every field, on one cluster a user could draw on a whiteboard -----


def _whole_cluster():
    """Two GPU nodes and a CPU node (pool=gpu), one Mac (pool=unified); five models in five situations.

    g1 (80Gi): org/big's ready replica (70Gi, asked 40 s ago, cooldown 600 s) and a leftover 10Gi pod of a
    model since deleted (ghost): g1 is full. g2 (48Gi, GFD): half's ready replica (20Gi, asked 250 s ago,
    cooldown 300 s, start time unknown) and its second replica's extender reservation (20Gi, 30 s left);
    an expired reservation of cold frees nothing. cold-v2 (30Gi) holds nothing and was refused 15 s ago;
    small (4Gi, no cooldown) would fit on the Mac, where ghost still has a reservation (2Gi); lost (8Gi)
    asks for pool=tpu, which no node is in.
    """
    nodes = [
        Node("g1", {"pool": "gpu"}, 80 * GI, "annotation"),
        Node("g2", {"pool": "gpu"}, 48 * GI, "gfd-labels"),
        Node("mac", {"pool": "unified"}, 192 * GI, "annotation"),
        Node("cpu", {"pool": "gpu"}),
    ]
    models = [
        Model("ns", "big", 70 * GI, "org/big", {"pool": "gpu"}, 600.0, 1, NOW - 40),
        Model("ns", "half", 20 * GI, "", {"pool": "gpu"}, 300.0, 2, NOW - 250),
        Model("ns", "cold", 30 * GI, "cold-v2", {"pool": "gpu"}, 600.0, 0, None),
        Model("ns", "small", 4 * GI, "", {"pool": "unified"}, 0.0, 0, None),
        Model("ns", "lost", 8 * GI, "", {"pool": "tpu"}, 1.0, 0, None),
    ]
    placements = [
        Placement("ns/big-0", "g1", 70 * GI, "ns/big", uid="u-big", started_at=NOW - 100, ready=True),
        Placement("ns/ghost-0", "g1", 10 * GI, "ns/ghost", uid="u-ghost", started_at=NOW - 5000, ready=True),
        Placement("ns/half-0", "g2", 20 * GI, "ns/half", uid="u-h0", started_at=None, ready=True),
    ]
    reservations = [
        Reservation("u-h1", "ns/half", 20 * GI, NOW + 30, "g2", "ns/half-1"),
        Reservation("u-old", "ns/cold", 30 * GI, NOW - 1, "g2", "ns/cold-0"),
        Reservation("u-ghost-1", "ns/ghost", 2 * GI, NOW + 60, "mac", "ns/ghost-1"),
    ]
    return _view(nodes, models, placements, reservations)


def _replica(name, key, node, pod, gi, ready, reserved):
    return {
        "model": name,
        "key": key,
        "node": node,
        "pod": pod,
        "memory": f"{gi}Gi",
        "memory_bytes": gi * GI,
        "ready": ready,
        "reserved": reserved,
    }


def _room_fields(capacity, used, free, placeable):
    def text(gi):
        return f"{gi}Gi" if gi else "0"

    return {
        "capacity": text(capacity),
        "capacity_bytes": capacity * GI,
        "used": text(used),
        "used_bytes": used * GI,
        "free": text(free),
        "free_bytes": free * GI,
        "largest_placeable": text(placeable),
        "largest_placeable_bytes": placeable * GI,
    }


BIG_0 = _replica("org/big", "ns/big", "g1", "ns/big-0", 70, True, False)
GHOST_0 = _replica("ns/ghost", "ns/ghost", "g1", "ns/ghost-0", 10, True, False)  # no model: named by its key
GHOST_1 = _replica("ns/ghost", "ns/ghost", "mac", "ns/ghost-1", 2, False, True)
HALF_0 = _replica("half", "ns/half", "g2", "ns/half-0", 20, True, False)
HALF_1 = _replica("half", "ns/half", "g2", "ns/half-1", 20, False, True)
COLD_BLOCKERS = [
    {"model": "half", "memory": "40Gi", "idle_for": "0s", "state": "starting"},
    {"model": "org/big", "memory": "70Gi", "idle_for": "40s"},
    # Its model is gone: not "starting" (nothing will start it), and named by the pods a user must delete.
    {"model": "ghost", "memory": "10Gi", "idle_for": "5000s", "state": "orphan", "pods": ["ns/ghost-0", "ns/ghost-1"]},
]
COLD_MESSAGE = (
    "cold-v2 needs 30Gi in pool pool=gpu; 8Gi available; blocked by half (40Gi, starting), "
    "org/big (70Gi, idle 40s), ghost (10Gi, orphan pods ns/ghost-0, ns/ghost-1: its model is gone); "
    "it fits once half is gone, in 300s"
)
LOST_MESSAGE = "lost needs 8Gi but no budgeted node matches pool pool=tpu"


def _model_fields(name, key, gi, pool, cooldown, **rest):
    out = {
        "name": name,
        "key": key,
        "state": "stopped",
        "pool": pool,
        "replicas": {"desired": 0, "ready": 0, "holding": 0},
        "memory": f"{gi}Gi",
        "memory_bytes": gi * GI,
        "held": "0",
        "held_bytes": 0,
        "placements": [],
        "idle_for": None,
        "idle_for_seconds": None,
        "cooldown": f"{cooldown:.0f}s" if cooldown else None,
        "cooldown_seconds": cooldown,
        "cooldown_remaining": None,
        "cooldown_remaining_seconds": None,
        "held_requests": 0,
        "queue_limit": 64,
        "last_refusal": None,
        "observed_peak": None,
        "observed_peak_bytes": None,
        "advice": None,
        "next_start": None,
    }
    assert set(rest) <= set(out), set(rest) - set(out)
    return {**out, **rest}


WHOLE_DOCUMENT = {
    "now": "1970-01-12T13:46:40Z",
    "now_seconds": NOW,
    "source": "whiteboard",
    "pools": [
        # g1 + g2 (the CPU node has no budget): 8Gi is the most one replica can get (on g2; g1 is full).
        {"name": "pool=gpu", "nodes": ["g1", "g2"], "models": ["ns/big", "ns/cold", "ns/half"]}
        | _room_fields(128, 120, 8, 8),
        {"name": "pool=tpu", "nodes": [], "models": ["ns/lost"]} | _room_fields(0, 0, 0, 0),
        {"name": "pool=unified", "nodes": ["mac"], "models": ["ns/small"]} | _room_fields(192, 2, 190, 190),
    ],
    "nodes": [
        {"name": "g1"} | _room_fields(80, 80, 0, 0) | {"replicas": [BIG_0, GHOST_0]}  # largest first
        | {"devices": [{"index": 0, "label": "memory", "kind": "unified"} | _room_fields(80, 80, 0, 0)]},
        # The live reservation holds its 20Gi; the expired one holds nothing.
        {"name": "g2"} | _room_fields(48, 40, 8, 8) | {"replicas": [HALF_0, HALF_1]}
        | {"devices": [{"index": 0, "label": "memory", "kind": "unified"} | _room_fields(48, 40, 8, 8)]},
        {"name": "mac"} | _room_fields(192, 2, 190, 190) | {"replicas": [GHOST_1]}
        | {"devices": [{"index": 0, "label": "memory", "kind": "unified"} | _room_fields(192, 2, 190, 190)]},
    ],
    "models": [
        _model_fields(
            "org/big",
            "ns/big",
            70,
            "pool=gpu",
            600.0,
            state="ready",
            replicas={"desired": 1, "ready": 1, "holding": 1},
            held="70Gi",
            held_bytes=70 * GI,
            placements=[BIG_0],
            idle_for="40s",
            idle_for_seconds=40.0,
            cooldown_remaining="560s",
            cooldown_remaining_seconds=560.0,
            observed_peak="51201Mi",  # 50Gi and one byte, rounded up to whole Mi for people
            observed_peak_bytes=50 * GI + 1,
            advice={
                "recommendation": "Consider reducing memory to 53Gi for better packing",
                "recommended_memory": "53Gi",
                "utilization_percent": 71,
            },
        ),
        _model_fields(
            "half",
            "ns/half",
            20,
            "pool=gpu",
            300.0,
            state="ready",  # the scaler's word is not a state it knows: the view's word
            replicas={"desired": 2, "ready": 1, "holding": 2},
            held="40Gi",
            held_bytes=40 * GI,
            placements=[HALF_0, HALF_1],
            idle_for="250s",  # its replica's start time is unknown: idle since its last request
            idle_for_seconds=250.0,
            cooldown_remaining="50s",
            cooldown_remaining_seconds=50.0,
            observed_peak="19Gi",
            observed_peak_bytes=19 * GI,
            advice={
                "recommendation": "Declared memory matches observed usage",
                "recommended_memory": None,
                "utilization_percent": 95,
            },
        ),
        _model_fields(
            "cold-v2",
            "ns/cold",
            30,
            "pool=gpu",
            600.0,
            held_requests=2,
            last_refusal={
                "at": "1970-01-12T13:46:25Z",
                "at_seconds": NOW - 15,
                "ago_seconds": 15.0,
                "reason": "insufficient_memory",
                "message": COLD_MESSAGE,
                "requested": {"model": "cold-v2", "memory": "30Gi", "replicas": 1},
                "available": "8Gi",
                "blocking": COLD_BLOCKERS,
                "retry_after_seconds": 300,
            },
            next_start={
                "allowed": False,
                "reason": "insufficient_memory",
                "message": COLD_MESSAGE,
                "available": "8Gi",
                "blocking": COLD_BLOCKERS,
                "retry_after_seconds": 300,
            },
        ),
        _model_fields(
            "lost",
            "ns/lost",
            8,
            "pool=tpu",
            1.0,
            last_refusal={
                "at": "1970-01-12T13:46:40Z",
                "at_seconds": NOW,
                "ago_seconds": 0.0,
                "reason": "no_matching_nodes",
                "message": LOST_MESSAGE,
                "requested": {"model": "lost", "memory": "8Gi", "replicas": 1},
                "available": "0",
                "blocking": [],
                "retry_after_seconds": None,
            },
            next_start={
                "allowed": False,
                "reason": "no_matching_nodes",
                "message": LOST_MESSAGE,
                "available": "0",
                "blocking": [],
                # Nothing will free up in a pool with no node: null, as the 429 (last_refusal) says.
                "retry_after_seconds": None,
            },
        ),
        _model_fields(
            "small",
            "ns/small",
            4,
            "pool=unified",
            0.0,
            next_start={
                "allowed": True,
                "reason": "fits",
                "message": "small fits: 1 new replica(s) of 4Gi in pool pool=unified",
            },
        ),
    ],
}


def test_the_whole_status_document_field_by_field():
    """Every number and word of GET /status on one cluster: what the page, `ibc status` and scripts read."""
    view = _whole_cluster()
    counters = Counters(
        states={"ns/half": "rebooting"},
        held={"ns/cold": 2},
        queue_limit=64,
        refusals={
            "ns/cold": Refusal(NOW - 15, decide_scale(view, "ns/cold", 1, NOW)),
            "ns/lost": Refusal(NOW, decide_scale(view, "ns/lost", 1, NOW)),
        },
        observed_peak_bytes={"ns/big": 50 * GI + 1, "ns/half": 19 * GI},
    )
    doc = status_body(build_status(view, NOW, counters, source="whiteboard"))
    for section in ("pools", "nodes"):
        assert doc[section] == WHOLE_DOCUMENT[section], section
    for got, want in zip(doc["models"], WHOLE_DOCUMENT["models"], strict=True):
        assert got == want, want["name"]
    assert doc == WHOLE_DOCUMENT


def test_a_cluster_without_models_is_one_pool_of_every_budgeted_node():
    view = _view([_node("n1", 100), _node("n2", 28, pool="other"), Node("cpu")], [])
    doc = status_body(build_status(view, NOW))
    assert doc["source"] == "" and doc["models"] == []
    assert doc["pools"] == [
        {"name": "the whole cluster", "nodes": ["n1", "n2"], "models": []} | _room_fields(128, 0, 128, 100)
    ]


# (id, declared memory in bytes, observed peak in bytes, the advice's recommendation or None)
ADVICE = [
    ("no-declared-memory-no-advice", 0, 5 * GI, None),
    ("one-byte-declared-one-byte-peak", 1, 1, "Declared memory matches observed usage"),
    ("peak-above-declared", 8 * GI, 9 * GI, "Observed peak exceeds declared memory: raise memory to 10Gi to avoid OOM"),
]


@pytest.mark.parametrize(("declared", "peak", "recommendation"), [a[1:] for a in ADVICE], ids=[a[0] for a in ADVICE])
def test_advice_needs_declared_memory(declared, peak, recommendation):
    view = _view([_node("n1", 100)], [Model("ns", "a", declared, "", {"pool": "gpu"}, replicas=0)])
    (m,) = status_body(build_status(view, NOW, Counters(observed_peak_bytes={"ns/a": peak})))["models"]
    assert (m["advice"] or {}).get("recommendation") == recommendation
    assert m["observed_peak_bytes"] == peak
