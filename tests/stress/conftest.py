"""The stress tier: bounded concurrency and fault runs (what each proves: docs/benchmarks.md).

Why a tier of its own: these tests hammer the real servers with many threads, kill processes with
SIGKILL and rotate certificates under load, so they take longer than integration tests and load the
machine; `make test` runs them (`-m "... or stress"`), and `-m "not stress"` leaves them out. Every
test in this directory is marked ``stress`` here, so no test can forget the marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``stress`` (before ``-m`` deselection runs)."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.stress)
