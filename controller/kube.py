"""The controller's door to the API server: `kubeview.api.Kube` with every write fenced by leadership.

The reconcile logic works on plain dicts (the API's own JSON) through the one API layer every part
uses (`kubeview.api`: resources know their paths; failures are `ApiError` with the HTTP status). What
the controller adds: every write first asks ``may_write()`` (is this replica still the leader?) and
raises :class:`NotLeader` if not, its timeout is cut to ``write_seconds_left()`` (so no write of a
deposed leader outlives its renew deadline), and every write names the controller's field manager.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from controller.errors import NotLeader
from controller.translate import FIELD_MANAGER
from kubeview import api


class Kube(api.Kube):
    """JSON in, JSON out; every mutating call is fenced by ``may_write`` and bounded by the lease."""

    def __init__(
        self,
        client: Any,
        *,
        may_write: Callable[[], bool] = lambda: True,
        write_seconds_left: Callable[[], float] = lambda: math.inf,
        field_manager: str = FIELD_MANAGER,
        timeout_seconds: float = api.DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(client, field_manager=field_manager, timeout_seconds=timeout_seconds)
        self.may_write = may_write
        self.write_seconds_left = write_seconds_left

    def before(self, method: str, path: str, timeout: float) -> float:
        """Refuse a write unless leading; cut a write's timeout to the time left before the renew deadline."""
        seconds = min(timeout, self.timeout_seconds)
        if method == "GET":
            return seconds
        left = self.write_seconds_left()
        if not self.may_write() or left <= 0:
            raise NotLeader(f"not the leader: refusing {method} {path}")
        return min(seconds, left)
