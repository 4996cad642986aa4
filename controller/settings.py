"""The controller's settings, grouped, each default saying why it is that value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from controller.advice import DEFAULT_HEADROOM_PERCENT
from controller.leader import LeaseTimings
from controller.observe import DEFAULT_PROMETHEUS_QUERY
from controller.translate import DEFAULT_SCHEDULER_NAME
from serving.signals import SCRAPE_TIMEOUT_SECONDS

ObservedMemory = Literal["none", "prometheus", "metrics-api"]


@dataclass(frozen=True)
class ReconcileSettings:
    """How models become workloads and how loudly the controller advises."""

    # The second kube-scheduler profile that calls the budget extender (deploy/scheduler).
    scheduler_name: str = DEFAULT_SCHEDULER_NAME
    # The budget's default margin (4%): the seed's 75Gi peak advises 78Gi.
    headroom_percent: float = DEFAULT_HEADROOM_PERCENT
    # Service and adopted-Deployment drift is re-checked this often even without watch events.
    resync_seconds: float = 60.0
    # The same advice in the log at most hourly; a changed one after a minute.
    hint_every_seconds: float = 3600.0
    hint_min_gap_seconds: float = 60.0
    # A warm step (spec.minReplicas) the webhook refused is asked for again this often: memory frees in seconds
    # to minutes (a cooldown, an eviction); each ask is one /scale PATCH the webhook answers from its cache.
    warm_recheck_seconds: float = 10.0


@dataclass(frozen=True)
class ObserveSettings:
    """Where observed memory comes from; advice only, never used for budgeting."""

    source: ObservedMemory = "none"
    prometheus_url: str = ""
    prometheus_query: str = DEFAULT_PROMETHEUS_QUERY
    # DCGM exporters sample every 30 s by default: asking more often finds nothing new.
    interval_seconds: float = 30.0
    # Refresh status.lastObservation at most every 5 minutes when the peak does not move.
    publish_every_seconds: float = 300.0


@dataclass(frozen=True)
class LeaderSettings:
    """Leader election: off for a single replica, on for HA (deploy/controller runs 2)."""

    enabled: bool = False
    lease_name: str = "inference-budget-controller"
    lease_namespace: str = ""  # "" = the pod's namespace in-cluster, else `default`
    identity: str = ""  # "" = hostname_pid
    timings: LeaseTimings = field(default_factory=LeaseTimings)


@dataclass(frozen=True)
class LoadSettings:
    """How often the leader looks, and how long a refused step waits before it is asked again."""

    # Every second, as local mode: the rule's windows (5 s up, 60 s down by default) are counted in passes.
    # 0 turns the load loop off (a model then scales by the proxy, the cooldown, kubectl scale or an HPA).
    interval_seconds: float = 1.0
    # A replica that cannot say its load in half a second: no signal (the model holds), not idle.
    scrape_timeout_seconds: float = SCRAPE_TIMEOUT_SECONDS
    # A step the webhook refused is asked for again this often (one /scale PATCH each, as the warm loop's).
    blocked_recheck_seconds: float = 10.0
    # Each proxy replica's /metrics (ibc_proxy_backend_in_flight): requests in flight per replica, summed; the
    # signal for backends without vLLM's gauges (with spec.load.concurrency). One URL per proxy process group.
    proxy_metrics_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class ControllerSettings:
    """Everything `ibc controller` needs."""

    kubeconfig: str | None = None
    namespace: str | None = None  # None = all namespaces
    metrics_bind: str = "0.0.0.0:8080"
    # Two workers: a slow API call for one model does not hold up the others; keys never run twice at once.
    workers: int = 2
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    observe: ObserveSettings = field(default_factory=ObserveSettings)
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    load: LoadSettings = field(default_factory=LoadSettings)
