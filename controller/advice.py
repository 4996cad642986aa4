"""Right-sizing advice as the controller publishes it: status fields, gauges and the log hint.

Why this module exists: the computation itself is :func:`budget.advise` (pure, bytes in, advice out,
shared with local mode so both read the same way); this module is the controller's adapter from that
value to what ``kubectl get inferencemodel -o yaml`` shows. Advice only: nothing here changes a spec.
"""

from __future__ import annotations

from budget import SizingAdvice, advise
from budget.advice import DEFAULT_HEADROOM_PERCENT
from budget.objects import rfc3339
from budget.quantity import format_bytes
from controller.status import Advice as StatusAdvice

__all__ = ["DEFAULT_HEADROOM_PERCENT", "recommend", "status_advice"]


def recommend(
    model: str, declared_bytes: int, observed_peak_bytes: int, headroom_percent: float = DEFAULT_HEADROOM_PERCENT
) -> SizingAdvice | None:
    """The budget's advice for one model; None when nothing is declared (no ratio to speak of)."""
    if declared_bytes <= 0:
        return None
    return advise(model, declared_bytes, observed_peak_bytes, headroom_percent=headroom_percent)


def status_advice(
    declared_text: str, advice: SizingAdvice | None, peak_bytes: int | None, observed_at: float | None
) -> StatusAdvice:
    """The status fields: declared as written, the peak exactly (it is read back after a restart)."""
    if advice is None or peak_bytes is None:
        return StatusAdvice(declared_memory=declared_text)
    return StatusAdvice(
        declared_memory=declared_text,
        observed_peak_memory=format_bytes(peak_bytes),
        utilization_percent=advice.utilization_percent,
        recommendation=advice.recommendation,
        last_observation=rfc3339(observed_at) if observed_at else None,
    )
