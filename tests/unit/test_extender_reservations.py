"""The reservation book on its own, and the extender's promise under concurrency: no node is ever overbooked."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from budget import PodRequest
from budget.objects import ANNOTATION_CAPACITY, ANNOTATION_MEMORY, LABEL_MODEL
from extender import CacheSource, ReservationBook, Settings, create_app
from extender.service import Extender
from extender.wire import parse_extender_args

pytestmark = pytest.mark.unit

GI = 2**30


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pod(uid: str, memory_gi: int = 10, name: str | None = None) -> PodRequest:
    return PodRequest("default", name or f"pod-{uid}", uid, "default/llama", memory_gi * GI)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> ReservationBook:
    return ReservationBook(30.0, clock=clock)


def test_a_reservation_holds_memory_on_its_node_for_one_ttl(book: ReservationBook, clock: Clock) -> None:
    r = book.reserve(pod("a", 16), "gpu-1")
    assert (r.node, r.memory_bytes, r.expires_at, r.pod) == ("gpu-1", 16 * GI, clock.now + 30, "default/pod-a")
    assert book.reserved_bytes() == {"gpu-1": 16 * GI}
    clock.now += 29.9
    assert book.get("a") == r
    clock.now += 0.1
    assert book.get("a") is None
    assert book.live() == () and len(book) == 0, "expired entries are pruned"


def test_reserving_the_same_pod_again_replaces_node_memory_and_ttl(book: ReservationBook, clock: Clock) -> None:
    book.reserve(pod("a", 16), "gpu-1")
    clock.now += 20
    second = book.reserve(pod("a", 24), "gpu-2")
    assert book.live() == (second,)
    assert book.reserved_bytes() == {"gpu-2": 24 * GI}
    clock.now += 20
    assert book.get("a") == second, "the replacement has a fresh TTL"


@pytest.mark.parametrize(
    ("action", "left"),
    [
        pytest.param(lambda b: b.confirm("a"), {"b"}, id="confirm-when-the-watch-shows-it-bound"),
        pytest.param(lambda b: b.release("b"), {"a"}, id="release"),
        pytest.param(lambda b: b.release("nobody"), {"a", "b"}, id="release-unknown-is-a-no-op"),
    ],
)
def test_confirm_and_release_drop_one_entry(book: ReservationBook, action, left) -> None:
    book.reserve(pod("a"), "gpu-1")
    book.reserve(pod("b"), "gpu-1")
    action(book)
    assert {r.uid for r in book.live()} == left


def test_release_with_only_does_not_drop_a_newer_reservation(book: ReservationBook) -> None:
    old = book.reserve(pod("a"), "gpu-1")
    new = book.reserve(pod("a"), "gpu-2")
    assert book.release("a", only=old) is False, "a failed bind of the old promise must not undo the new one"
    assert book.live() == (new,)
    assert book.release("a", only=new) is True


def test_a_pod_without_uid_cannot_be_reserved(book: ReservationBook) -> None:
    with pytest.raises(ValueError, match="has no UID"):
        book.reserve(pod(""), "gpu-1")


def test_bad_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl_seconds must be > 0"):
        ReservationBook(0)


def test_the_gauge_follows_every_change(book: ReservationBook, clock: Clock) -> None:
    seen: list[int] = []
    book.on_change(seen.append)
    book.reserve(pod("a"), "n")
    book.reserve(pod("b"), "n")
    book.confirm("a")
    clock.now += 31
    book.live()
    assert seen == [1, 2, 1, 0]


# ----- concurrency: many threads filtering at once never overbook -----

NODES = {"gpu-1": 48, "gpu-2": 80, "gpu-3": 24}  # Gi: holds 2 + 4 + 1 = 7 pods of 20Gi


class SlowBook(ReservationBook):
    """Yields the GIL between reading the reservations and the caller's reserve: without the book's
    lock around check-and-reserve, concurrent filters would interleave there and overbook."""

    def live(self, now: float | None = None):  # type: ignore[no-untyped-def]
        held = super().live(now)
        time.sleep(0.001)
        return held


def cluster() -> CacheSource:
    return CacheSource.from_objects(
        [
            {"kind": "Node", "metadata": {"name": name, "annotations": {ANNOTATION_CAPACITY: f"{gi}Gi"}}}
            for name, gi in NODES.items()
        ]
    )


def filter_args(uid: str, memory: str = "20Gi") -> dict:
    return {
        "Pod": {
            "metadata": {
                "name": f"p-{uid}",
                "namespace": "default",
                "uid": uid,
                "labels": {LABEL_MODEL: "llama"},
                "annotations": {ANNOTATION_MEMORY: memory},
            },
            "spec": {},
        },
        "NodeNames": list(NODES),
    }


def run_threads(count: int, target) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


@pytest.mark.parametrize("rounds", range(3), ids=lambda r: f"round-{r}")
def test_concurrent_filters_never_promise_a_node_more_than_it_holds(rounds: int) -> None:
    extender = Extender(Settings(), cluster(), book=SlowBook(30.0))
    told: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        answer = extender.filter(parse_extender_args(filter_args(f"u{i}")))
        assert len(answer.passed) <= 1
        if answer.passed:
            with lock:
                told[f"u{i}"] = answer.passed[0]

    run_threads(24, one)
    per_node: dict[str, int] = defaultdict(int)
    for node in told.values():
        per_node[node] += 20
    assert all(per_node[n] <= NODES[n] for n in NODES), per_node
    assert len(told) == 7, "every hole is used: 7 pods of 20Gi fit, the other 17 are told no"
    assert {r.uid: r.node for r in extender.book.live()} == told, "each 'fits' is backed by its reservation"


def test_concurrent_filters_and_binds_through_http_never_overbook() -> None:
    source = cluster()
    bound: list[tuple[str, str]] = []
    bound_lock = threading.Lock()

    class Writer:
        def read_pod(self, namespace: str, name: str) -> None:
            return None

        def bind(
            self, namespace: str, name: str, uid: str, node: str, timeout_seconds: float, annotations: object = None
        ) -> None:
            with bound_lock:
                bound.append((uid, node))

    source.writer = Writer()
    app = create_app(Settings(), source, book=SlowBook(30.0))

    def one(i: int) -> None:
        client = app.test_client()
        uid = f"h{i}"
        body = client.post("/filter", json=filter_args(uid)).get_json()
        if body["NodeNames"]:
            node = body["NodeNames"][0]
            bind = {"PodName": f"p-{uid}", "PodNamespace": "default", "PodUID": uid, "Node": node}
            assert client.post("/bind", json=bind).get_json() == {"Error": ""}

    run_threads(16, one)
    per_node: dict[str, int] = defaultdict(int)
    for _, node in bound:
        per_node[node] += 20
    assert all(per_node[n] <= NODES[n] for n in NODES), per_node
    assert len(bound) == 7
