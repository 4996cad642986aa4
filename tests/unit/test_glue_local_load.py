"""`ibc local`'s load layer, one pass at a time: replicas added under load within the budget, taken away when idle.

The rule is the budget's (`budget.load.desired_replicas`, tests/unit/test_load.py); these tests hold the local
scaler to acting on it: which process starts or leaves, what `/v1/models` and `ibc_model_replicas_*` say
(`load_status`), the log lines an operator reads, and the budget's word when it refuses a replica. The proxy's
in-flight counts are a plain dict here and the replicas' own `/metrics` a dict of ReplicaMetrics: no sockets.
"""

import logging

import pytest

from local.runtime import Phase
from serving.signals import ReplicaMetrics
from tests.unit.test_glue_local_state import make_scaler

pytestmark = pytest.mark.unit

URL = "http://127.0.0.1:{}".format


def _model(name, memory, **extra):
    return {"name": name, "memory": memory, "command": f"serve {name} --port {{port}}", **extra}


CHAT = _model(
    "chat",
    "30Gi",
    cooldown="60s",
    stop_grace_period="5s",
    max_replicas=3,
    load={"concurrency": 2, "scale_up_stabilization": "5s", "scale_down_stabilization": "10s"},
)
SIDE = _model("side", "30Gi", cooldown="10m")


def config(*models, memory="100Gi"):
    return {"nodes": [{"name": "shadow", "memory": memory}], "models": list(models)}


class Rig:
    """A scaler, its fake processes, and the two signals the load layer reads (set by the test)."""

    def __init__(self, cfg):
        self.scaler, self.runtime = make_scaler(cfg)
        self.in_flight: dict[str, int] = {}
        self.metrics: dict[str, ReplicaMetrics] = {}
        self.scraped: list[str] = []
        self.scaler.set_signal_source(lambda: self.in_flight)
        self.scaler._scrape = self._scrape  # the replicas' /metrics, without HTTP

    def _scrape(self, url):
        self.scraped.append(url)
        return self.metrics.get(url)

    @property
    def clock(self):
        return self.runtime.clock

    def serve(self, name, replicas):
        """`replicas` ready processes of `name`, started a second apart."""
        for n in range(1, replicas + 1):
            self.scaler.scale_up(name, n)
            self.runtime.ready(self.runtime.spawned[-1])
            self.clock.now += 1

    def live(self, name="chat"):
        return [p.spec.port for p in self.runtime.live() if p.spec.name == name and p.phase is not Phase.STOPPING]

    def balance(self, after=0.0):
        self.clock.now += after
        self.scaler.balance()


def test_a_saturated_replica_gets_a_second_once_the_window_is_over(caplog):
    rig = Rig(config(CHAT))
    rig.serve("chat", 1)
    rig.in_flight = {URL(20000): 7}  # 2 running, 5 waiting: saturated
    rig.balance()
    assert rig.live() == [20000]
    assert rig.scaler.load_status("chat") == (1, 1, "1 of 1 saturated, spare 0.00; waiting out the window")
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        rig.scaler.balance(now=rig.clock.now + 5)  # the pass decides at the time it is given
    assert rig.live() == [20000, 20001]
    assert rig.scaler.load_status("chat") == (2, 2, "1 of 1 saturated, spare 0.00 (margin 0.20)")
    assert [r.getMessage() for r in caplog.records] == [
        "chat: 1 -> 2 replicas (1 of 1 saturated, spare 0.00 (margin 0.20))"
    ]
    assert rig.scaler.details("chat") == {
        "lastFailure": None,
        "lastFailureTime": None,
        "nextStartAttempt": None,
        "recentFailures": [],
        "log": None,
        "minReplicas": 0,
        "maxReplicas": 3,
        "replicasWanted": 2,
        "replicasAllowed": 2,
        "loadMessage": "1 of 1 saturated, spare 0.00 (margin 0.20)",
    }


def test_a_starting_replica_is_not_asked_for_its_metrics_and_holds_the_count():
    rig = Rig(config(_model("chat", "30Gi", max_replicas=3, load={"scale_up_stabilization": "0s"})))
    rig.serve("chat", 1)
    rig.metrics = {URL(20000): ReplicaMetrics(waiting=5, running=2, kv_cache_usage=0.1)}  # its own queue is full
    rig.balance()
    assert rig.live() == [20000, 20001]
    rig.metrics[URL(20001)] = ReplicaMetrics(waiting=9)
    rig.balance(after=1)  # the new one is still starting: wait for it, ask only the ready one
    assert rig.live() == [20000, 20001]
    assert rig.scraped == [URL(20000), URL(20000)]
    assert rig.scaler.load_status("chat") == (2, 2, "a replica is starting")


SIGNALS = [
    # (id, in flight per replica, its own /metrics, replicas after one pass)
    ("queue-over-saturation", 0, ReplicaMetrics(waiting=5, running=1, kv_cache_usage=0.1), 2),
    ("a-queue-of-4-beside-one-running", 0, ReplicaMetrics(waiting=4, running=1), 2),
    ("queue-under-the-margin", 0, ReplicaMetrics(waiting=3), 1),
    ("kv-cache-full", 0, ReplicaMetrics(waiting=0, kv_cache_usage=0.8), 2),
    ("kv-cache-under-the-margin", 0, ReplicaMetrics(waiting=0, kv_cache_usage=0.6), 1),
    ("running-counts-over-in-flight", 2, ReplicaMetrics(running=1), 1),
    ("in-flight-when-the-replica-says-nothing", 2, None, 2),
    ("in-flight-under-the-margin", 1, None, 1),
    ("never-sent-a-request", None, None, 1),
]


@pytest.mark.parametrize("in_flight, metrics, replicas", [c[1:] for c in SIGNALS], ids=[c[0] for c in SIGNALS])
def test_what_a_replica_reports_decides_a_step_up(in_flight, metrics, replicas):
    load = {"concurrency": 2, "scale_up_stabilization": "0s"}
    rig = Rig(config(_model("chat", "30Gi", max_replicas=3, load=load)))
    rig.serve("chat", 1)
    rig.in_flight = {URL(29999): 50}  # another backend's load is not this one's
    if in_flight is not None:
        rig.in_flight[URL(20000)] = in_flight
    rig.metrics = {URL(20000): metrics} if metrics else {}
    rig.balance()
    assert len(rig.live()) == replicas


def test_a_replica_the_proxy_never_sent_a_request_to_is_not_busy():
    rig = Rig(config(_model("chat", "30Gi", max_replicas=3, load={"concurrency": 1, "scale_up_stabilization": "0s"})))
    rig.serve("chat", 1)
    rig.balance()
    assert rig.live() == [20000]
    assert rig.scaler.load_status("chat") == (1, 1, "0 of 1 saturated, spare 1.00")


def test_the_budget_refuses_a_third_and_says_who_blocks_until_room_is_made(caplog):
    rig = Rig(config(CHAT, SIDE))
    rig.serve("side", 1)
    rig.serve("chat", 2)
    rig.in_flight = {URL(20001): 7, URL(20002): 7}
    rig.balance()
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        rig.balance(after=5)
        rig.balance()  # the same refusal again: logged once
    blocked = "chat wants 3, budget allows 2, blocked by side (30Gi, idle 8s)"
    assert rig.live() == [20001, 20002]
    assert rig.scaler.load_status("chat") == (3, 2, blocked)
    assert [r.getMessage() for r in caplog.records] == [blocked]
    assert rig.scaler.details("chat")["loadMessage"] == blocked
    # side goes: the very next pass adds the replica, without a new stabilization window.
    rig.runtime.stop(rig.runtime.spawned[0])
    rig.runtime.exit(rig.runtime.spawned[0], 0)
    rig.balance(after=1)
    assert rig.live() == [20001, 20002, 20003]
    assert rig.scaler.load_status("chat") == (3, 3, "2 of 2 saturated, spare 0.00 (margin 0.20)")


def test_a_refusal_is_no_longer_shown_once_the_load_no_longer_asks_for_more():
    rig = Rig(config(CHAT, SIDE))
    rig.serve("side", 1)
    rig.serve("chat", 2)
    rig.in_flight = {URL(20001): 7, URL(20002): 7}
    rig.balance()
    rig.balance(after=5)
    assert rig.scaler.load_status("chat")[:2] == (3, 2)
    rig.in_flight = {URL(20001): 1, URL(20002): 1}  # half busy: two are right, one would not do
    rig.balance(after=1)
    assert rig.scaler.load_status("chat") == (2, 2, "0 of 2 saturated, spare 0.50")


def test_a_start_being_forked_counts_as_a_replica_starting():
    rig = Rig(config(CHAT))
    seen = []

    def supervisor_pass(_proc):
        rig.scaler.balance()
        seen.append(rig.scaler.load_status("chat"))

    rig.runtime.on_spawn = supervisor_pass
    rig.scaler.scale_up("chat", 1)  # a request's cold start; the supervisor's pass comes while it is forked
    assert seen == [(1, 1, "a replica is starting")]


def test_a_replica_still_stopping_is_asked_for_beside_the_wanted_ones(caplog):
    rig = Rig(config(CHAT, SIDE, memory="128Gi"))
    rig.serve("side", 1)
    rig.serve("chat", 3)
    rig.runtime.stop(rig.runtime.spawned[3])  # stopped by hand, say: still holds its 30Gi
    rig.in_flight = {URL(20001): 7, URL(20002): 7}
    rig.balance()
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        rig.balance(after=5)
    assert rig.live() == [20001, 20002]
    wanted, allowed, message = rig.scaler.load_status("chat")
    assert (wanted, allowed, message) == (3, 2, "chat wants 3, budget allows 2, blocked by side (30Gi, idle 9s)")
    assert [r.getMessage() for r in caplog.records] == [message]  # refused by the budget, no start tried


def test_a_start_that_fails_is_logged_not_shown_as_blocked(caplog):
    rig = Rig(config(CHAT))
    rig.serve("chat", 1)
    rig.in_flight = {URL(20000): 7}
    rig.balance()
    rig.runtime.fail_spawn = "No such file or directory"
    with caplog.at_level(logging.WARNING, logger="local.scaler"):
        rig.balance(after=5)
    assert [r.getMessage() for r in caplog.records] == [
        "chat failed to start (1 in a row); next attempt in 10s at the earliest",
        "chat: could not add a replica: cannot run 'serve': No such file or directory (next start attempt in 10s)",
    ]
    assert rig.scaler.load_status("chat") == (1, 1, "1 of 1 saturated, spare 0.00 (margin 0.20)")
    rig.runtime.fail_spawn = None
    rig.balance(after=9)  # inside the backoff: not tried again
    assert rig.live() == [20000]
    assert rig.scaler.load_status("chat") == (1, 1, "1 of 1 saturated, spare 0.00 (margin 0.20)")
    rig.balance(after=1)  # the backoff is over: the load layer waits out its window again
    assert rig.scaler.load_status("chat") == (1, 1, "1 of 1 saturated, spare 0.00; waiting out the window")
    rig.balance(after=5)
    assert rig.live() == [20000, 20002]


STEP_DOWN = [
    # (id, in flight on the three replicas (started in this order), the one that leaves)
    ("all-idle-the-newest-leaves", (0, 0, 0), 20002),
    ("the-least-busy-leaves", (1, 0, 1), 20001),
    ("of-two-idle-the-newer-leaves", (0, 0, 1), 20001),
    ("all-equally-busy-the-newest-leaves", (1, 1, 1), 20002),
    ("never-sent-a-request-counts-as-idle", (None, 1, 1), 20000),  # None: the proxy has no count for it
]


@pytest.mark.parametrize("busy, leaver", [c[1:] for c in STEP_DOWN], ids=[c[0] for c in STEP_DOWN])
def test_a_step_down_takes_the_least_busy_replica_and_stops_it_when_its_requests_end(busy, leaver, caplog):
    rig = Rig(config(CHAT))
    rig.serve("chat", 3)
    rig.in_flight = {URL(20000 + i): n for i, n in enumerate(busy) if n is not None}
    rig.balance()
    assert rig.scaler.load_status("chat")[2].endswith("slack, waiting out the window")
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        rig.balance(after=10)
    reason = rig.scaler.load_status("chat")[2]
    assert rig.scaler.load_status("chat") == (2, 2, reason)
    assert reason.endswith("; 2 keep the margin")
    left = busy[leaver - 20000] or 0
    assert caplog.records[0].getMessage() == (
        f"chat: 3 -> 2 replicas ({reason}); {URL(leaver)} leaves once its {left} request(s) end"
    )
    others = [URL(p) for p in (20000, 20001, 20002) if p != leaver]
    assert rig.scaler.backends("chat") == others  # no new requests for the one leaving
    assert rig.scaler.wait_backends("chat", 0) == others
    leaving = next(p for p in rig.runtime.spawned if p.spec.port == leaver)
    if left:
        rig.balance(after=1)  # its request is still running: it stays
        assert leaving.phase is Phase.READY
        rig.in_flight[URL(leaver)] = 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        rig.balance(after=1)
    assert leaving.phase is Phase.STOPPING
    assert rig.runtime.stopped == [leaving]
    assert caplog.records[0].getMessage() == "chat stepping down for load: stopping it to free 30Gi"


def test_a_leaving_replica_that_exits_on_its_own_is_forgotten():
    rig = Rig(config(CHAT))
    rig.serve("chat", 3)
    rig.in_flight = {URL(20000): 1, URL(20001): 1, URL(20002): 1}
    rig.balance()
    rig.balance(after=10)
    leaving = rig.runtime.spawned[2]
    assert rig.scaler.backends("chat") == [URL(20000), URL(20001)]
    rig.runtime.exit(leaving, -9, failure="was killed by SIGKILL")  # before its last request ended
    rig.balance(after=1)
    assert rig.runtime.stopped == []
    assert rig.scaler.load_status("chat")[:2] == (2, 2)


def test_a_leaving_replica_serves_again_when_the_load_comes_back(caplog):
    rig = Rig(config(CHAT))
    rig.serve("chat", 3)
    rig.in_flight = {URL(20000): 1, URL(20001): 1, URL(20002): 1}
    rig.balance()
    rig.balance(after=10)
    assert rig.scaler.backends("chat") == [URL(20000), URL(20001)]
    rig.in_flight = {URL(20000): 2, URL(20001): 2, URL(20002): 1}  # its last request still runs; the others are full
    rig.balance()
    with caplog.at_level(logging.INFO, logger="local.scaler"):
        rig.balance(after=5)
    assert [r.getMessage() for r in caplog.records] == [
        "chat: keeps a leaving replica (0 of 2 saturated, spare 0.00 (margin 0.20))"
    ]
    assert rig.scaler.backends("chat") == [URL(20000), URL(20001), URL(20002)]
    assert rig.live() == [20000, 20001, 20002] and rig.runtime.stopped == []
    assert len(rig.runtime.spawned) == 3  # no start, no memory asked


def test_a_leaving_replica_whose_grace_period_is_over_is_stopped_with_requests_running():
    rig = Rig(config(dict(CHAT, stop_grace_period="0s")))
    rig.serve("chat", 3)
    rig.in_flight = {URL(20000): 1, URL(20001): 1, URL(20002): 1}
    rig.balance()
    rig.balance(after=10)
    rig.balance(after=1)  # still 1 in flight, but no grace left
    assert [p.spec.port for p in rig.runtime.stopped] == [20002]


WARM = _model("warm", "10Gi", cooldown="1m", min_replicas=1)


def test_min_replicas_are_started_without_a_request_and_never_idled_out():
    rig = Rig(config(WARM, SIDE))
    rig.balance()
    assert rig.live("warm") == [20000]
    assert rig.scaler.load_status("warm") == (1, 1, "kept warm: minReplicas is 1")
    rig.runtime.ready(rig.runtime.spawned[0])
    rig.clock.now += 3600
    assert rig.scaler.stop_idle() == []
    assert rig.live("side") == []  # a model without a load layer is never started by it


def test_a_model_stopped_by_hand_stays_stopped_until_a_request():
    rig = Rig(config(WARM))
    rig.balance()
    rig.runtime.ready(rig.runtime.spawned[0])
    assert rig.scaler.stop_model("warm") == 1
    rig.runtime.exit(rig.runtime.spawned[0], 0)
    rig.balance(after=1)
    assert rig.live("warm") == []
    rig.scaler.scale_up("warm", 1)  # a request
    rig.runtime.ready(rig.runtime.spawned[-1])
    rig.runtime.stop(rig.runtime.spawned[-1])
    rig.runtime.exit(rig.runtime.spawned[-1], 0)
    rig.balance(after=1)  # no longer halted: kept warm again
    assert rig.live("warm") == [20002]


def test_a_warm_model_that_failed_to_start_waits_out_its_backoff():
    rig = Rig(config(WARM))
    rig.balance()
    rig.runtime.exit(rig.runtime.spawned[0], 1, failure="exited with code 1")
    rig.balance(after=9)
    assert len(rig.runtime.spawned) == 1
    assert rig.scaler.load_status("warm") == (0, 0, "kept warm: minReplicas is 1")
    rig.balance(after=1)
    assert len(rig.runtime.spawned) == 2


def test_nothing_is_started_once_closing():
    rig = Rig(config(WARM))
    rig.scaler.close()
    rig.balance()
    assert rig.runtime.spawned == []


def test_only_models_that_may_have_several_replicas_or_keep_some_warm_are_balanced():
    pair = _model("pair", "30Gi", max_replicas=2, load={"concurrency": 2, "scale_up_stabilization": "0s"})
    rig = Rig(config(SIDE, pair))
    rig.serve("side", 1)
    rig.serve("pair", 1)
    rig.in_flight = {URL(20000): 7, URL(20001): 7}
    rig.balance()
    assert rig.live("pair") == [20001, 20002]
    assert rig.scaler.load_status("pair") == (2, 2, "1 of 1 saturated, spare 0.00 (margin 0.20)")
    assert rig.live("side") == [20000]  # one replica at most: the load layer leaves it alone
    assert rig.scaler.load_status("side") == (1, 1, "")


class Meanwhile(logging.Handler):
    """Does `action` once, when a log line starting with `prefix` is written: something that happens right then."""

    def __init__(self, prefix, action):
        super().__init__()
        self.prefix, self.action = prefix, action

    def emit(self, record):
        if record.getMessage().startswith(self.prefix) and self.action:
            action, self.action = self.action, None
            action()


def test_a_request_that_takes_the_room_between_the_two_decisions_is_named_as_the_blocker(caplog):
    rig = Rig(config(CHAT, SIDE, memory="64Gi"))
    rig.serve("chat", 1)
    rig.in_flight = {URL(20000): 7}
    rig.balance()
    # The budget allowed a second replica; before it starts, a request for side takes the room.
    handler = Meanwhile("chat: 1 -> 2 replicas", lambda: rig.scaler.scale_up("side", 1))
    logging.getLogger("local.scaler").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="local.scaler"):
            rig.balance(after=5)
    finally:
        logging.getLogger("local.scaler").removeHandler(handler)
    assert rig.live() == [20000] and rig.live("side") == [20001]
    blocked = "chat wants 2, budget allows 1, blocked by side (30Gi, starting)"
    assert rig.scaler.load_status("chat") == (2, 1, blocked)
    assert [r.getMessage() for r in caplog.records][-1] == blocked
    side = rig.runtime.spawned[-1]
    rig.runtime.stop(side)
    rig.runtime.exit(side, 0)
    rig.balance(after=1)  # still wanted: asked again at once, not after a new window
    assert rig.live() == [20000, 20002]
