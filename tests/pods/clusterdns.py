"""Cluster DNS for the pods profile: ``<service>.<namespace>.svc.cluster.local`` -> the Service's ClusterIP.

Why this module exists: the chart's second scheduler dials its extender by Service name
(``https://<release>-extender.<namespace>.svc:8443``), as in any cluster, so pods need cluster DNS. The
harness builds no CoreDNS; this answers the one record type pods here ask for (A records of Services,
from the apiserver) on the node bridge's gateway address, which the kubelet hands pods as their
nameserver (``clusterDNS``). Everything else gets NXDOMAIN (in the cluster domain) or REFUSED.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
RCODE_OK, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 1, 3, 5


def parse_query(data: bytes) -> tuple[int, int, str, int, int]:
    """``(id, flags, name, qtype, end of question)`` of a one-question query; ValueError if malformed."""
    if len(data) < 12:
        raise ValueError("short header")
    qid, flags, qdcount = struct.unpack("!HHH", data[:6])
    if qdcount != 1:
        raise ValueError("expected one question")
    labels, pos = [], 12
    while True:
        if pos >= len(data):
            raise ValueError("truncated name")
        n = data[pos]
        pos += 1
        if n == 0:
            break
        if n > 63 or pos + n > len(data):
            raise ValueError("bad label")
        labels.append(data[pos : pos + n].decode("ascii", "replace").lower())
        pos += n
    if pos + 4 > len(data):
        raise ValueError("truncated question")
    qtype, qclass = struct.unpack("!HH", data[pos : pos + 4])
    if qclass != CLASS_IN:
        raise ValueError("not class IN")
    return qid, flags, ".".join(labels), qtype, pos + 4


def build_answer(query: bytes, lookup: Callable[[str], str | None], domain: str = "cluster.local") -> bytes:
    """The response to ``query``: an A record when ``lookup(name)`` knows the name."""
    try:
        qid, flags, name, qtype, end = parse_query(query)
    except (ValueError, struct.error):
        qid = struct.unpack("!H", query[:2])[0] if len(query) >= 2 else 0
        return struct.pack("!HHHHHH", qid, 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
    rd = flags & 0x0100
    in_zone = name == domain or name.endswith("." + domain)
    ip = lookup(name) if in_zone else None
    answers = b""
    if not in_zone:
        rcode = RCODE_REFUSED
    elif ip is None:
        rcode = RCODE_NXDOMAIN
    else:
        rcode = RCODE_OK
        if qtype == TYPE_A and ipaddress.ip_address(ip).version == 4:
            answers = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 5, 4) + socket.inet_aton(ip)
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, 1 if answers else 0, 0, 0)
    return header + query[12:end] + answers


class ClusterDNS:
    """Serves Service A records on ``address:53`` (UDP) from a poll of the apiserver's Services."""

    def __init__(self, api_client_factory: Callable[[], Any], address: str, port: int = 53) -> None:
        self._factory = api_client_factory
        self.address, self.port = address, port
        self._records: dict[str, str] = {}
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self.queries = 0

    def lookup(self, name: str) -> str | None:
        return self._records.get(name)

    def start(self) -> ClusterDNS:
        self._refresh()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.address, self.port))
        sock.settimeout(0.5)
        self._sock = sock
        for target, name in ((self._serve, "ibc-cluster-dns"), (self._poll, "ibc-cluster-dns-poll")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        if self._sock is not None:
            self._sock.close()

    def _refresh(self) -> None:
        from kubernetes import client

        api = self._factory()
        try:
            services = client.CoreV1Api(api).list_service_for_all_namespaces(_request_timeout=10).items
        finally:
            api.close()
        records = {}
        for svc in services:
            ip = svc.spec.cluster_ip
            if ip and ip != "None":
                base = f"{svc.metadata.name}.{svc.metadata.namespace}.svc"
                records[base + ".cluster.local"] = ip
        self._records = records

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._refresh()
            except Exception as exc:
                log.debug("cluster dns: listing services failed: %r", exc)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.queries += 1
            with contextlib.suppress(OSError):
                self._sock.sendto(build_answer(data, self.lookup), peer)
