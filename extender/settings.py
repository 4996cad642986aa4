"""The extender's settings, grouped in one dataclass so `create_app(settings, source)` is all a test needs.

Each default says why it is that value; the command line (`ibc extender`) maps flags onto these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["spread", "binpack"]


@dataclass(frozen=True)
class Settings:
    """How the extender decides and answers."""

    # How long memory promised to a pod at filter (or bind) time is held if the watch never shows the
    # pod bound. The scheduler binds within milliseconds; 30 s outlives a slow binding cycle and a
    # lagging watch, yet frees the memory soon after a pod that was never bound (scheduler restart).
    reservation_ttl_seconds: float = 30.0
    # Reserve at filter time. Off only when several extender processes must share the traffic (then
    # no single process owns the book, and concurrently scheduled pods may be told "fits" twice).
    reservations: bool = True
    # With bindVerb configured the extender posts the Binding itself after re-checking the fit.
    bind_pods: bool = True
    # "spread" places model replicas on the emptiest node (fewer noisy neighbours); "binpack" keeps
    # large holes free for large models. Spread is the safer default for latency-sensitive serving.
    score_strategy: Strategy = "spread"
    # The Nodes form carries every full Node object; 5,000 real nodes are tens of MiB. The cap keeps a
    # runaway client from exhausting memory while leaving room for large clusters (prefer NodeNames).
    max_request_bytes: int = 64 * 2**20
    # Bound on one Binding POST, well inside the scheduler's httpTimeout (the deploy config uses 10 s).
    bind_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.reservation_ttl_seconds <= 0:
            raise ValueError(f"reservation_ttl_seconds must be > 0, got {self.reservation_ttl_seconds!r}")
        if self.score_strategy not in ("spread", "binpack"):
            raise ValueError(f"score_strategy must be spread or binpack, got {self.score_strategy!r}")
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be > 0, got {self.max_request_bytes!r}")
        if self.bind_timeout_seconds <= 0:
            raise ValueError(f"bind_timeout_seconds must be > 0, got {self.bind_timeout_seconds!r}")
