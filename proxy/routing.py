"""Which replica of a model gets a request: prefix affinity, so a replica's prefix cache is reused.

A model server such as vLLM keeps the KV blocks of prompts it has seen (automatic prefix caching); a
request whose prompt starts like an earlier one skips that part of the prefill and answers its first
token sooner, but only on the replica that holds those blocks. Least-outstanding balancing spreads
requests sharing a system prompt or a conversation over every replica, so each replica prefills it again.

`PrefixRouter` keeps, per replica, a bounded LRU table of the prompt-prefix keys it served
(`serving.prompt.prefix_keys` of the leading 1, 2, 4, 8 and 16 blocks), and sends a request to the
replica that served its longest known prefix last. A prefix seen by no replica goes to the replica its
first block hashes to (rendezvous hashing), so every worker and every proxy replica sends it to the same
place without talking to each other. The affinity yields to load: when that replica is saturated (as
many requests in flight as `max_in_flight`, when set) or far busier than the least loaded (`imbalance`
more requests in flight), the request goes to the least loaded replica, which then becomes the prefix's
home.

Everything here runs under `proxy.forward.Upstream`'s lock (its `acquire(backends, pick)`), on
in-flight counts of the calling worker; a request with no full block, or a model with one replica,
never gets here. Chosen by `ProxySettings.routing`: `prefix` (default), `least-outstanding`, `random`.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from proxy.settings import ProxySettings
from serving.prompt import prefix_keys, prompt_text

ROUTINGS = ("prefix", "least-outstanding", "random")  # the values of ProxySettings.routing

# A choice among a model's ready backends, given each one's requests in flight (called under a lock).
Pick = Callable[[list[str], Mapping[str, int]], str]


def least_loaded(backends: list[str], outstanding: Mapping[str, int]) -> tuple[str, int]:
    """The backend with the fewest requests in flight (the first of equals) and that count."""
    best = backends[0]
    best_count = outstanding.get(best, 0)
    for backend in backends[1:]:
        count = outstanding.get(backend, 0)
        if count < best_count:
            best, best_count = backend, count
    return best, best_count


def rendezvous(key: bytes, backends: list[str]) -> str:
    """The backend with the highest hash of (key, backend): stable while the set of backends stays."""
    return max(backends, key=lambda b: hashlib.blake2b(key + b.encode(), digest_size=8).digest())


class PrefixRouter:
    """Per-worker affinity tables; not thread-safe by itself (Upstream's lock serializes `pick`)."""

    def __init__(
        self,
        *,
        max_blocks: int = 16,
        entries_per_replica: int = 4096,
        imbalance: int = 4,
        max_in_flight: int | None = None,
    ) -> None:
        if max_blocks < 1 or entries_per_replica < 1 or imbalance < 1:
            raise ValueError("max_blocks, entries_per_replica and imbalance must be >= 1")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_blocks = max_blocks
        self._lengths = [1 << i for i in range(max_blocks.bit_length()) if 1 << i < max_blocks] + [max_blocks]
        self.entries_per_replica = entries_per_replica
        self.imbalance = imbalance
        self.max_in_flight = max_in_flight
        self._home: dict[bytes, str] = {}  # block key -> the replica that served it last
        self._tables: dict[str, OrderedDict[bytes, None]] = {}  # replica -> its keys, least recent first

    def keys(self, payload: Mapping[str, Any]) -> list[bytes]:
        """The keys of the request's leading 1, 2, 4, ... full blocks (none for a short or prompt-less
        request): a few hashes, not one per block, still tell a shared head from a shared system prompt."""
        return prefix_keys(prompt_text(payload), self._lengths)

    def pick(self, keys: list[bytes], backends: list[str], outstanding: Mapping[str, int]) -> tuple[str, str]:
        """The replica for a request and why (`affinity`, `new`, `yielded`): its prefix's home unless
        saturated or far busier than the least loaded; the choice becomes the home of all its keys."""
        home, outcome = self.home(keys, backends)
        least, least_count = least_loaded(backends, outstanding)
        chosen = home
        if self.too_busy(outstanding.get(home, 0), least_count):
            chosen, outcome = least, "yielded"
        self._record(keys, chosen, backends)
        return chosen, outcome

    def home(self, keys: list[bytes], backends: list[str]) -> tuple[str, str]:
        """The replica that served the longest of these prefixes last (`affinity`), else the first block's
        rendezvous replica (`new`); `keys` is not empty."""
        for key in reversed(keys):
            home = self._home.get(key)
            if home is not None and home in backends:
                return home, "affinity"
        return rendezvous(keys[0], backends), "new"

    def too_busy(self, in_flight: int, least_in_flight: int) -> bool:
        """Saturated, or so much busier than the least loaded replica that waiting costs more than prefill."""
        if self.max_in_flight is not None and in_flight >= self.max_in_flight:
            return True
        return in_flight - least_in_flight >= self.imbalance

    def _record(self, keys: list[bytes], backend: str, backends: list[str]) -> None:
        table = self._tables.get(backend)
        if table is None:
            if len(self._tables) >= 4 * len(backends) + 16:  # replicas come and go (pod IPs): forget the gone
                for gone in [b for b in self._tables if b not in backends]:
                    self._forget(gone)
            table = self._tables[backend] = OrderedDict()
        home = self._home
        for key in keys:
            previous = home.get(key)
            if previous is not None and previous != backend:
                self._tables.get(previous, {}).pop(key, None)
            home[key] = backend
            table[key] = None
            table.move_to_end(key)
        while len(table) > self.entries_per_replica:
            old, _ = table.popitem(last=False)
            if home.get(old) == backend:
                del home[old]

    def _forget(self, backend: str) -> None:
        for key in self._tables.pop(backend, ()):
            if self._home.get(key) == backend:
                del self._home[key]

    def size(self) -> int:
        """Keys remembered across all replicas (bounded by entries_per_replica per replica)."""
        return len(self._home)


def random_pick(backends: list[str], outstanding: Mapping[str, int]) -> str:
    """Uniformly random: the baseline the benchmark compares against."""
    return random.choice(backends)


Count = Callable[[str, str], None]  # (model, outcome) of a prefix-routed request, e.g. ProxyMetrics.count_route


class Routing:
    """The request path's routing setting, as the one call it makes per request."""

    def __init__(self, name: str, prefix: PrefixRouter | None = None, count: Count | None = None) -> None:
        if name not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {name!r}")
        if (name == "prefix") != (prefix is not None):
            raise ValueError("prefix routing needs its PrefixRouter (and only it does)")
        self.name = name
        self.prefix = prefix
        self.count = count

    def for_request(self, payload: Mapping[str, Any], backends: list[str], model: str = "") -> Pick | None:
        """How to choose among `backends` for this request; None: least outstanding (Upstream's own)."""
        if len(backends) < 2:
            return None
        router = self.prefix
        if router is None:
            return random_pick if self.name == "random" else None
        keys = router.keys(payload)
        if not keys:
            return None
        count = self.count

        def pick(backends: list[str], outstanding: Mapping[str, int]) -> str:
            chosen, outcome = router.pick(keys, backends, outstanding)
            if count is not None:
                count(model, outcome)
            return chosen

        return pick


def routing_of(settings: ProxySettings, count: Count | None = None) -> Routing:
    """The routing `settings` ask for; `count(model, outcome)` is told of every prefix-routed request."""
    if settings.routing != "prefix":
        return Routing(settings.routing)
    router = PrefixRouter(
        max_blocks=settings.prefix_blocks,
        entries_per_replica=settings.prefix_entries_per_replica,
        imbalance=settings.prefix_imbalance,
        max_in_flight=settings.prefix_max_in_flight,
    )
    return Routing("prefix", router, count)
