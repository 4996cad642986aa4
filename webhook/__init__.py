"""The validating admission webhook: InferenceModels and model Deployments, including their `/scale`.

The kube-apiserver asks `POST /validate` before it stores a create, update or scale of a model
workload; the webhook answers with the same decision (and the same explanation) as the proxy's 429,
and commits what it admits to a shared ledger first, so concurrent admissions in several processes and
replicas never overcommit the memory budget. See docs/admission-webhook.md.
"""

from webhook.app import CacheLookup, create_app
from webhook.ledger import LedgerEntry, LocalLedger
from webhook.settings import WebhookSettings

__all__ = ["CacheLookup", "LedgerEntry", "LocalLedger", "WebhookSettings", "create_app"]
