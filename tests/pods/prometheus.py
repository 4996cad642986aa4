"""A real Prometheus (Debian's ``prometheus``) for the pods profile.

Why this module exists: the chart's dashboard and the controller's ``--observed-memory=prometheus``
source are only as good as the series they find. Here Prometheus scrapes every component's pods, found
through the apiserver (:meth:`Prometheus.discover`), on ``/metrics`` (the proxy and controller over HTTP,
the webhook and extender over TLS verified against their own CA), and the node's kubelet
(``/metrics/resource``: the model pods' containers' memory). It listens on the node bridge's address so
the controller, in its pod, can query it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.cluster.harness import ControlPlane, ManagedProcess, wait_for

log = logging.getLogger(__name__)

#: Memory of one model pod, for the controller's observed-memory source ({namespace}, {pod} filled in).
POD_MEMORY_QUERY = 'max(container_memory_working_set_bytes{namespace="{namespace}",pod="{pod}"})'


class Prometheus:
    """One Prometheus process; :meth:`start` waits until it is ready, :meth:`query` runs PromQL."""

    def __init__(self, cp: ControlPlane, work_dir: Path, address: str, port: int) -> None:
        self.cp, self.work_dir, self.address, self.port = cp, work_dir, address, port
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def config(self, release: str, namespace: str, tls_cas: dict[str, Path], kubelet: str) -> dict[str, Any]:
        """Jobs: proxy and controller over HTTP; webhook and extender over TLS; the kubelet's resource metrics."""

        def files(job: str) -> list[dict[str, Any]]:
            return [{"files": [str(self.work_dir / "targets" / f"{job}.json")], "refresh_interval": "5s"}]

        # The components' own `namespace` and `model` labels win (honor_labels): the dashboard uses them.
        jobs: list[dict[str, Any]] = [
            {"job_name": "ibc-http", "honor_labels": True, "file_sd_configs": files("ibc-http")}
        ]
        for name, ca in sorted(tls_cas.items()):
            jobs.append(
                {
                    "job_name": f"ibc-{name}",
                    "honor_labels": True,
                    "scheme": "https",
                    "tls_config": {"ca_file": str(ca), "server_name": f"{release}-{name}.{namespace}.svc"},
                    "file_sd_configs": files(f"ibc-{name}"),
                }
            )
        jobs.append(
            {
                "job_name": "kubelet-resource",
                "scheme": "https",
                "metrics_path": "/metrics/resource",
                "tls_config": {
                    "ca_file": str(self.cp.ca_file),
                    "cert_file": str(self.cp.admin_cert),
                    "key_file": str(self.cp.admin_key),
                },
                "static_configs": [{"targets": [kubelet]}],
                "metric_relabel_configs": [
                    {"source_labels": ["__name__"], "regex": "container_memory_working_set_bytes", "action": "keep"}
                ],
            }
        )
        every = {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"}
        return {"global": every, "scrape_configs": jobs}

    def discover(self, namespace: str) -> None:
        """Write the chart's running pods as file_sd targets, per job (what kubernetes_sd would find).

        Debian's Prometheus is built without Kubernetes service discovery, so the apiserver's pod list
        is turned into target files here; Prometheus picks them up on change.
        """
        jobs: dict[str, list[dict[str, Any]]] = {"ibc-http": [], "ibc-webhook": [], "ibc-extender": []}
        pods = json.loads(self.cp.kubectl("get", "pods", "-n", namespace, "-o", "json", check=True).stdout)["items"]
        for pod in pods:
            component = pod["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
            ip = pod.get("status", {}).get("podIP")
            if pod.get("status", {}).get("phase") != "Running" or not ip:
                continue
            for container in pod["spec"]["containers"]:
                for port in container.get("ports", []):
                    job = {"http": "ibc-http", "metrics": "ibc-http", "https": f"ibc-{component}"}.get(
                        port.get("name", "")
                    )
                    if job in jobs:
                        labels = {"kubernetes_pod": pod["metadata"]["name"], "component": component}
                        jobs[job].append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
        directory = self.work_dir / "targets"
        directory.mkdir(parents=True, exist_ok=True)
        for job, targets in jobs.items():
            tmp = directory / f".{job}.json"
            tmp.write_text(json.dumps(targets))
            tmp.replace(directory / f"{job}.json")

    def start(self, config: dict[str, Any]) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: run tests/pods/node-deps.sh")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.work_dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={self.work_dir / 'data'}",
            f"--web.listen-address={self.address}:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self.process = ManagedProcess("prometheus", argv, self.work_dir / "prometheus.log").start()

        def ready() -> bool:
            assert self.process is not None
            self.process.check_alive()
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200

        wait_for(ready, timeout=60, interval=0.2, message="prometheus /-/ready")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=5)

    def api(self, path: str, **params: str) -> Any:
        resp = httpx.get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10)
        body = resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=promql, time=str(time.time()))["result"])

    def targets(self) -> dict[str, str]:
        """Scrape URL -> health of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}
