"""How the proxy brings a model to N replicas without knowing how replicas come to exist.

Two implementations: the Kubernetes scaler (PATCH `inferencemodels/<name>/scale`, the webhook decides,
endpoints come from ready pods) and the local scaler (decides with `budget/`, starts processes).
Local mode is the proxy with the local scaler, not a second proxy.

How the request path (`proxy/app.py`) uses a scaler, so implementations know what is hot:

- every routed request calls `view()` (keep it cached until something changes: the router re-indexes
  models only when it gets a different view object), `touch()` and `backends()`: these three must be
  cheap, non-blocking and never do I/O on the caller's thread;
- only when `backends()` is empty: `budget.decide_scale(view(), key, max(1, model.replicas), now)` is
  checked locally first (a "no" is a 429 without calling the scaler), then `scale_up(key, replicas)` is
  called by one request per model at a time (others wait on its outcome), then `wait_backends()` is
  called in a loop with short timeouts (about 0.5 s) until a backend is ready or the wait expires;
- `scale_up()` may be called again while replicas are already starting (a new burst of requests): it
  should then return quickly without changing anything;
- `GET /v1/models` calls `state()` once per model;
- optional (added after the first version; looked up with `getattr`, so older scalers still work):
  `ready() -> bool`, whether the scaler has its initial state (e.g. the watch cache is synced);
  `/readyz` answers 503 while it is False;
  `details(key) -> dict`, extra fields for the model's entries in `GET /v1/models` and `GET /status` (local mode:
  `lastFailure`, `lastFailureTime`, `recentFailures`, `nextStartAttempt`, and `log`, its own log file; both:
  the load layer's `minReplicas`, `maxReplicas`, `replicasWanted`, `replicasAllowed`, `loadMessage`).
- optional (local mode): `can_make_room(key, replicas) -> bool`, asked before the proxy answers 429
  (True when stopping idle models, or memory an eviction is freeing, would let the start fit: the
  request then goes to `scale_up`, which decides for real), and `note(key) -> str | None`, what was
  done to start the model (e.g. which model was stopped for it), sent to held streaming clients.
"""

from __future__ import annotations

from typing import Protocol

from budget import ClusterView, Decision


class ScaleDenied(Exception):
    """The scale-up was refused; `decision` carries the explanation for the 429 body."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision


class ScalerUnavailable(Exception):
    """The scaler could not be reached or failed (API server down, process failed to spawn).

    `retry_after_seconds`, when the scaler knows it, is when a new attempt can be made (e.g. the end of a
    crash-loop backoff); the proxy sends it as `Retry-After`.
    """

    def __init__(self, message: str, *, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Scaler(Protocol):
    """What the proxy's request path needs from the world. Every method is thread-safe."""

    def view(self) -> ClusterView:
        """The current budget view (models, nodes, placements) for the fast pre-check."""
        ...

    def backends(self, model_key: str) -> list[str]:
        """Base URLs (e.g. `http://10.244.0.5:8000`) of ready replicas; empty while none is ready."""
        ...

    def scale_up(self, model_key: str, replicas: int) -> None:
        """Ask for `replicas` desired replicas; raises ScaleDenied or ScalerUnavailable."""
        ...

    def wait_backends(self, model_key: str, timeout_seconds: float) -> list[str]:
        """Block up to `timeout_seconds` for a ready replica; returns [] on timeout (callers loop).

        May raise ScalerUnavailable when the start has failed for good (e.g. the process exited): every
        held request then gets 503 `scaler_unavailable` (an SSE `error` event if streaming) with its
        message at once, instead of waiting for the cold-start timeout.
        """
        ...

    def touch(self, model_key: str, now: float) -> None:
        """Record a request for the idle clock (implementations throttle their writes)."""
        ...

    def state(self, model_key: str) -> str:
        """`ready`, `starting`, `stopped` or `failed`, for `GET /v1/models`."""
        ...
