"""The proxy's settings: one frozen dataclass, built from flags by `ibc proxy` / `ibc local` or by tests.

Each default says why it is that value, because most of them trade a client's patience against
memory or threads held by the proxy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A setting is out of range or a file it names cannot be read."""


@dataclass(frozen=True)
class ProxySettings:
    """Behaviour of the request path; Kubernetes specifics live in the scaler, not here."""

    # SHA-256 digests of accepted bearer tokens; empty = no authentication (e.g. behind a gateway).
    api_key_digests: frozenset[bytes] = frozenset()
    # 16 MiB: long prompts and embedding batches fit; a runaway upload does not reach a backend.
    max_body_bytes: int = 16 * 1024 * 1024
    # 600 s: a vLLM cold start (image pull + weight load of a 70B model) takes minutes.
    cold_start_timeout_seconds: float = 600.0
    # 4096 per model: under gevent a held request is a greenlet (~64 KiB with its socket), so a burst
    # of a few thousand clients waits for the start; beyond this a client is better told "queue_full".
    queue_size: int = 4096
    # Held requests of all models together (None = no limit). Under gthread each holds a server thread,
    # so the commands keep some threads of every worker for warm models during a cold-start burst.
    max_held_requests: int | None = None
    # Memory all held requests of a worker may use together (their bodies + HELD_OVERHEAD_BYTES each);
    # None = no limit. The commands default to an eighth of the memory available at start (or of the
    # container's memory limit when that is less), at most 4 GiB.
    max_held_bytes: int | None = None
    # 30 s for the whole request body once its head arrived: a 16 MiB upload needs ~4.5 Mbit/s; a client
    # that stalls (announces more than it sends) gets 408 and its connection closed, not a held slot.
    body_timeout_seconds: float = 30.0
    # How often a waiting streaming client gets an SSE comment (also keeps idle-timeout proxies happy).
    progress_interval_seconds: float = 5.0
    # How often a waiting non-streaming request checks whether its client has hung up.
    disconnect_check_seconds: float = 0.5
    # Upstream: connecting is fast or broken; generating may take minutes.
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 600.0
    # Keep-alive connections per worker to all backends together: one per request in flight at once
    # (a thread each under gthread; the commands give gevent workers `--connections`).
    max_connections: int = 256
    # How requests reach backends: "lean" (proxy.transport.LeanTransport), "httpcore" (httpx's own
    # transport) or "client" (httpx.Client.send); see proxy.forward.Upstream and bench/proxy_bench.py.
    upstream: str = "lean"
    # Retry-After when a scale-up failed for a reason that has no better estimate.
    default_retry_after_seconds: int = 30
    # Extra response header naming the backend that answered (debugging, tests); off by default.
    expose_backend_header: bool = False
    # Which replica of a model gets a request (proxy/routing.py): "prefix" (the one holding the prompt's
    # prefix in its cache; measured faster in bench/RESULTS.md), "least-outstanding" or "random".
    routing: str = "prefix"
    # Prefix routing yields to load: a replica with this many more requests in flight than the least
    # loaded one, or (when set) with prefix_max_in_flight in flight, is too busy to keep its prefixes.
    prefix_imbalance: int = 4
    prefix_max_in_flight: int | None = None
    # 16 blocks of 64 bytes: the first 1 KiB of a prompt (a system prompt, a shared document's head)
    # tells prefixes apart; hashing more costs time on every request for no better choice.
    prefix_blocks: int = 16
    # Keys remembered per replica (LRU): 4096 x 16 blocks covers far more prompts than a replica's KV cache.
    prefix_entries_per_replica: int = 4096

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise SettingsError(f"max body bytes must be >= 1, got {self.max_body_bytes}")
        if self.cold_start_timeout_seconds <= 0:
            raise SettingsError(f"cold start timeout must be > 0 s, got {self.cold_start_timeout_seconds}")
        if self.queue_size < 1:
            raise SettingsError(f"queue size must be >= 1, got {self.queue_size}")
        if self.max_held_bytes is not None and self.max_held_bytes < 1:
            raise SettingsError(f"max held bytes must be >= 1, got {self.max_held_bytes}")
        if self.max_held_requests is not None and self.max_held_requests < 1:
            raise SettingsError(f"max held requests must be >= 1, got {self.max_held_requests}")
        if self.progress_interval_seconds <= 0 or self.disconnect_check_seconds <= 0:
            raise SettingsError("progress and disconnect-check intervals must be > 0 s")
        if self.body_timeout_seconds <= 0:
            raise SettingsError(f"body timeout must be > 0 s, got {self.body_timeout_seconds}")
        if self.connect_timeout_seconds <= 0 or self.read_timeout_seconds <= 0:
            raise SettingsError("upstream timeouts must be > 0 s")
        if self.upstream not in ("lean", "httpcore", "client"):
            raise SettingsError(f"upstream must be lean, httpcore or client, got {self.upstream!r}")
        if self.routing not in ("prefix", "least-outstanding", "random"):
            raise SettingsError(f"routing must be prefix, least-outstanding or random, got {self.routing!r}")
        if self.prefix_imbalance < 1 or self.prefix_blocks < 1 or self.prefix_entries_per_replica < 1:
            raise SettingsError("prefix imbalance, blocks and entries per replica must be >= 1")
        if self.prefix_max_in_flight is not None and self.prefix_max_in_flight < 1:
            raise SettingsError(f"prefix max in flight must be >= 1, got {self.prefix_max_in_flight}")
        if self.max_connections < 1:
            raise SettingsError(f"max connections must be >= 1, got {self.max_connections}")


def digest_key(key: str) -> bytes:
    """The form an API key is kept in: its SHA-256, so the proxy never holds or compares the secret."""
    return hashlib.sha256(key.encode()).digest()


def load_api_keys(path: str | Path) -> frozenset[bytes]:
    """Digests of the keys in a file: one key per line; blank lines and `#` comments are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read API key file {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SettingsError(f"API key file {str(path)!r} is not UTF-8 text") from exc
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise SettingsError(f"API key file {str(path)!r} holds no key (one per line)")
    if any(any(c.isspace() for c in k) for k in keys):
        raise SettingsError(f"API key file {str(path)!r}: a key contains whitespace")
    return frozenset(digest_key(k) for k in keys)
