"""Quantities and durations: every legal form parses to exact bytes/seconds; anything else is named."""


import pytest

from budget import DurationError, QuantityError, format_bytes, format_duration, parse_duration, parse_quantity
from tests import quantities
from tests.quantities import ACCEPTED, REFUSED, TOO_LARGE

pytestmark = pytest.mark.unit

GI = 2**30


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, b, id=t) for t, b in ACCEPTED])
def test_parse_quantity_accepts_every_form_of_the_table(text, expected):
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(17179869184, 16 * GI, id="int"),
        pytest.param(0, 0, id="int-zero"),
        pytest.param(1024.0, 1024, id="whole-float"),
    ],
)
def test_parse_quantity_accepts_whole_numbers(value, expected):
    assert parse_quantity(value) == expected


@pytest.mark.parametrize("text", [pytest.param(t, id=why) for t, why in {**REFUSED, **TOO_LARGE}.items()])
def test_parse_quantity_refuses_every_form_of_the_table_naming_field_and_input(text):
    with pytest.raises(QuantityError) as info:
        parse_quantity(text, field="spec.memory")
    said = "is too large" if text in quantities.TOO_LARGE else "is not a memory quantity in whole bytes (examples: "
    assert str(info.value).startswith(f"spec.memory: {text!r} {said}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0e400", 0, id="zero-with-a-huge-exponent"),
        pytest.param("0e30", 0, id="zero-at-the-exponent-cap"),
        pytest.param("9e18", 9 * 10**18, id="largest-power-of-ten-below-the-range"),
    ],
)
def test_exponents_far_beyond_the_range_are_fine_for_zero(text, expected):
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param(None, "expected a quantity", id="none"),
        pytest.param(True, "expected a quantity", id="bool"),
        pytest.param([16], "got list", id="list"),
        pytest.param(-5, "negative", id="negative-int"),
        pytest.param(2**63 - 1, "too large", id="int64-max-int"),
        pytest.param(1.5, "whole number of bytes", id="fractional-float"),
        pytest.param(float("inf"), "whole number of bytes", id="inf"),
    ],
)
def test_parse_quantity_refuses_other_types(value, fragment):
    with pytest.raises(QuantityError, match=fragment):
        parse_quantity(value, field="spec.memory")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(-5, "spec.memory: -5 is negative; memory must be >= 0", id="negative-int"),
        pytest.param(2**63 - 1, "spec.memory: 9223372036854775807 is too large (at most 9223372036854775806 bytes)",
                     id="int64-max-int"),
        pytest.param(-1.0, "spec.memory: -1 is negative; memory must be >= 0", id="negative-whole-float"),
    ],
)
def test_a_number_out_of_range_is_named_with_its_field(value, message):
    with pytest.raises(QuantityError) as info:
        parse_quantity(value, field="spec.memory")
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        pytest.param("80m", ": 'm' means thousandths of a byte; did you mean 80Mi?", id="milli"),
        pytest.param("8m", ": 'm' means thousandths of a byte; did you mean 8Mi?", id="milli-one-digit"),
        pytest.param("m", "", id="a-bare-m-is-no-milli"),
        pytest.param(" 8Gi ", ": remove the spaces", id="spaces"),
        pytest.param("16 Gi", ": remove the spaces", id="space-inside"),
        pytest.param("\t16Gi", ": remove the spaces", id="leading-tab"),
        pytest.param("16Gi\n", ": remove the spaces", id="trailing-newline"),  # RE2 refuses it; so must we
        pytest.param("100u", ": 'u' means a fraction of a byte", id="micro"),
        pytest.param("5n", ": 'n' means a fraction of a byte", id="nano"),
        pytest.param("1e-3", ": a negative exponent leaves a fraction of a byte", id="negative-exponent"),
        pytest.param("1.5e9", ": no fraction with an exponent (write 1.5G or 1500e6)", id="fraction-with-exponent"),
        pytest.param("1.0625Gi", ": the fraction leaves part of a byte (use a smaller unit: 1.0625Gi is 1088Mi)",
                     id="sixteenths"),
        pytest.param("-1Gi", ": memory must be >= 0", id="negative"),
        pytest.param("16GB", "", id="no-usual-mistake-no-hint"),
    ],
)
def test_the_refusal_says_how_to_fix_the_usual_mistakes(text, hint):
    """The whole message: the field, the input, the examples, then the hint for the usual mistake."""
    with pytest.raises(QuantityError) as info:
        parse_quantity(text, field="spec.memory")
    examples = "examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9"
    assert str(info.value) == f"spec.memory: {text!r} is not a memory quantity in whole bytes ({examples}){hint}"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        pytest.param(60 * GI, "60Gi", id="gi"),
        pytest.param(48 * GI, "48Gi", id="48gi"),
        pytest.param(1536 * 2**20, "1536Mi", id="not-whole-gi"),
        pytest.param(2**40, "1Ti", id="ti"),
        pytest.param(0, "0", id="zero"),
        pytest.param(1000, "1000", id="not-binary"),
    ],
)
def test_format_bytes_uses_largest_exact_unit(n, text):
    assert format_bytes(n) == text
    assert parse_quantity(text) == n


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("10m", 600, id="minutes"),
        pytest.param("90s", 90, id="seconds"),
        pytest.param("1h30m", 5400, id="compound"),
        pytest.param("0", 0, id="zero-disables"),
        pytest.param("1.5h", 5400, id="fractional"),
        pytest.param("500ms", 0.5, id="millis"),
        pytest.param(30, 30, id="number"),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10", id="no-unit"),
        pytest.param("10 minutes", id="words"),
        pytest.param("-5m", id="negative"),
        pytest.param("m", id="unit-only"),
        pytest.param("1d", id="days-not-go"),
        pytest.param("", id="empty"),
        pytest.param(None, id="none"),
        pytest.param({"m": 1}, id="mapping"),
    ],
)
def test_parse_duration_rejects(text):
    with pytest.raises(DurationError, match="spec.cooldownPeriod"):
        parse_duration(text, field="spec.cooldownPeriod")


def test_format_duration_whole_seconds():
    assert format_duration(120.7) == "120s"
    assert format_duration(-3) == "0s"


WHOLE = "is not a whole number of bytes (examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9)"
TOO_LARGE = "is too large (at most 9223372036854775806 bytes)"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(0.0, 0, id="float-zero"),
        pytest.param(2.0, 2, id="whole-float"),
        pytest.param(str(2**63 - 2), 2**63 - 2, id="largest-allowed"),
    ],
)
def test_parse_quantity_edges(value, expected):
    assert parse_quantity(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(float("nan"), f"quantity: nan {WHOLE}", id="nan"),
        pytest.param(float("inf"), f"quantity: inf {WHOLE}", id="inf"),
        pytest.param(-0.5, f"quantity: -0.5 {WHOLE}", id="negative-float"),
        pytest.param(0.5, f"quantity: 0.5 {WHOLE}", id="float-half-byte"),
        pytest.param(1.5, f"quantity: 1.5 {WHOLE}", id="float-fraction"),
        pytest.param([16], "quantity: expected a quantity string like 16Gi, got list", id="list"),
        pytest.param(
            "1e-30",
            "quantity: '1e-30' is not a memory quantity in whole bytes (examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9): "
            "a negative exponent leaves a fraction of a byte",
            id="negative-exponent",
        ),
        pytest.param("1e31", f"quantity: '1e31' {TOO_LARGE}", id="exponent-above-range"),
        pytest.param(str(2**63 - 1), f"quantity: '{2**63 - 1}' {TOO_LARGE}", id="int64-max"),
        pytest.param(str(2**63), f"quantity: '{2**63}' {TOO_LARGE}", id="int64-plus-one"),
        pytest.param("8Ei", f"quantity: '8Ei' {TOO_LARGE}", id="8ei"),
    ],
)
def test_parse_quantity_errors_read_exactly(value, message):
    with pytest.raises(QuantityError) as info:
        parse_quantity(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("n", "text"),
    [pytest.param(-2 * GI, "-2Gi", id="negative-gi"), pytest.param(-1000, "-1000", id="negative-bytes")],
)
def test_format_bytes_negative(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(True, "duration: expected a duration like 10m, got True", id="bool"),
        pytest.param(float("nan"), "duration: nan must be a non-negative number of seconds", id="nan"),
        pytest.param(float("inf"), "duration: inf must be a non-negative number of seconds", id="inf"),
        pytest.param(-1, "duration: -1 must be a non-negative number of seconds", id="negative-number"),
        pytest.param({"m": 1}, "duration: expected a duration string like 10m, got dict", id="mapping"),
        pytest.param("5x", "duration: '5x' is not a duration (examples: 10m, 90s, 1h30m, 0)", id="unknown-unit"),
    ],
)
def test_parse_duration_errors_read_exactly(value, message):
    with pytest.raises(DurationError) as info:
        parse_duration(value)
    assert str(info.value) == message
