"""The kube-scheduler extender: places model pods only where the inference memory budget allows.

A second kube-scheduler (profile `inference-budget-scheduler`) calls `POST /filter`, `/prioritize`
and `/bind`; every memory decision is `budget.filter_nodes` / `budget.score_nodes`, the same core
the webhook and the proxy use, on the list+watch cache's view plus this process's reservation book.
"""

from extender.app import create_app
from extender.reservations import ReservationBook
from extender.settings import Settings
from extender.source import CacheSource

__all__ = ["CacheSource", "ReservationBook", "Settings", "create_app"]
