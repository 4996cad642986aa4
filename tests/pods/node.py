"""One real Kubernetes node on this machine: containerd + runc + CNI bridge + kubelet + kube-proxy.

Why this module exists: the cluster tier's pod simulator marks pods Running without running anything.
The pods profile needs pods that really run the project's image, so this module starts the node
components as plain processes (built by build-node.sh; runc and the CNI plugins from Debian), each in
its own state directory, joined to the harness's control plane with certificates from its CA.

The machine is shared, and a kubelet uses a few fixed paths, so: one real node per machine
(:func:`node_lock`), and :meth:`RealNode.stop` leaves the host as :class:`host.HostSnapshot` found it
(processes, bridge, iptables chains for IPv4 and IPv6, mounts, cgroups, sysctls).

Facts this is built on (measured on these VMs, see docs/testing.md): cgroup v1 only, so the kubelet
runs with ``failCgroupV1: false``, ``cgroupDriver: cgroupfs`` and a ``cgroupRoot`` made beforehand in
every hierarchy; no CAP_SYS_RESOURCE, so containerd runs with ``restrict_oom_score_adj``; no node
lifecycle controller, so the apiserver runs without the TaintNodesByCondition admission plugin.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from tests.cluster.harness import ControlPlane, ManagedProcess, free_port, wait_for, write_kubeconfig
from tests.pods import host
from tests.pods.clusterdns import ClusterDNS
from tests.pods.images import Image

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
LOCK_FILE = Path(os.environ.get("IBC_PODS_LOCK", "/run/lock/ibc-pods.lock"))
#: The previous run's host snapshot: a run that died without cleaning up is cleaned up by the next.
SNAPSHOT_FILE = LOCK_FILE.with_suffix(".snapshot.json")

BRIDGE = "ibc0"
POD_CIDR = ipaddress.ip_network(os.environ.get("IBC_PODS_CIDR", "10.250.0.0/24"))
GATEWAY = str(next(POD_CIDR.hosts()))
CGROUP_ROOT = "/ibc-pods"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")


class NodeError(RuntimeError):
    """The node could not be started."""


class NodeBusy(NodeError):
    """Another pods profile holds the machine's one real node."""


@contextlib.contextmanager
def node_lock(wait_seconds: float) -> Iterator[None]:
    """Hold the machine-wide lock of the one real node, waiting up to ``wait_seconds`` for it."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    f: IO[str] = LOCK_FILE.open("a+")
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                    raise NodeBusy(f"another pods profile holds {LOCK_FILE} ({holder})") from None
                time.sleep(1.0)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def clean_previous_run() -> list[str]:
    """If a previous run died holding the node, put the host back from its saved snapshot."""
    if not SNAPSHOT_FILE.exists():
        return []
    try:
        saved = json.loads(SNAPSHOT_FILE.read_text())
        snap = host.HostSnapshot(**saved["snapshot"])
        left = host.restore(snap, Path(saved["bin_dir"]), saved["mount_prefixes"], [BRIDGE])
        work = Path(saved["work_dir"])
        # the session's directory (control plane and node) when the conftest made it, else the node's own
        shutil.rmtree(work.parent if work.parent.name.startswith("ibc-pods-") else work, ignore_errors=True)
    finally:
        SNAPSHOT_FILE.unlink(missing_ok=True)
    log.warning("cleaned up after a previous pods run; still different: %s", left)
    return left


def cni_bin_dir() -> Path:
    for d in CNI_BIN_DIRS:
        if (Path(d) / "bridge").exists():
            return Path(d)
    raise NodeError("CNI plugins not found: run tests/pods/node-deps.sh (containernetworking-plugins)")


def create_bridge() -> None:
    """The pod bridge with its gateway address, made before the apiserver binds to that address."""
    if not Path("/sys/class/net", BRIDGE).exists():
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "replace", f"{GATEWAY}/{POD_CIDR.prefixlen}", "dev", BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)


def _make_cgroup_root() -> None:
    """The kubelet's cgroupRoot in every v1 hierarchy (cpuset needs cpus/mems before tasks can join)."""
    for h in host._cgroup_hierarchies():
        d = h / CGROUP_ROOT.strip("/")
        d.mkdir(exist_ok=True)
        if h.name == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((h / f).read_text())


@dataclass
class NodeTimings:
    containerd_ready: float = 0.0
    images_imported: float = 0.0
    node_ready: float = 0.0  # kubelet started -> Node Ready
    kube_proxy_ready: float = 0.0


@dataclass(eq=False)
class RealNode:
    """A kubelet node named ``name`` joined to ``cp``; start with :meth:`start`, end with :meth:`stop`."""

    cp: ControlPlane
    bin_dir: Path
    work_dir: Path
    snapshot: host.HostSnapshot
    name: str = field(default_factory=socket.gethostname)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    timings: NodeTimings = field(default_factory=NodeTimings)
    dns: ClusterDNS | None = None
    restored_sysctls: dict[str, tuple[str, str]] = field(default_factory=dict)
    kubelet_port: int = 0

    @property
    def sock(self) -> Path:
        return self.work_dir / "containerd" / "containerd.sock"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    def mount_prefixes(self) -> list[str]:
        return [str(self.work_dir)]

    # ------------------------------------------------------------------ lifecycle

    def start(self, images: Sequence[Image], sandbox_image: str) -> None:
        SNAPSHOT_FILE.write_text(
            json.dumps(
                {
                    "snapshot": self.snapshot.__dict__,
                    "bin_dir": str(self.bin_dir),
                    "mount_prefixes": self.mount_prefixes(),
                    "work_dir": str(self.work_dir),
                }
            )
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        _make_cgroup_root()
        t0 = time.monotonic()
        self._start_containerd(sandbox_image)
        self.timings.containerd_ready = time.monotonic() - t0
        t0 = time.monotonic()
        for img in images:
            self.ctr("images", "import", str(img.archive), timeout=300)
        self.timings.images_imported = time.monotonic() - t0
        self.dns = ClusterDNS(self.cp.api_client, GATEWAY).start()
        self._start_kubelet()
        self._start_kube_proxy()

    def stop(self) -> list[str]:
        """Stop every node process and put the host back; returns what still differs (should be none)."""
        if self.dns is not None:
            self.dns.stop()
        for name in ("kube-proxy", "kubelet"):
            p = self.processes.get(name)
            if p is not None:
                p.stop(grace=10)
        if "kube-proxy" in self.processes:
            # removes the KUBE-* chains of both families (what is left is removed by the snapshot diff)
            subprocess.run(
                [str(self.bin_dir / "kube-proxy"), "--cleanup"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        host.kill_leftovers(self.bin_dir, CGROUP_ROOT)  # containers and their shims
        p = self.processes.get("containerd")
        if p is not None:
            p.stop(grace=10)
        left = host.restore(self.snapshot, self.bin_dir, self.mount_prefixes(), [BRIDGE])
        SNAPSHOT_FILE.unlink(missing_ok=True)
        return left

    # ------------------------------------------------------------------ containerd

    def _start_containerd(self, sandbox_image: str) -> None:
        d = self.work_dir / "containerd"
        cni_conf = self.work_dir / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-ibc.conflist").write_text(json.dumps(self.cni_config(), indent=1))
        runc = shutil.which("runc")
        if runc is None:
            raise NodeError("runc not found: run tests/pods/node-deps.sh")
        config = f"""
version = 3
root = "{d / "root"}"
state = "{d / "state"}"
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{self.sock}"

[ttrpc]
  address = "{d / "ttrpc.sock"}"

[plugins.'io.containerd.internal.v1.opt']
  path = "{d / "opt"}"

[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = "{d / "image-verifier"}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{sandbox_image}"

[plugins.'io.containerd.cri.v1.runtime']
  # The VM lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below the parent's otherwise.
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin_dir()}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.toml").write_text(config)
        # Our shim first on PATH: containerd starts `containerd-shim-runc-v2` found there.
        env = {**os.environ, "PATH": f"{self.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        self._spawn("containerd", [str(self.bin_dir / "containerd"), f"--config={d / 'config.toml'}"], env)
        wait_for(
            lambda: self._alive("containerd") and self.ctr("version", check=False).returncode == 0,
            timeout=30,
            interval=0.1,
            message=lambda: f"containerd to answer on {self.sock}\n{self.processes['containerd'].log_tail()}",
        )

    def cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "ibc-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # pods need no way out; no CNI-* masquerade chains on the host
                    "hairpinMode": True,  # a pod reaching itself through its Service's VIP
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(POD_CIDR), "gateway": GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.work_dir / "cni" / "ipam"),
                    },
                }
            ],
        }

    def ctr(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this node's containerd in the CRI namespace ``k8s.io``."""
        res = subprocess.run(
            [str(self.bin_dir / "ctr"), f"--address={self.sock}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} failed: {res.stderr.strip()[-2000:]}")
        return res

    # ------------------------------------------------------------------ kubelet

    def _start_kubelet(self) -> None:
        assert self.cp.pki is not None
        d = self.work_dir / "kubelet"
        d.mkdir(parents=True, exist_ok=True)
        client_cert = self.cp.pki.issue(
            f"kubelet-{self.name}", f"system:node:{self.name}", organizations=["system:nodes"], client=True
        )
        serving = self.cp.pki.issue(
            f"kubelet-serving-{self.name}",
            self.name,
            dns_names=[self.name, "localhost"],
            ip_addresses=["127.0.0.1", GATEWAY],
            server=True,
        )
        kubeconfig = write_kubeconfig(
            d / "kubeconfig", self.cp.server, self.cp.ca_file, *client_cert, f"system:node:{self.name}"
        )
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.cp.ca_file)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            # cgroup v1 on these VMs: deprecated, refused unless failCgroupV1 is false.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": CGROUP_ROOT,
            "failSwapOn": False,
            "clusterDNS": [GATEWAY],
            "clusterDomain": "cluster.local",
            "resolvConf": "",
            "podLogsDir": str(self.work_dir / "pod-logs"),
            # Images come from archives, never a registry: never garbage-collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # A shared machine's memory and disk are not this node's to defend: no evictions.
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "maxPods": 110,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "shutdownGracePeriod": "0s",
            "registerNode": True,
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            str(self.bin_dir / "kubelet"),
            f"--config={d / 'config.yaml'}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={d / 'root'}",
            f"--hostname-override={self.name}",
            f"--node-ip={GATEWAY}",
            "--v=2",
        ]
        t0 = time.monotonic()
        self._spawn("kubelet", argv)
        wait_for(
            lambda: self._alive("kubelet") and self.node_ready(),
            timeout=90,
            interval=0.1,
            message=lambda: f"node {self.name} Ready\n{self.processes['kubelet'].log_tail(40)}",
        )
        self.timings.node_ready = time.monotonic() - t0
        # The kubelet sets vm.overcommit_memory, kernel.panic and kernel.panic_on_oops at start, once.
        self.restored_sysctls = self.snapshot.restore_sysctls()
        self._label_node()

    def node_ready(self) -> bool:
        res = self.cp.kubectl(
            "get", "node", self.name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", timeout=10
        )
        return res.returncode == 0 and res.stdout.strip() == "True"

    def _label_node(self) -> None:
        patch = {"metadata": {"labels": dict(self.labels), "annotations": dict(self.annotations)}}
        self.cp.kubectl("patch", "node", self.name, "--type=merge", "-p", json.dumps(patch), check=True)

    # ------------------------------------------------------------------ kube-proxy

    def _start_kube_proxy(self) -> None:
        assert self.cp.pki is not None
        d = self.work_dir / "kube-proxy"
        d.mkdir(parents=True, exist_ok=True)
        cert = self.cp.pki.issue("kube-proxy", "system:kube-proxy", client=True)
        kubeconfig = write_kubeconfig(d / "kubeconfig", self.cp.server, self.cp.ca_file, *cert, "system:kube-proxy")
        healthz = free_port()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": str(POD_CIDR),
            "hostnameOverride": self.name,
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{GATEWAY}/32"],
            # Leave the host's conntrack table settings alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "0s"},
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.monotonic()
        env = {**os.environ, "PATH": f"/usr/sbin:/usr/bin:/sbin:/bin:{os.environ.get('PATH', '')}"}
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={d / 'config.yaml'}", "--v=2"], env)

        def healthy() -> bool:
            import urllib.request

            self.processes["kube-proxy"].check_alive()
            with urllib.request.urlopen(f"http://127.0.0.1:{healthz}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_for(healthy, timeout=60, interval=0.2, message="kube-proxy /healthz")
        self.timings.kube_proxy_ready = time.monotonic() - t0

    # ------------------------------------------------------------------ helpers

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> ManagedProcess:
        p = ManagedProcess(name, argv, self.log_dir / f"{name}.log").start(env=env)
        self.processes[name] = p
        return p

    def _alive(self, name: str) -> bool:
        self.processes[name].check_alive()
        return True

    def describe_logs(self) -> str:
        return "node logs: " + ", ".join(f"{n}: {p.log_path}" for n, p in self.processes.items())
