"""The one table of memory quantities: what the grammar accepts (with its bytes) and what it refuses.

The parser (tests/unit/test_quantity.py), the CRD's pattern run offline (tests/unit/test_crd_schema.py)
and the CRD on a real apiserver (tests/cluster/test_crd_quantities.py) are all checked against it, so
`spec.memory`, the memory annotations and local mode's config cannot drift apart again.
"""

from __future__ import annotations

GI = 2**30

# (text, bytes): every one is accepted everywhere and means exactly these bytes.
ACCEPTED: list[tuple[str, int]] = [
    ("16Gi", 16 * GI),
    ("512Mi", 512 * 2**20),
    ("1.5Ti", 3 * 2**39),
    (".5Gi", GI // 2),
    ("0.125Ki", 128),
    ("1.75Gi", 7 * 2**28),
    ("2.250Gi", 9 * 2**28),
    ("60G", 60 * 10**9),
    ("1.5k", 1500),
    ("2.25G", 2_250_000_000),
    ("0.000000000000000001E", 1),
    ("1e9", 10**9),
    ("1E3", 1000),
    ("129e6", 129_000_000),
    ("1e+3", 1000),
    ("42", 42),
    ("0", 0),
    ("+1Ki", 1024),
    ("17179869184", 16 * GI),
    ("7Ei", 7 * 2**60),
    ("9223372036854775806", 2**63 - 2),
]

# text -> why it is refused (the test id). The CRD's pattern refuses these.
REFUSED: dict[str, str] = {
    "100m": "milli-bytes",
    "80m": "milli-annotation",
    "1u": "micro",
    "1n": "nano",
    "1e-3": "negative-exponent",
    "1E-2": "negative-exponent-upper",
    "1e1.5": "fractional-exponent",
    "1.5e9": "fraction-with-exponent",
    "1.5": "fractional-byte",
    "1.": "trailing-dot",
    "1.0001k": "fraction-below-a-byte",
    "1.0625Gi": "sixteenths-of-a-binary-unit",
    " 8Gi ": "surrounding-spaces",
    "16Gi ": "trailing-space",
    "16 Gi": "space-inside",
    "-1Gi": "negative",
    "16GB": "not-a-suffix",
    "16gi": "lowercase-binary",
    "1Ki8": "digits-after-suffix",
    "1.2.3Gi": "two-dots",
    "Gi": "suffix-only",
    "": "empty",
    "abc": "letters",
    "1e": "dangling-exponent",
}

# Well-formed but 8Ei or more: the CRD's range rule (CEL) refuses these, the parser too.
TOO_LARGE: dict[str, str] = {
    "9223372036854775807": "int64-max",
    "8Ei": "8Ei",
    "16Ei": "capped-binary",
    "1e19": "above-int64",
    "1e400": "huge-exponent",
}
