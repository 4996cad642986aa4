"""The budget core's exceptions: each names the bad input so an edge can turn it into a clear 4xx."""

from __future__ import annotations


class BudgetError(ValueError):
    """Base of every error the budget core raises on bad input."""


class QuantityError(BudgetError):
    """A Kubernetes quantity could not be parsed."""


class DurationError(BudgetError):
    """A duration such as `cooldownPeriod` could not be parsed."""


class ObjectError(BudgetError):
    """A Kubernetes object (Node, Pod, Deployment, InferenceModel) is malformed."""


class SnapshotError(BudgetError):
    """A cluster snapshot file cannot be read or holds no usable objects."""


class UnknownModelError(BudgetError):
    """A decision was asked for a model the view does not know."""
