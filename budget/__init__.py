"""The pure core of the Inference Budget Controller.

Everything that decides whether memory fits lives here, free of I/O and of flask, kubernetes,
httpx and prometheus_client, so the proxy's fast path, the admission webhook and the scheduler
extender answer from one function: :func:`budget.decide.decide_scale` for admission and
:func:`budget.decide.filter_nodes` / :func:`budget.decide.score_nodes` for node placement.
"""

from budget.advice import ModelMemory, SizingAdvice, advise, metrics_body
from budget.decide import (
    NEVER_REASONS,
    REASON_INSUFFICIENT,
    REASON_NO_BUDGET,
    REASON_SELECTOR,
    Blocking,
    Decision,
    NodeVerdict,
    RetryPlan,
    decide_scale,
    explain,
    filter_nodes,
    idle_seconds,
    plan_retry,
    score_nodes,
    without,
)
from budget.errors import (
    BudgetError,
    DurationError,
    ObjectError,
    QuantityError,
    SnapshotError,
    UnknownModelError,
)
from budget.evict import Eviction, Victim, plan_eviction
from budget.quantity import format_bytes, format_duration, parse_duration, parse_quantity
from budget.view import ClusterView, Device, Model, Node, Placement, PodRequest, Reservation

__all__ = [
    "NEVER_REASONS",
    "REASON_INSUFFICIENT",
    "REASON_NO_BUDGET",
    "REASON_SELECTOR",
    "Blocking",
    "BudgetError",
    "ClusterView",
    "Decision",
    "Device",
    "DurationError",
    "Eviction",
    "Model",
    "ModelMemory",
    "Node",
    "NodeVerdict",
    "ObjectError",
    "Placement",
    "PodRequest",
    "QuantityError",
    "Reservation",
    "RetryPlan",
    "SizingAdvice",
    "SnapshotError",
    "UnknownModelError",
    "Victim",
    "advise",
    "decide_scale",
    "explain",
    "filter_nodes",
    "format_bytes",
    "format_duration",
    "idle_seconds",
    "metrics_body",
    "parse_duration",
    "parse_quantity",
    "plan_eviction",
    "plan_retry",
    "score_nodes",
    "without",
]
