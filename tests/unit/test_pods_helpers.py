"""The pods profile's pure helpers: the cluster DNS answers, image names, the project image's cache key.

Why: a wrong DNS answer shows up as a scheduler pod that cannot reach its extender minutes into the
profile; a cache key that misses an input ships a stale image into the profile. Both are cheap to pin here.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from tests.pods import clusterdns, images, node

pytestmark = pytest.mark.unit

RECORDS = {"ibc-extender.ibc-system.svc.cluster.local": "10.96.3.4"}


def query(name: str, qtype: int = clusterdns.TYPE_A, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def rcode_and_answers(response: bytes) -> tuple[int, int, bytes]:
    _, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", response[:12])
    return flags & 0xF, ancount, response[-4:]


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "answers", "ip"),
    [
        ("ibc-extender.ibc-system.svc.cluster.local", clusterdns.TYPE_A, 0, 1, "10.96.3.4"),
        ("IBC-Extender.ibc-system.svc.cluster.local", clusterdns.TYPE_A, 0, 1, "10.96.3.4"),
        ("ibc-extender.ibc-system.svc.cluster.local", clusterdns.TYPE_AAAA, 0, 0, None),
        # the resolver's search-list tries before the name that exists
        ("ibc-extender.ibc-system.svc.ibc-system.svc.cluster.local", clusterdns.TYPE_A, 3, 0, None),
        ("missing.ibc-system.svc.cluster.local", clusterdns.TYPE_A, 3, 0, None),
        ("pypi.org", clusterdns.TYPE_A, 5, 0, None),
    ],
    ids=["service", "case-insensitive", "aaaa-nodata", "search-suffix", "unknown-service", "outside-zone"],
)
def test_cluster_dns_answers(name: str, qtype: int, rcode: int, answers: int, ip: str | None) -> None:
    response = clusterdns.build_answer(query(name, qtype), RECORDS.get)
    assert response[:2] == b"\x12\x34"
    got_rcode, got_answers, tail = rcode_and_answers(response)
    assert (got_rcode, got_answers) == (rcode, answers)
    if ip is not None:
        assert socket.inet_ntoa(tail) == ip


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        query("a.cluster.local")[:-3],
        query("a.cluster.local").replace(b"\x00\x01\x00\x00", b"\x00\x02\x00\x00", 1),
    ],
    ids=["empty", "id-only", "truncated-question", "two-questions"],
)
def test_cluster_dns_malformed_queries_get_formerr(data: bytes) -> None:
    response = clusterdns.build_answer(data, RECORDS.get)
    assert len(response) == 12 and response[3] & 0xF == clusterdns.RCODE_FORMERR


@pytest.mark.parametrize(
    ("reference", "full"),
    [
        ("python:3.11-slim", "docker.io/library/python:3.11-slim"),
        ("library/python:3.11", "docker.io/library/python:3.11"),
        ("registry.k8s.io/kube-scheduler:v1.36.3", "registry.k8s.io/kube-scheduler:v1.36.3"),
        ("localhost/ibc:abc", "localhost/ibc:abc"),
        ("busybox", "docker.io/library/busybox:latest"),
    ],
    ids=["official", "library", "registry", "localhost", "no-tag"],
)
def test_image_names_are_normalized_as_containerd_does(reference: str, full: str) -> None:
    assert images.normalize(reference) == full


def test_the_project_image_key_follows_every_copied_file(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "notes.txt").write_text("not copied\n")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM x AS build\nCOPY pyproject.toml ./\nCOPY pkg/ pkg/\nFROM x\nCOPY --from=build /a /a\n")
    base = images.Image("docker.io/library/x:latest", tmp_path / "base.oci.tar")

    inputs = [p.relative_to(tmp_path).as_posix() for p in images.dockerfile_inputs(dockerfile)]
    assert inputs == ["Dockerfile", "pkg/a.py", "pyproject.toml"]
    key = images.project_image_key(base, dockerfile)
    (tmp_path / "notes.txt").write_text("changed, still not copied\n")
    assert images.project_image_key(base, dockerfile) == key
    (tmp_path / "pkg" / "a.py").write_text("a = 2\n")
    assert images.project_image_key(base, dockerfile) != key


def test_one_real_node_per_machine_the_second_profile_waits_then_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "LOCK_FILE", tmp_path / "ibc-pods.lock")
    with node.node_lock(wait_seconds=0):
        with pytest.raises(node.NodeBusy, match=f"pid {os.getpid()} since"), node.node_lock(wait_seconds=0.3):
            pass
    with node.node_lock(wait_seconds=0):  # released when the first holder is done
        pass
