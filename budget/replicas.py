"""What the budget allows of what the load layer wants: "wants 3, budget allows 2, blocked by X (idle 40s)".

The load rule (:mod:`budget.load`) says how many replicas the traffic needs; every step up is then
decided by :func:`budget.decide_scale`, exactly as a cold start or a person's `kubectl scale` is.
When the budget refuses, this module names the largest count it does allow and who holds the rest,
in one sentence the model's status, its Event, `/v1/models` and the log all show.
"""

from __future__ import annotations

from dataclasses import dataclass

from budget.decide import Decision, _describe_blocking, decide_scale
from budget.view import ClusterView


@dataclass(frozen=True)
class ReplicaVerdict:
    """The load layer's wish against the budget: `allowed` replicas of `wanted` (equal when it fits)."""

    model: str
    wanted: int
    allowed: int
    decision: Decision  # the budget's answer for `wanted`

    @property
    def blocked(self) -> bool:
        return self.allowed < self.wanted

    @property
    def message(self) -> str:
        """One sentence for people; says who blocks when the budget refuses."""
        if not self.blocked:
            return f"{self.model} wants {self.wanted}, budget allows it"
        text = f"{self.model} wants {self.wanted}, budget allows {self.allowed}"
        if self.decision.blocking:
            text += ", blocked by " + ", ".join(_describe_blocking(b) for b in self.decision.blocking)
        else:
            text += f" ({self.decision.message})"
        return text


def budget_for(view: ClusterView, model_ref: str, wanted: int, now: float, *, leaving: int = 0) -> ReplicaVerdict:
    """The budget's answer to `wanted` replicas, and the largest count at or above today's it allows.

    `leaving`: replicas of this model still stopping, which hold their memory until gone and are counted
    in the view's replicas; they are asked for beside the wanted ones and left out of the numbers shown.
    """
    target = wanted + leaving
    decision = decide_scale(view, model_ref, target, now)
    model = view.find_model(model_ref)
    assert model is not None  # decide_scale raised UnknownModelError otherwise
    name = model.model_name or model.name
    if decision.allowed:
        return ReplicaVerdict(name, wanted, wanted, decision)
    allowed = model.replicas  # today's count stands (a decrease is always allowed); one more while it fits
    while allowed + 1 < target and decide_scale(view, model_ref, allowed + 1, now).allowed:
        allowed += 1
    return ReplicaVerdict(name, wanted, max(0, allowed - leaving), decision)
