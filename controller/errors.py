"""The controller's exceptions: a small tree so the reconcile loop can tell bad specs from API trouble.

A bad spec (template that cannot become a Deployment) is the user's to fix: it becomes a condition and
an Event and is not retried until the object changes. An API error (`kubeview.api.ApiError`) may be
transient and is retried with backoff. Neither may crash the controller.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every error the controller raises."""


class SpecError(ControllerError):
    """An InferenceModel's spec cannot be turned into a workload; `reason` is a CamelCase condition reason."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason


class TemplateError(SpecError):
    """The pod template cannot become a Deployment; the message names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="InvalidTemplate")


class NotLeader(ControllerError):
    """A write was attempted after this replica lost (or never held) the leader lease."""


class ObservationError(ControllerError):
    """An observed-memory source failed or answered with something that is not a measurement."""
