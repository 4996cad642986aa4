"""A Scaler over a fixed view whose backends are set by hand: for tests, benchmarks and demos.

The request path only knows the `Scaler` protocol; this implementation lets tests and `bench/` drive
it without a cluster or a process runtime: they decide what `scale_up` does (a callback, which may start
a mock backend, raise ScaleDenied, or do nothing) and mark backends ready with `set_backends`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from budget import ClusterView

ScaleHook = Callable[[str, int], None]


class StaticScaler:
    """Thread-safe; records every `scale_up` and `touch` call for assertions."""

    def __init__(
        self,
        view: ClusterView,
        backends: Mapping[str, list[str]] | None = None,
        *,
        on_scale_up: ScaleHook | None = None,
    ) -> None:
        self._view = view
        self._backends: dict[str, list[str]] = {k: list(v) for k, v in (backends or {}).items()}
        self._on_scale_up = on_scale_up
        self._changed = threading.Condition()
        self.scale_calls: list[tuple[str, int]] = []
        self.touches: dict[str, float] = {}
        self.failed: set[str] = set()

    def view(self) -> ClusterView:
        return self._view

    def set_view(self, view: ClusterView) -> None:
        with self._changed:
            self._view = view
            self._changed.notify_all()

    def backends(self, model_key: str) -> list[str]:
        return self._backends.get(model_key, [])

    def set_backends(self, model_key: str, urls: list[str]) -> None:
        """Mark these base URLs as the ready replicas of the model and wake waiting requests."""
        with self._changed:
            self._backends[model_key] = list(urls)
            self._changed.notify_all()

    def scale_up(self, model_key: str, replicas: int) -> None:
        with self._changed:
            self.scale_calls.append((model_key, replicas))
            model = self._view.models.get(model_key)
            if model is not None and model.replicas < replicas:
                self._view = self._view.with_model(replace(model, replicas=replicas))
        if self._on_scale_up is not None:
            self._on_scale_up(model_key, replicas)

    def wait_backends(self, model_key: str, timeout_seconds: float) -> list[str]:
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            while not self._backends.get(model_key):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._changed.wait(remaining)
            return list(self._backends[model_key])

    def touch(self, model_key: str, now: float) -> None:
        self.touches[model_key] = now

    def state(self, model_key: str) -> str:
        if model_key in self.failed:
            return "failed"
        if self._backends.get(model_key):
            return "ready"
        model = self._view.models.get(model_key)
        return "starting" if model is not None and model.replicas > 0 else "stopped"
