"""The wait line: who is first (priority, then arrival), its bounds, giving a place up, and the header."""

import pytest

from proxy.line import LineFull, WaitLine, parse_max_wait

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("arrivals", "order"),
    [
        pytest.param([("a", 0), ("b", 0), ("c", 0)], ["a", "b", "c"], id="fifo"),
        pytest.param([("a", 0), ("b", 5), ("c", 0)], ["b", "a", "c"], id="priority-first"),
        pytest.param([("a", -1), ("b", 0), ("c", -1)], ["b", "a", "c"], id="low-priority-last-in-arrival-order"),
    ],
)
def test_order_is_priority_then_arrival(arrivals, order):
    line = WaitLine(per_pool=10, total=10)
    for label, priority in arrivals:
        line.join("pool", label, priority)
    assert line.snapshot() == {"pool": order}


def test_leaving_moves_the_others_up_and_is_idempotent():
    line = WaitLine(per_pool=10, total=10)
    a, b, c = (line.join("pool", x, 0) for x in "abc")
    assert [line.position(p) for p in (a, b, c)] == [(1, 3), (2, 3), (3, 3)]
    b.release()
    b.release()
    assert [line.position(p) for p in (a, b, c)] == [(1, 2), (0, 2), (2, 2)]
    with a:
        pass
    assert line.position(c) == (1, 1)
    c.release()
    assert line.snapshot() == {}


def test_bounds_per_pool_and_in_all():
    line = WaitLine(per_pool=2, total=3)
    line.join("p", "a", 0)
    line.join("p", "b", 0)
    with pytest.raises(LineFull, match="2 requests already wait for memory in pool p"):
        line.join("p", "c", 0)
    line.join("q", "c", 0)
    with pytest.raises(LineFull, match="3 requests already wait for memory"):
        line.join("r", "d", 0)


def _outcome(line, place, room, gone=lambda: False, wait=5.0):
    return [t for t in line.turns(place, room=room, wait_seconds=wait, check_seconds=0.01, gone=gone)]


def test_only_the_first_place_gets_its_turn_and_only_with_room():
    clock = [0.0]
    line = WaitLine(per_pool=10, total=10, monotonic=lambda: clock[0])
    first = line.join("p", "a", 0)
    second = line.join("p", "b", 0)
    asked = []

    def room():
        asked.append(True)
        return True

    def expire():
        clock[0] += 10  # each check advances the clock past the wait
        return False

    assert _outcome(line, second, room, gone=expire) == [(2, 2), "timeout"]
    assert asked == []  # not first: never even asks whether there is room
    assert _outcome(line, first, room) == [(1, 2), "turn"]


def test_a_client_gone_ends_the_wait():
    line = WaitLine(per_pool=10, total=10)
    place = line.join("p", "a", 0)
    assert _outcome(line, place, room=lambda: False, gone=lambda: True) == [(1, 1), "gone"]


@pytest.mark.parametrize(
    ("header", "default", "expected"),
    [
        pytest.param(None, 0.0, 0.0, id="absent-no-default"),
        pytest.param(None, 30.0, 30.0, id="absent-model-default"),
        pytest.param("120", 0.0, 120.0, id="seconds"),
        pytest.param("2.5", 30.0, 2.5, id="fraction-overrides-default"),
        pytest.param("0", 30.0, 0.0, id="zero-means-429-now"),
        pytest.param(" ", 7.0, 7.0, id="blank-is-absent"),
    ],
)
def test_max_wait_header(header, default, expected):
    assert parse_max_wait(header, default) == expected


@pytest.mark.parametrize("header", ["soon", "-1", "nan", "inf", "3601"], ids=["word", "negative", "nan", "inf", "over"])
def test_bad_max_wait_header_is_refused_with_its_name(header):
    with pytest.raises(ValueError, match="X-IBC-Max-Wait must be a number of seconds from 0 to 3600"):
        parse_max_wait(header, 0.0)
