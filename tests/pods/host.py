"""What a real node changes on its host, recorded before and put back after.

Why this module exists: a kubelet, containerd, kube-proxy and the CNI bridge plugin change the machine
they run on (sysctls, iptables chains for IPv4 and IPv6, mounts, cgroups, a bridge, a few fixed paths).
The pods profile runs on machines people and other test tiers share, so it records those things first
(:meth:`HostSnapshot.take`, saved to disk so a crashed run is cleaned up by the next one) and puts each
back afterwards (:func:`restore`); :meth:`HostSnapshot.differences` says what still differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Settings the kubelet (vm.*, kernel.*), kube-proxy (conntrack, route_localnet) and the bridge plugin
#: (forwarding) may write.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/netfilter/nf_conntrack_tcp_be_liberal",
)
#: Paths a kubelet and containerd use whatever their configuration says.
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/var/run/netns",
    "/run/netns",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    "/var/lib/containerd",
)
CGROUP_V1 = Path("/sys/fs/cgroup")
IPTABLES = ("iptables", "ip6tables")


def _read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    try:
        Path("/proc/sys", name).write_text(value + "\n")
    except OSError as exc:
        log.warning("cannot restore %s=%s: %s", name, value, exc)


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def _links() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").iterdir())


def _nft_tables() -> list[str]:
    if shutil.which("nft") is None:
        return []
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    return sorted(line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table "))


def _iptables_save(cmd: str) -> list[str]:
    """Rules and chains (no counters, no comments) of every table, one ``*table`` marker per table."""
    if shutil.which(f"{cmd}-save") is None:
        return []
    out = subprocess.run([f"{cmd}-save"], capture_output=True, text=True, check=False).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith(("*", "-A ")):
            lines.append(line)
        elif line.startswith(":"):
            lines.append(line.split()[0])  # ":CHAIN" without policy counters
    return lines


def _cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup v1 hierarchies (each its own directory under /sys/fs/cgroup)."""
    if not CGROUP_V1.is_dir():
        return []
    return sorted(
        p for p in CGROUP_V1.iterdir() if p.is_dir() and (p / "cgroup.procs").exists() and p.name != "unified"
    )


@dataclass
class HostSnapshot:
    """The host as the profile found it."""

    sysctls: dict[str, str | None] = field(default_factory=dict)
    iptables: dict[str, list[str]] = field(default_factory=dict)
    nft_tables: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    paths: dict[str, bool] = field(default_factory=dict)
    cgroup_root: str = ""
    cgroups: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def take(cls, cgroup_root: str) -> HostSnapshot:
        return cls(
            sysctls={n: _read_sysctl(n) for n in SYSCTLS},
            iptables={c: _iptables_save(c) for c in IPTABLES},
            nft_tables=_nft_tables(),
            mounts=_mount_points(),
            links=_links(),
            paths={p: os.path.lexists(p) for p in FIXED_PATHS},
            cgroup_root=cgroup_root,
            cgroups={
                str(h / cgroup_root.strip("/")): (h / cgroup_root.strip("/")).exists() for h in _cgroup_hierarchies()
            },
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> HostSnapshot:
        return cls(**json.loads(path.read_text()))

    def restore_sysctls(self) -> dict[str, tuple[str, str]]:
        """Put back every recorded sysctl that changed; returns ``{name: (was, now)}`` of those."""
        changed = {}
        for name, was in self.sysctls.items():
            now = _read_sysctl(name)
            if was is not None and now is not None and now != was:
                changed[name] = (was, now)
                _write_sysctl(name, was)
        return changed

    def differences(self, ignore_links: Iterable[str] = ()) -> list[str]:
        """What differs from this snapshot now (empty: the host is as it was found)."""
        now = HostSnapshot.take(self.cgroup_root)
        diffs = []
        for name, was in self.sysctls.items():
            if now.sysctls.get(name) != was:
                diffs.append(f"sysctl {name}: {was} -> {now.sysctls.get(name)}")
        for cmd in IPTABLES:
            added = sorted(set(now.iptables.get(cmd, [])) - set(self.iptables.get(cmd, [])))
            diffs += [f"{cmd}: {line}" for line in added if not line.startswith("*")]
        diffs += [f"nft table {t}" for t in sorted(set(now.nft_tables) - set(self.nft_tables))]
        diffs += [f"mount {m}" for m in sorted(set(now.mounts) - set(self.mounts))]
        ignored = set(ignore_links)
        diffs += [f"link {n}" for n in sorted(set(now.links) - set(self.links) - ignored)]
        diffs += [f"path {p}" for p, existed in self.paths.items() if existed != now.paths.get(p)]
        diffs += [f"cgroup {c}" for c, existed in self.cgroups.items() if existed != now.cgroups.get(c)]
        return diffs


# --------------------------------------------------------------------------------------------------
# putting things back


def _pids_of_exe(bin_dir: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(d / "exe")).parent == bin_dir:
                pids.append(int(d.name))
    return pids


def _cgroup_pids(root: Path) -> list[int]:
    pids: list[int] = []
    if root.is_dir():
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in procs.read_text().split()]
    return pids


def kill_leftovers(bin_dir: Path | None, cgroup_root: str, deadline_seconds: float = 15.0) -> int:
    """SIGKILL every process in the node's cgroups and every process run from ``bin_dir`` (shims)."""
    killed = 0
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        pids = set()
        for h in _cgroup_hierarchies():
            pids.update(_cgroup_pids(h / cgroup_root.strip("/")))
        if bin_dir is not None:
            pids.update(_pids_of_exe(bin_dir))
        pids.discard(os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.2)
    return killed


def _unmount_new(snapshot: HostSnapshot, prefixes: Sequence[str]) -> None:
    before = set(snapshot.mounts)
    for _ in range(5):
        new = [
            m
            for m in _mount_points()
            if m not in before and any(m == p or m.startswith(p.rstrip("/") + "/") for p in prefixes)
        ]
        if not new:
            return
        for m in sorted(set(new), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)


def _remove_cgroups(snapshot: HostSnapshot) -> None:
    for path_s, existed in snapshot.cgroups.items():
        path = Path(path_s)
        if not path.exists():
            continue
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        if not existed:
            dirs.append(path)
        for d in dirs:
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _restore_iptables(snapshot: HostSnapshot) -> None:
    """Delete the rules and chains that were not there before, table by table, for IPv4 and IPv6."""
    for cmd in IPTABLES:
        if shutil.which(cmd) is None:
            continue
        before = set(snapshot.iptables.get(cmd, []))
        table = ""
        new_rules: list[tuple[str, str]] = []
        new_chains: list[tuple[str, str]] = []
        for line in _iptables_save(cmd):
            if line.startswith("*"):
                table = line[1:]
            elif f"*{table}" in before and line in before:
                continue
            elif line.startswith("-A "):
                new_rules.append((table, line))
            elif line.startswith(":"):
                new_chains.append((table, line[1:]))
        for table, rule in new_rules:
            subprocess.run([cmd, "-w", "-t", table, "-D", *shlex.split(rule)[1:]], capture_output=True, check=False)
        builtin = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
        for flag in ("-F", "-X"):
            for table, chain in new_chains:
                if chain not in builtin:
                    subprocess.run([cmd, "-w", "-t", table, flag, chain], capture_output=True, check=False)
    # iptables-nft creates a table on first use and never deletes it: drop tables that were not there.
    if shutil.which("nft") is not None:
        for t in sorted(set(_nft_tables()) - set(snapshot.nft_tables)):
            family, _, name = t.partition(" ")
            if family in ("ip", "ip6") and name in ("filter", "nat", "mangle", "raw", "security"):
                subprocess.run(["nft", "delete", "table", family, name], capture_output=True, check=False)


def _remove_new_paths(snapshot: HostSnapshot) -> None:
    for p, existed in snapshot.paths.items():
        if not existed and os.path.lexists(p):
            _unmount_new(snapshot, [p])
            shutil.rmtree(p, ignore_errors=True)


def _delete_new_links(snapshot: HostSnapshot, names: Iterable[str]) -> None:
    before = set(snapshot.links)
    for name in names:
        if name not in before and Path("/sys/class/net", name).exists():
            subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
    # veth ends left on the host after their pod's namespace went (normally they go with it)
    for name in set(_links()) - before:
        if name.startswith("veth"):
            subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def restore(
    snapshot: HostSnapshot, bin_dir: Path | None, mount_prefixes: Sequence[str], links: Sequence[str]
) -> list[str]:
    """Stop what the node left running and put the host back as ``snapshot`` found it.

    Returns what still differs (should be empty).
    """
    kill_leftovers(bin_dir, snapshot.cgroup_root)
    _unmount_new(snapshot, [*mount_prefixes, *(p for p, e in snapshot.paths.items() if not e)])
    _remove_cgroups(snapshot)
    _restore_iptables(snapshot)
    _delete_new_links(snapshot, links)
    _remove_new_paths(snapshot)
    snapshot.restore_sysctls()
    return snapshot.differences()
