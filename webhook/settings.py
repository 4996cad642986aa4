"""The webhook's settings, one frozen dataclass, so `create_app(settings, ...)` is all a test needs.

Each default says why it is that value; `ibc webhook` maps its flags onto these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from webhook.ledger import DEFAULT_PRUNE_GRACE_SECONDS, DEFAULT_TTL_SECONDS


@dataclass(frozen=True)
class WebhookSettings:
    """How the webhook decides, answers and shares admitted demand."""

    # 403 Forbidden is what kubectl users expect from a policy; 429 tells automated clients (the proxy,
    # an HPA-like loop) that retrying later may succeed. Both carry the same explanation.
    deny_code: int = 403
    # Where the admission ledger lives: the webhook's own namespace, which the webhook configuration
    # excludes, so writing the ledger never calls the webhook.
    ledger_namespace: str = "ibc-system"
    ledger_name: str = "ibc-admission-ledger"
    ledger_ttl_seconds: float = DEFAULT_TTL_SECONDS
    ledger_prune_grace_seconds: float = DEFAULT_PRUNE_GRACE_SECONDS
    # Re-read and re-decide this often after a 409 Conflict before answering "busy, retry". Each attempt
    # costs a GET and a PUT (a few ms); eight absorb a burst of scale-ups spread over a few processes.
    ledger_max_attempts: int = 8
    # The whole decide-and-commit must end well inside the configuration's timeoutSeconds (5 s).
    ledger_deadline_seconds: float = 3.0
    # The apiserver gives up on a webhook after its timeoutSeconds (sent as `?timeout=5s`; 10 s when the
    # configuration sets none) and, with failurePolicy Fail, tells the user only "failed calling webhook".
    # A review that cannot be decided by then minus this margin (the answer's way back and the apiserver's
    # own work, on a loaded 2-core node) is denied at once with "busy, retry" (429 + Retry-After) instead.
    answer_margin_seconds: float = 1.0
    default_timeout_seconds: float = 10.0
    # What a "busy" denial asks the client to wait: a burst is over in about a second.
    busy_retry_after_seconds: int = 1
    # A declared memory more than 20% above the observed peak earns a kubectl Warning: below that the
    # difference is within normal variation of KV-cache use; above it, memory is being wasted.
    warn_over_ratio: float = 0.2
    # A Deployment review with managedFields is ~10 KiB; objects are capped at ~1.5 MiB by etcd. 4 MiB
    # lets every legal review through and stops a runaway client.
    max_request_bytes: int = 4 * 2**20
    # Offline mode (--cluster-state) has nothing to sync; live mode denies ("retry") until the cache
    # has listed every kind, because an empty view would admit anything.
    require_synced: bool = True

    def __post_init__(self) -> None:
        if self.deny_code not in (403, 429):
            raise ValueError(f"deny_code must be 403 or 429, got {self.deny_code!r}")
        if self.ledger_ttl_seconds <= 0:
            raise ValueError(f"ledger_ttl_seconds must be > 0, got {self.ledger_ttl_seconds!r}")
        if self.ledger_prune_grace_seconds < 0:
            raise ValueError(f"ledger_prune_grace_seconds must be >= 0, got {self.ledger_prune_grace_seconds!r}")
        if self.ledger_max_attempts < 1:
            raise ValueError(f"ledger_max_attempts must be >= 1, got {self.ledger_max_attempts!r}")
        if self.ledger_deadline_seconds <= 0:
            raise ValueError(f"ledger_deadline_seconds must be > 0, got {self.ledger_deadline_seconds!r}")
        if self.answer_margin_seconds < 0 or self.default_timeout_seconds <= 0:
            raise ValueError("answer_margin_seconds must be >= 0 and default_timeout_seconds > 0")
        if self.busy_retry_after_seconds < 1:
            raise ValueError(f"busy_retry_after_seconds must be >= 1, got {self.busy_retry_after_seconds!r}")
        if self.warn_over_ratio < 0:
            raise ValueError(f"warn_over_ratio must be >= 0, got {self.warn_over_ratio!r}")
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be > 0, got {self.max_request_bytes!r}")
