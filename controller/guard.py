"""Never fight another writer in a loop: skip pointless re-applies and back off from real fights.

Why this module exists: the controller applies a Deployment whenever the live object does not contain
what it wants. Two things can make that check fail forever: the API server normalizing a value
(``cpu: 0.5`` comes back as ``500m``), and another writer (a GitOps tool, an HPA, a person) changing a
field the controller owns. The first must not cause a write per reconcile; the second must not become
an endless tug of war. Both are told apart by the Deployment's ``metadata.generation``, which moves only
when someone changes its spec. Pure: times are passed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def digest(config: Mapping[str, Any]) -> str:
    """A stable fingerprint of an apply configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class _Record:
    digest: str
    generation: int
    reverts: list[float] = field(default_factory=list)
    hold_until: float = 0.0
    held: bool = False


@dataclass(frozen=True)
class GuardOutcome:
    """`write` now or not; `hold_seconds` > 0 when backing off from a fight; `revert` when undoing a change."""

    write: bool
    revert: bool = False
    hold_seconds: float = 0.0


class FightGuard:
    """Per-object memory of the last apply: what was applied and the generation it produced."""

    def __init__(
        self,
        *,
        window_seconds: float = 300.0,
        max_reverts: int = 3,
        hold_seconds: float = 60.0,
        max_hold_seconds: float = 900.0,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_reverts = max_reverts
        self.hold_seconds = hold_seconds
        self.max_hold_seconds = max_hold_seconds
        self._records: dict[str, _Record] = {}

    def check(self, key: str, config_digest: str, live_generation: int | None, now: float) -> GuardOutcome:
        """Should the controller apply `config_digest` to the object `key`, whose spec is at `live_generation`?"""
        rec = self._records.get(key)
        if rec is None or live_generation is None or rec.digest != config_digest:
            return GuardOutcome(write=True)  # first time, object gone, or the model changed: apply
        if live_generation == rec.generation:
            return GuardOutcome(write=False)  # nobody touched the spec since our apply: normalization only
        rec.reverts = [t for t in rec.reverts if now - t < self.window_seconds]
        if now < rec.hold_until:
            return GuardOutcome(write=False, revert=True, hold_seconds=rec.hold_until - now)
        if rec.held:  # a hold just ended: try once more; losing again doubles the next hold
            rec.held = False
            rec.reverts.append(now)
            return GuardOutcome(write=True, revert=True)
        if len(rec.reverts) >= self.max_reverts:
            over = len(rec.reverts) - self.max_reverts
            hold = min(self.max_hold_seconds, self.hold_seconds * 2**over)
            rec.hold_until, rec.held = now + hold, True
            return GuardOutcome(write=False, revert=True, hold_seconds=hold)
        rec.reverts.append(now)
        return GuardOutcome(write=True, revert=True)

    def applied(self, key: str, config_digest: str, generation: int) -> None:
        """Remember the apply of `config_digest` that left the object at `generation`."""
        rec = self._records.get(key)
        if rec is None or rec.digest != config_digest:
            self._records[key] = _Record(config_digest, generation)
        else:
            rec.generation = generation

    def forget(self, key: str) -> None:
        self._records.pop(key, None)
