"""Kubernetes quantities and Go-style durations, parsed once at the edge to integer bytes / seconds.

Memory has one grammar, :data:`MEMORY_QUANTITY_PATTERN`, shared word for word by the InferenceModel CRD
(`spec.memory`), the webhook, the pod/Deployment/node annotations and local mode's config: a subset of
`k8s.io/apimachinery/pkg/api/resource` quantities that always means a whole number of bytes.

- a whole number (`42`, `17179869184`), optionally with a non-negative exponent (`1e9`, `129E6`);
- or a number with a suffix: binary `Ki Mi Gi Ti Pi Ei` (a fraction only in eighths: `1.5Gi`, `.25Ti`,
  `0.125Ki`), decimal `k M G T P E` (as many fraction digits as the suffix has zeros: `1.5k`, `2.25G`);
- refused: milli/micro/nano (`100m` is a tenth of a byte, always a typo for `100Mi`), negative
  exponents, fractions that leave part of a byte (`1.5`, `1.0001k`), fractions with an exponent,
  signs other than `+`, and spaces anywhere.

The pattern is written in the subset RE2 (the apiserver's engine) and Python agree on, so it is pasted
into the CRD unchanged; tests/unit/test_crd_schema.py fails when the two differ. The CRD adds one CEL
rule for the range (:data:`MAX_MEMORY_BYTES`), which a regular expression cannot express.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from budget.errors import DurationError, QuantityError

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
# Fractions of a binary unit: eighths, written with one to three digits (and trailing zeros), so the
# result is whole for every binary suffix (1Ki / 8 = 128 bytes).
_EIGHTHS = r"(0{1,3}|50{0,2}|250?|750?|125|375|625|875)"


def _decimal_suffixes() -> str:
    # k allows 3 fraction digits, M 6, ... E 18: never less than a byte.
    return "|".join(
        rf"([0-9]+|[0-9]*\.[0-9]{{1,{len(str(size)) - 1}}}){suffix}" for suffix, size in _DECIMAL.items()
    )


MEMORY_QUANTITY_PATTERN = (
    r"^\+?("
    r"[0-9]+([eE]\+?[0-9]+)?"
    rf"|([0-9]+|[0-9]*\.{_EIGHTHS})[KMGTPE]i"
    rf"|{_decimal_suffixes()}"
    r")$"
)
"""The one grammar for memory quantities (see the module docstring); the CRD carries it verbatim."""

MAX_MEMORY_BYTES = 2**63 - 2
"""The largest memory accepted. Kubernetes caps a binary quantity above int64 at exactly 2**63 - 1
bytes, so refusing that value too is what lets the CRD refuse `9Ei` instead of silently capping it."""

_QUANTITY = re.compile(MEMORY_QUANTITY_PATTERN)
_SPLIT = re.compile(r"^\+?(?P<num>[0-9]*(\.[0-9]*)?)(?P<suffix>[KMGTPE]i|[kMGTPE]|[eE]\+?(?P<exp>[0-9]+))?$")
_EXAMPLES = "examples: 16Gi, 60G, 1.5Ti, 512Mi, 1e9"
# Largest first: format with the biggest unit that divides exactly.
_FORMAT_UNITS = [("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)]


def parse_quantity(value: object, *, field: str = "quantity") -> int:
    """Parse a memory quantity (`16Gi`, `60G`, `1.5Ti`, `1e9`, `42`) to whole bytes; refuse anything else."""
    if isinstance(value, bool) or value is None:
        raise QuantityError(f"{field}: expected a quantity like 16Gi, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise QuantityError(f"{field}: {value!r} is not a whole number of bytes ({_EXAMPLES})")
        value = int(value)
    if isinstance(value, int):
        return _in_range(value, value, field)
    if not isinstance(value, str):
        raise QuantityError(f"{field}: expected a quantity string like 16Gi, got {type(value).__name__}")
    if not _QUANTITY.fullmatch(value):
        raise QuantityError(f"{field}: {value!r} is not a memory quantity in whole bytes ({_EXAMPLES}){_hint(value)}")
    parts = _SPLIT.fullmatch(value)
    if parts is None:  # pragma: no cover - every string the grammar admits splits
        raise QuantityError(f"{field}: {value!r} is not a memory quantity ({_EXAMPLES})")
    number = Decimal(parts["num"])
    suffix = parts["suffix"] or ""
    if parts["exp"] is not None:
        exponent = int(parts["exp"])
        if exponent > 30 and number != 0:
            raise QuantityError(f"{field}: {value!r} is too large (at most {MAX_MEMORY_BYTES} bytes)")
        scaled = number.scaleb(min(exponent, 30))
    else:
        scaled = number * _BINARY.get(suffix, _DECIMAL.get(suffix, 1))
    if scaled != scaled.to_integral_value():  # pragma: no cover - the grammar admits whole bytes only
        raise QuantityError(f"{field}: {value!r} is not a whole number of bytes")
    return _in_range(int(scaled), value, field)


def _in_range(n: int, value: object, field: str) -> int:
    if n < 0:
        raise QuantityError(f"{field}: {value!r} is negative; memory must be >= 0")
    if n > MAX_MEMORY_BYTES:
        raise QuantityError(f"{field}: {value!r} is too large (at most {MAX_MEMORY_BYTES} bytes)")
    return n


def _hint(text: str) -> str:
    """Name the usual mistake, so the message says how to fix it."""
    if text != text.strip() or " " in text:
        return ": remove the spaces"
    if text.endswith("m") and text[:-1]:
        return f": 'm' means thousandths of a byte; did you mean {text[:-1]}Mi?"
    if text.endswith(("u", "n")):
        return f": {text[-1]!r} means a fraction of a byte"
    if "e-" in text.lower():
        return ": a negative exponent leaves a fraction of a byte"
    if text.startswith("-"):
        return ": memory must be >= 0"
    if "." in text and "e" in text.lower():
        return ": no fraction with an exponent (write 1.5G or 1500e6)"
    if text.count(".") == 1:
        return ": the fraction leaves part of a byte (use a smaller unit: 1.0625Gi is 1088Mi)"
    return ""


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
