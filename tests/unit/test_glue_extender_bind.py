"""The extender's bind and its watch, called directly (no HTTP): the Binding the API server gets (node,
UID, timeout, the devices annotation), the answer the scheduler gets, and the reservation left behind.

A pod being bound is known from the watch, else from its reservation (the watch is a few milliseconds
behind), else from the API server; each source is a case below, with the UID checks that keep a recreated
pod of the same name from being bound on its predecessor's promise.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from budget import Reservation
from budget.decide import REASON_INSUFFICIENT
from budget.objects import ANNOTATION_DEVICES
from extender import CacheSource, Settings
from extender.service import BindAnswer, Extender
from tests.unit.test_glue_extender_filter import (
    GI,
    LOGGER,
    NOW,
    Clock,
    World,
    messages,
    model,
    names,
    node,
    pod,
    running,
)

pytestmark = pytest.mark.unit

TIMEOUT = 7.5  # not the default 5 s: the Binding's timeout is the operator's --bind-timeout
SETTINGS = Settings(bind_timeout_seconds=TIMEOUT)
TTL = SETTINGS.reservation_ttl_seconds
CLUSTER = (node("mid", "48Gi"), node("big", "80Gi"), node("g", gpus=(2, 40960)))
RECREATED = "pod default/p now has UID uid-new, not uid-p: it was recreated"
LOTS = (
    "pod default/p: Pod default/p: annotation inference.eh-ops.io/memory: 'lots' is not a memory quantity in whole "
    "bytes (examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9)"
)


def dev(indices: str) -> dict[str, str]:
    return {ANNOTATION_DEVICES: indices}


BIND_CASES = [
    # (cache objects, API server pods, reservations before (name, Gi, node, devices), bind (name, uid, node),
    #  answer, Bindings posted (name, uid, node, annotations), reservations after: uid -> (node, devices, Gi))
    pytest.param(
        [pod("p", "40Gi")], [], [], ("p", "uid-p", "big"),
        BindAnswer("bound"), [("p", "uid-p", "big", dev("0"))], {"uid-p": ("big", (0,), 40)},
        id="watched-pod-is-bound-and-holds-its-memory-until-the-watch-confirms",
    ),
    pytest.param(
        [pod("p", "20Gi"), running("x", "30Gi", "g", "0")], [], [], ("p", "uid-p", "g"),
        BindAnswer("bound"), [("p", "uid-p", "g", dev("1"))], {"uid-p": ("g", (1,), 20)},
        id="the-binding-carries-the-gpu-that-still-fits",
    ),
    pytest.param(
        [pod("p", "60Gi"), running("c1", "50Gi", "big")], [], [], ("p", "uid-p", "big"),
        BindAnswer("no_fit", f"pod default/p cannot be bound to big: {REASON_INSUFFICIENT}"), [], {},
        id="no-longer-fits-posts-nothing",
    ),
    pytest.param(
        [pod("p", "30Gi"), running("x", "30Gi", "g", "0"), running("y", "30Gi", "g", "1")], [], [],
        ("p", "uid-p", "g"),
        BindAnswer("no_fit", f"pod default/p cannot be bound to g: {REASON_INSUFFICIENT} (30Gi on 1 device; GPU 0 has "
                             "10Gi free of 40Gi, GPU 1 has 10Gi free of 40Gi)"),
        [], {},
        id="no-fit-names-the-devices",
    ),
    pytest.param(
        [], [], [("p", 40, "big", (0,))], ("p", "uid-p", "big"),
        BindAnswer("bound"), [("p", "uid-p", "big", dev("0"))], {"uid-p": ("big", (0,), 40)},
        id="not-watched-yet-its-reservation-says-what-it-is",
    ),
    pytest.param(
        [], [], [("p", 60, "mid", ())], ("p", "uid-p", "mid"),
        BindAnswer("no_fit", f"pod default/p cannot be bound to mid: {REASON_INSUFFICIENT}"), [],
        {"uid-p": ("mid", (), 60)},
        id="its-reservation-is-re-checked-too",  # and left to its TTL: the scheduler filters the pod again
    ),
    pytest.param(
        [pod("p", "70Gi", uid="uid-old")], [], [("p", 40, "mid", ())], ("p", "uid-p", "mid"),
        BindAnswer("bound"), [("p", "uid-p", "mid", dev("0"))], {"uid-p": ("mid", (0,), 40)},
        id="the-watch-still-shows-an-older-pod-of-that-name-its-70Gi-does-not-count",
    ),
    pytest.param(
        [], [pod("p", "40Gi")], [], ("p", "uid-p", "big"),
        BindAnswer("bound"), [("p", "uid-p", "big", dev("0"))], {"uid-p": ("big", (0,), 40)},
        id="neither-watched-nor-reserved-the-api-server-is-asked",
    ),
    pytest.param(
        [], [pod("p", "60Gi")], [], ("p", "uid-p", "mid"),
        BindAnswer("no_fit", f"pod default/p cannot be bound to mid: {REASON_INSUFFICIENT}"), [], {},
        id="the-api-servers-pod-is-re-checked",
    ),
    pytest.param(
        [], [pod("p", "40Gi", uid="uid-new")], [], ("p", "uid-p", "big"),
        BindAnswer("bind_failed", RECREATED), [], {},
        id="recreated-under-a-new-uid-is-not-bound",
    ),
    pytest.param(
        [], [pod("p", "40Gi", uid="")], [], ("p", "uid-p", "big"),
        BindAnswer("bound"), [("p", "uid-p", "big", dev("0"))], {"uid-p": ("big", (0,), 40)},
        id="the-api-servers-pod-without-uid-is-taken-as-the-one-asked-for",
    ),
    pytest.param(
        [], [pod("p", "40Gi", uid="uid-new")], [], ("p", "", "big"),
        BindAnswer("bound"), [("p", "", "big", dev("0"))], {"uid-new": ("big", (0,), 40)},
        id="no-uid-asked-the-api-servers-pod-and-its-uid",
    ),
    pytest.param(
        [pod("p", "40Gi")], [], [], ("p", "", "big"),
        BindAnswer("bound"), [("p", "", "big", dev("0"))], {"uid-p": ("big", (0,), 40)},
        id="no-uid-asked-the-watched-pods-uid-holds-the-memory",
    ),
    pytest.param(
        [], [], [], ("p", "uid-p", "big"),
        BindAnswer("bound"), [("p", "uid-p", "big", {})], {},
        id="unknown-everywhere-bound-as-an-ordinary-pod",
    ),
    pytest.param(
        [pod("p", model_name=None)], [], [], ("p", "uid-p", "big"),
        BindAnswer("bound"), [("p", "uid-p", "big", {})], {},
        id="not-a-model-pod-bound-without-devices",
    ),
    pytest.param(
        [pod("p", "lots")], [], [], ("p", "uid-p", "big"),
        BindAnswer("invalid_pod", LOTS), [], {},
        id="malformed-memory-is-refused-with-the-reason",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("cached", "api", "reserved", "call", "want", "posted", "held"), BIND_CASES)
def test_bind(
    cached: list[dict[str, Any]],
    api: list[dict[str, Any]],
    reserved: list[tuple[str, int, str, tuple[int, ...]]],
    call: tuple[str, str, str],
    want: BindAnswer,
    posted: list[tuple[str, str, str, dict[str, str]]],
    held: dict[str, tuple[str, tuple[int, ...], int]],
) -> None:
    w = World(*CLUSTER, *cached, settings=SETTINGS)
    w.writer.pods = {("default", p["metadata"]["name"]): p for p in api}
    for name, gi, on, devices in reserved:
        w.reserve(name, gi, on, devices)
    w.clock.now += 10  # bind refreshes a reservation: a full TTL from now
    name, uid, on = call
    assert w.bind(name, on, uid) == want
    assert w.writer.bindings == [("default", n, u, o) for n, u, o, _ in posted]
    assert w.writer.annotations == {n: a for n, _, _, a in posted}, "the devices ride on the Binding"
    assert w.writer.timeouts == [TIMEOUT] * len(posted)
    assert w.held() == {u: (o, d, gi * GI) for u, (o, d, gi) in held.items()}
    for r in w.book.live(w.clock()) if want.result == "bound" else ():  # refreshed by bind
        assert (r.model, r.pod, r.expires_at) == ("default/llama", "default/p", NOW + 10 + TTL)
    assert w.decisions() == {("bind", want.result, ""): 1.0}


def test_a_failed_binding_gives_the_memory_back_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    w = World(*CLUSTER, pod("p", "40Gi"), settings=SETTINGS)
    w.writer.fail = "binding default/p to big failed: 409 pod already assigned"
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert w.bind("p", "big") == BindAnswer("bind_failed", w.writer.fail)
    assert w.held() == {}, "the scheduler retries; the memory is free meanwhile"
    assert messages(caplog) == [(logging.WARNING, f"bind: {w.writer.fail}")]
    assert w.decisions() == {("bind", "bind_failed", ""): 1.0}


def test_a_failed_binding_keeps_a_newer_promise_made_while_it_was_in_flight() -> None:
    """The scheduler filtered the pod again while the POST hung: the failure must not undo the new promise."""
    w = World(*CLUSTER, pod("p", "40Gi"), settings=SETTINGS)
    w.writer.fail = "binding default/p to big failed: timeout"

    def refilter() -> None:
        w.clock.now += 1
        assert w.filter(names(pod("p", "40Gi"), ["mid"])).passed == ["mid"]

    w.writer.during_bind = refilter
    assert w.bind("p", "big").result == "bind_failed"
    assert w.held() == {"uid-p": ("mid", (0,), 40 * GI)}


def test_a_failed_binding_of_an_ordinary_pod_reserves_nothing() -> None:
    w = World(*CLUSTER, settings=SETTINGS)
    w.writer.fail = "binding default/p to big failed: 403"
    assert w.bind("p", "big") == BindAnswer("bind_failed", w.writer.fail)
    assert w.held() == {} and w.writer.bindings == []


BIND_LOGS = [
    pytest.param(
        [pod("p", "40Gi")], "big", [(logging.DEBUG, "bind: default/p -> big 0")], id="bound-with-its-device",
    ),
    pytest.param([], "big", [(logging.DEBUG, "bind: default/p -> big ")], id="bound-an-ordinary-pod"),
    pytest.param(
        [pod("p", "60Gi"), running("c1", "50Gi", "big")], "big",
        [(logging.INFO, f"bind: default/p (60Gi) no longer fits big ({REASON_INSUFFICIENT}; free 30Gi)")],
        id="no-fit-says-what-is-free",
    ),
    pytest.param(
        [pod("p", "1Gi"), running("c1", "90Gi", "big")], "big",
        [(logging.INFO, f"bind: default/p (1Gi) no longer fits big ({REASON_INSUFFICIENT}; free 0)")],
        id="an-overcommitted-node-has-0-free",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("cached", "on", "lines"), BIND_LOGS)
def test_bind_tells_the_operator(
    caplog: pytest.LogCaptureFixture, cached: list[dict[str, Any]], on: str, lines: list[tuple[int, str]]
) -> None:
    w = World(*CLUSTER, *cached, settings=SETTINGS)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        w.bind("p", on)
    assert messages(caplog) == lines


# ----- the watch: a reservation ends when the pod is seen bound, terminated or deleted -----

WATCH_CASES = [
    # (event type, the pod as the watch shows it, reservation left, log lines)
    pytest.param(
        "MODIFIED", pod("p", "40Gi", on="big", phase="Running"), False,
        [(logging.DEBUG, "reservation of pod uid uid-p confirmed: bound to big")],
        id="bound-the-placement-holds-the-memory-now",
    ),
    pytest.param(
        "DELETED", pod("p", "40Gi"), False, [(logging.DEBUG, "reservation of pod uid uid-p dropped: pod deleted")],
        id="deleted-before-binding",
    ),
    pytest.param(
        "DELETED", pod("p", "40Gi", on="big", phase="Running"), False,
        [(logging.DEBUG, "reservation of pod uid uid-p dropped: pod deleted")],
        id="deleted-while-bound-says-deleted",
    ),
    pytest.param(
        "MODIFIED", pod("p", "40Gi", phase="Failed"), False,
        [(logging.DEBUG, "reservation of pod uid uid-p dropped: pod Failed")],
        id="failed-before-binding",
    ),
    pytest.param(
        "MODIFIED", pod("p", "40Gi", on="big", phase="Succeeded"), False,
        [(logging.DEBUG, "reservation of pod uid uid-p dropped: pod Succeeded")],
        id="succeeded-says-succeeded-not-bound",
    ),
    pytest.param("MODIFIED", pod("p", "40Gi"), True, [], id="still-pending-keeps-its-promise"),
    pytest.param("ADDED", pod("p", "40Gi", phase="Running"), True, [], id="running-but-no-node-keeps-it"),
    pytest.param(
        "MODIFIED", pod("p", "40Gi", uid="uid-other", on="big", phase="Running"), True, [],
        id="another-uid-bound-is-not-this-promise",
    ),
    pytest.param(
        "DELETED", pod("p", "40Gi", uid="", on="big"), True, [], id="an-event-without-uid-touches-nothing",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("event", "obj", "kept", "lines"), WATCH_CASES)
def test_the_watch_ends_reservations(
    caplog: pytest.LogCaptureFixture, event: str, obj: dict[str, Any], kept: bool, lines: list[tuple[int, str]]
) -> None:
    w = World(*CLUSTER)
    assert w.filter(names(pod("p", "40Gi"), ["big"])).passed == ["big"]
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        w.see(event, obj)
    assert w.held() == ({"uid-p": ("big", (0,), 40 * GI)} if kept else {})
    assert messages(caplog) == lines


def test_an_event_of_another_kind_never_ends_a_reservation() -> None:
    w = World(*CLUSTER)
    w.filter(names(pod("p", "40Gi"), ["big"]))
    w.extender.on_watch_event("Node", "DELETED", {"metadata": {"name": "big", "uid": "uid-p"}})
    assert set(w.held()) == {"uid-p"}


# ----- an extender built on its own: its book, clock and metrics -----


def test_an_extender_without_a_book_keeps_one_with_the_settings_ttl_and_its_clock() -> None:
    clock = Clock()
    source = CacheSource.from_objects([node("big", "80Gi")])
    extender = Extender(Settings(reservation_ttl_seconds=5), source, clock=clock)
    first = extender.filter(names(pod("p", "50Gi"), ["big"]))
    assert first.reservation is not None and first.reservation.expires_at == NOW + 5
    assert extender.filter(names(pod("q", "50Gi"), ["big"])).passed == []
    clock.now += 5
    assert extender.filter(names(pod("q", "50Gi"), ["big"])).passed == ["big"], "p's promise ended with its TTL"
    gauge = extender.metrics.registry.get_sample_value("ibc_extender_reservations")
    assert gauge == 1.0, "its own metrics follow its own book"
    bound = pod("q", "50Gi", on="big", phase="Running")
    source.cache.apply("Pod", "MODIFIED", bound)
    assert extender.book.live(clock()) == (), "the watch confirmed q's promise: its book reads the same clock"


class TwoClocks:
    """An extender given its own clock (NOW) over a book whose clock runs an hour ahead, with p's and q's
    promises made at NOW: live at the extender's instant, long expired by the book's."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.world = World(*CLUSTER, *objects, settings=SETTINGS)
        self.world.clock.now = NOW + 3600
        self.extender = Extender(SETTINGS, self.world.source, book=self.world.book, clock=Clock(NOW))

    def promise(self, name: str, gi: int, on: str) -> None:
        self.world.reserve(name, gi, on, now=NOW)


def test_every_decision_reads_the_extenders_clock_not_the_books() -> None:
    """One instant per decision, the clock the extender was given: filter, prioritize and bind all see the
    promises live at that instant (the core ignores expired ones itself; the book must not drop live ones)."""
    two = TwoClocks(pod("r", "40Gi"))
    two.promise("q", 60, "big")
    assert two.extender.filter(names(pod("p", "40Gi"), ["big"])).failed == {"big": REASON_INSUFFICIENT}
    two.promise("p", 10, "mid")
    assert two.extender.prioritize(names(pod("p", "10Gi"), ["big", "mid"])) == {"big": 1, "mid": 10}
    assert two.extender.bind("default", "r", "uid-r", "big").result == "no_fit", "q still holds 60Gi of big"
    assert two.extender.bind("default", "p", "uid-p", "mid") == BindAnswer("bound")
    assert two.world.writer.annotations["p"] == {ANNOTATION_DEVICES: "0"}, "known from its live promise"
    assert two.world.book.get("uid-p", now=NOW) == Reservation(
        uid="uid-p", model="default/llama", memory_bytes=10 * GI, expires_at=NOW + TTL, node="mid",
        pod="default/p", devices=(0,),
    )  # fmt: skip
    made = two.extender.filter(names(pod("s", "10Gi"), ["big"])).reservation
    assert made is not None and made.expires_at == NOW + TTL, "a promise lasts one TTL from the decision's instant"


@pytest.mark.parametrize(
    ("namespace", "memory"),
    [
        pytest.param(None, "60Gi", id="no-namespace-is-default-and-so-is-its-model"),
        pytest.param("default", "60Gi", id="default"),
        pytest.param("team", "40Gi", id="team-its-own-model-not-defaults"),
    ],
)
def test_memory_falls_back_to_the_model_in_the_pods_namespace(namespace: str | None, memory: str) -> None:
    """A model pod without a memory annotation takes its InferenceModel's memory, from its own namespace."""
    team = model("llama", "40Gi")
    team["metadata"]["namespace"] = "team"
    w = World(node("big", "80Gi"), node("mid", "48Gi"), model("llama", "60Gi"), team)
    answer = w.filter(names(pod("p", namespace=namespace), ["mid", "big"]))
    assert answer.reservation is not None and answer.reservation.memory_bytes == int(memory[:-2]) * GI
    assert answer.passed == ["big"]
