"""Kubernetes quantities and Go-style durations, parsed once at the edge to integer bytes / seconds.

Quantities follow `k8s.io/apimachinery/pkg/api/resource`: a signed decimal number with an optional
binary suffix (Ki..Ei), decimal suffix (n, u, m, k, M, G, T, P, E) or decimal exponent (e3, E-2).
Memory is whole bytes, so a fractional result is rounded up (as the apiserver does for Value()).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from budget.errors import DurationError, QuantityError

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
# Largest first: format with the biggest unit that divides exactly.
_FORMAT_UNITS = [("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)]
_MAX_BYTES = 2**63 - 1


def parse_quantity(value: object, *, field: str = "quantity") -> int:
    """Parse a Kubernetes quantity (`16Gi`, `60G`, `1.5Ti`, `1e9`, `100m`, `42`) to whole bytes."""
    if isinstance(value, bool) or value is None:
        raise QuantityError(f"{field}: expected a quantity like 16Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise QuantityError(f"{field}: {value!r} is negative; memory must be >= 0")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise QuantityError(f"{field}: {value!r} is not a non-negative finite number")
        return math.ceil(value)
    if not isinstance(value, str):
        raise QuantityError(f"{field}: expected a quantity string like 16Gi, got {type(value).__name__}")
    text = value.strip()
    match = _QUANTITY.match(text)
    if not match:
        raise QuantityError(
            f"{field}: {value!r} is not a Kubernetes quantity (examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9)"
        )
    try:
        number = Decimal(match["num"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise QuantityError(f"{field}: {value!r} has a bad number") from exc
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        scaled = number * _BINARY[suffix]
    elif suffix in _DECIMAL:
        scaled = number * _DECIMAL[suffix]
    else:
        exponent = int(suffix[1:])
        if abs(exponent) > 30:
            raise QuantityError(f"{field}: {value!r} has an exponent out of range")
        scaled = number.scaleb(exponent)
    if scaled < 0:
        raise QuantityError(f"{field}: {value!r} is negative; memory must be >= 0")
    result = math.ceil(scaled)
    if result > _MAX_BYTES:
        raise QuantityError(f"{field}: {value!r} is too large")
    return result


def format_bytes(n: int) -> str:
    """Format bytes for people with the largest exact binary unit: 64424509440 -> `60Gi`."""
    if n < 0:
        return "-" + format_bytes(-n)
    if n == 0:
        return "0"
    for unit, size in _FORMAT_UNITS:
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, *, field: str = "duration") -> float:
    """Parse a Go-style duration (`10m`, `90s`, `1h30m`; `0` is zero) to seconds."""
    if isinstance(value, bool) or value is None:
        raise DurationError(f"{field}: expected a duration like 10m, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise DurationError(f"{field}: {value!r} must be a non-negative number of seconds")
        return float(value)
    if not isinstance(value, str):
        raise DurationError(f"{field}: expected a duration string like 10m, got {type(value).__name__}")
    text = value.strip()
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            break
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        pos = match.end()
    if pos != len(text) or not text:
        raise DurationError(f"{field}: {value!r} is not a duration (examples: 10m, 90s, 1h30m, 0)")
    return total


def format_duration(seconds: float) -> str:
    """Whole seconds, as the 429 body shows idle times: 120.4 -> `120s`."""
    return f"{max(0, int(seconds))}s"
