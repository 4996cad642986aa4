"""`ibc bench` refuses bad input with one line and exit 2, before measuring anything."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param(["--only", "nope"], "choose from proxy, webhook, extender", id="unknown-section"),
    ],
)
def test_bad_bench_flags_exit_2_with_one_line(args, fragment):
    r = subprocess.run([sys.executable, "-m", "ibc", "bench", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
