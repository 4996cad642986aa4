"""The controller's exceptions: a small tree so the reconcile loop can tell bad specs from API trouble.

A bad spec (template that cannot become a Deployment) is the user's to fix: it becomes a condition and
an Event and is not retried until the object changes. An API error may be transient and is retried
with backoff. Neither may crash the controller.
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


class KubeError(ControllerError):
    """The API server answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def denied_by_webhook(self) -> bool:
        """True when an admission webhook refused the write (the message says so)."""
        return "admission webhook" in self.message and "denied the request" in self.message


class NotLeader(ControllerError):
    """A write was attempted after this replica lost (or never held) the leader lease."""


class ObservationError(ControllerError):
    """An observed-memory source failed or answered with something that is not a measurement."""
