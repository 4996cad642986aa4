"""The `/metrics` exposition every server answers with: its own registry, or, under several gunicorn
workers (`PROMETHEUS_MULTIPROC_DIR` set by `serving.runner`), every worker's values merged."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def render(registry: CollectorRegistry, *, multiprocess: bool | None = None) -> tuple[bytes, str]:
    """The exposition text and its content type. `multiprocess=None` follows the environment; a server
    whose metrics live in one process (the controller) passes False."""
    if multiprocess is None:
        multiprocess = bool(os.environ.get(MULTIPROC_ENV))
    if multiprocess:
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
