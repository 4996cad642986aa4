"""Container images for the `pods` profile, made without a registry.

Why this module exists: the real node (node.py) may pull nothing, so every image it runs is made here
and imported into its containerd from an OCI archive:

- the base: a Debian bookworm root filesystem with python3.11 (``mmdebstrap``), wrapped as an OCI image
  and tagged as the Dockerfile's ``PYTHON_IMAGE`` default, so the Dockerfile builds *as written*;
- the project image: the repository's own ``Dockerfile`` built by ``buildah`` (chroot isolation, host
  network for pip, the host's CA bundle mounted read-only) and exported as an OCI archive;
- the sandbox (pause) image and the second scheduler's ``kube-scheduler`` image: one static binary each.

Everything is cached under ``~/.cache/ibc/images`` by the hash of its inputs: the base by its package
list, the project image by the Dockerfile and every file its ``COPY`` lines name. Run
``python -m tests.pods.images`` to build what is missing (``make test`` does, before pytest).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IBC_IMAGES_CACHE", Path.home() / ".cache" / "ibc" / "images"))
#: Bump to invalidate every cached image when the way they are made changes.
RECIPE = "1"

BASE_SUITE = "bookworm"
BASE_MIRROR = os.environ.get("IBC_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: python3 + venv for the Dockerfile's build stage, `python` as the official image names it, passwd for
#: its useradd, ca-certificates for pip.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "passwd", "ca-certificates")
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")

PROJECT_REPOSITORY = "localhost/inference-budget-controller"
PAUSE_IMAGE = "localhost/ibc-pause:1"
#: The chart's default second-scheduler image (deploy/helm/ibc/values.yaml, scheduler.image).
SCHEDULER_REPOSITORY = "registry.k8s.io/kube-scheduler"
HOST_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


class ImageError(RuntimeError):
    """An image could not be made (a tool is missing or failed)."""


@dataclass(frozen=True)
class Image:
    """An OCI archive on disk and the reference it is imported as."""

    name: str
    archive: Path


def _run(argv: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-30:])
        raise ImageError(f"{what} failed (rc={res.returncode}): {' '.join(argv)}\n{tail}")
    return res.stdout


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} not found: run tests/pods/node-deps.sh (installs the Debian packages)")
    return path


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256(RECIPE.encode())
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def normalize(reference: str) -> str:
    """The full name containerd and the kubelet use: ``python:3.11-slim`` -> ``docker.io/library/python:3.11-slim``."""
    name, _, tag = reference.partition(":") if "@" not in reference else (reference, "", "")
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}:{tag or 'latest'}"


def dockerfile_python_image(dockerfile: Path = REPO / "Dockerfile") -> str:
    """The default of the Dockerfile's ``ARG PYTHON_IMAGE``: the name the base must carry."""
    m = re.search(r"^ARG\s+PYTHON_IMAGE=(\S+)", dockerfile.read_text(), re.MULTILINE)
    if m is None:
        raise ImageError(f"{dockerfile} has no 'ARG PYTHON_IMAGE=<default>'")
    return m.group(1)


# --------------------------------------------------------------------------------------------------
# OCI archives


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_size


def write_oci_archive(dest: Path, name: str, layer: Path, config: dict[str, object]) -> Image:
    """Write a one-layer OCI image layout as a tar ``dest`` that ``ctr images import`` and buildah read.

    ``layer`` is an uncompressed tar of the root filesystem; ``config`` the image config's ``config``
    part (Env, Entrypoint, Cmd, User, ...). The index names the image both ways importers look for it.
    """
    layer_digest, layer_size = _sha256_file(layer)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/pods/images.py"}],
    }
    config_blob = json.dumps(image_config, sort_keys=True).encode()
    config_digest = hashlib.sha256(config_blob).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{layer_digest}",
                "size": layer_size,
            }
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = hashlib.sha256(manifest_blob).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest_blob),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            }
        ],
    }
    tmp = dest.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar:
        for arcname, blob in (
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps(index).encode()),
            (f"blobs/sha256/{config_digest}", config_blob),
            (f"blobs/sha256/{manifest_digest}", manifest_blob),
        ):
            info = tarfile.TarInfo(arcname)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        tar.add(layer, arcname=f"blobs/sha256/{layer_digest}")
    tmp.replace(dest)
    return Image(name, dest)


def _single_file_layer(dest: Path, files: Sequence[tuple[str, Path]]) -> Path:
    """An uncompressed layer tar holding ``files`` (path in the image, file on the host), mode 0755."""
    with tarfile.open(dest, "w") as tar:
        dirs: set[str] = set()
        for arcname, src in files:
            parts = arcname.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tar.gettarinfo(str(src), arcname)
            info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = 0o755, 0, 0, "", "", 0
            with src.open("rb") as f:
                tar.addfile(info, f)
    return dest


def binary_image(name: str, files: Sequence[tuple[str, Path]], config: dict[str, object]) -> Image:
    """A one-layer image of static binaries, cached by the binaries' content."""
    digest = _key(name, json.dumps(config, sort_keys=True), *(f"{a}={_sha256_file(p)[0]}" for a, p in files))
    dest = CACHE / f"{re.sub(r'[^a-zA-Z0-9.-]+', '-', name)}-{digest}.oci.tar"
    if dest.exists():
        return Image(name, dest)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        layer = _single_file_layer(Path(tmp) / "layer.tar", files)
        return write_oci_archive(dest, name, layer, config)


def pause_image(pause_binary: Path) -> Image:
    """The sandbox image: the static ``pause`` binary built by build-node.sh."""
    return binary_image(PAUSE_IMAGE, [("pause", pause_binary)], {"Entrypoint": ["/pause"]})


def kube_version() -> str:
    """The Kubernetes release the cluster tier builds (tests/cluster/build-kube.sh's pin)."""
    m = re.search(r"^KUBE_VERSION=(v[0-9.]+)", (REPO / "tests" / "cluster" / "build-kube.sh").read_text(), re.MULTILINE)
    if m is None:
        raise ImageError("KUBE_VERSION not found in tests/cluster/build-kube.sh")
    return m.group(1)


def scheduler_image(kube_bin_dir: Path) -> Image:
    """The chart's second-scheduler image, made from the control plane's own kube-scheduler binary."""
    return binary_image(
        f"{SCHEDULER_REPOSITORY}:{kube_version()}",
        [("usr/local/bin/kube-scheduler", kube_bin_dir / "kube-scheduler")],
        {"Env": [BASE_ENV[0]], "Entrypoint": ["/usr/local/bin/kube-scheduler"]},
    )


# --------------------------------------------------------------------------------------------------
# the Debian base


def base_image() -> Image:
    """The Dockerfile's ``FROM`` image: Debian bookworm + python3.11 from ``mmdebstrap`` (cached)."""
    name = normalize(dockerfile_python_image())
    key = _key(BASE_SUITE, BASE_MIRROR, ",".join(BASE_PACKAGES), name)
    dest = CACHE / f"base-{BASE_SUITE}-{key}.oci.tar"
    if dest.exists():
        return Image(name, dest)
    mmdebstrap = _need("mmdebstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        argv = [mmdebstrap, "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}"]
        # No apt lists or caches in the image (what the official slim images leave out too).
        argv += ["--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*"]
        argv += ["--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*"]
        _run([*argv, BASE_SUITE, str(rootfs), BASE_MIRROR], "mmdebstrap")
        image = write_oci_archive(dest, name, rootfs, {"Env": list(BASE_ENV), "Cmd": ["python3"]})
    log.info("base image %s made in %.0fs", name, time.monotonic() - t0)
    return image


# --------------------------------------------------------------------------------------------------
# the project image


def dockerfile_inputs(dockerfile: Path = REPO / "Dockerfile") -> list[Path]:
    """Every file the Dockerfile's ``COPY`` lines (from the build context) bring in, sorted."""
    files: set[Path] = {dockerfile}
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD") or any(w.startswith("--from") for w in words):
            continue
        for src in (w for w in words[1:-1] if not w.startswith("--")):
            path = (dockerfile.parent / src).resolve()
            if path.is_dir():
                files.update(
                    p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                )
            elif path.exists():
                files.add(path)
    ignore = dockerfile.parent / ".dockerignore"
    if ignore.exists():
        files.add(ignore)
    return sorted(files)


def project_image_key(base: Image, dockerfile: Path = REPO / "Dockerfile") -> str:
    parts: list[str | bytes] = [base.archive.name]
    for p in dockerfile_inputs(dockerfile):
        parts += [str(p.relative_to(dockerfile.parent)), p.read_bytes()]
    return _key(*parts)


@contextlib.contextmanager
def _buildah_storage() -> Iterator[list[str]]:
    """buildah's global options: its own storage (vfs: no overlay mounts left behind) in the cache."""
    runroot = Path(tempfile.mkdtemp(prefix="ibc-buildah-run-"))
    try:
        yield [
            _need("buildah"),
            f"--root={CACHE / 'buildah-storage'}",
            f"--runroot={runroot}",
            "--storage-driver=vfs",
        ]
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def project_image(base: Image, dockerfile: Path = REPO / "Dockerfile") -> Image:
    """The repository's Dockerfile built as written by buildah; rebuilt when any input changes."""
    key = project_image_key(base, dockerfile)
    name = f"{PROJECT_REPOSITORY}:{key}"
    dest = CACHE / f"ibc-{key}.oci.tar"
    if dest.exists():
        return Image(name, dest)
    t0 = time.monotonic()
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    with _buildah_storage() as buildah:
        base_id = _run([*buildah, "pull", "--quiet", f"oci-archive:{base.archive}"], "buildah pull (base)", env)
        _run([*buildah, "tag", base_id.strip().splitlines()[-1], base.name], "buildah tag (base)", env)
        mounts: list[str] = []
        ca = next((c for c in HOST_CA_BUNDLES if Path(c).exists()), None)
        if ca is not None:
            # pip reaches the package index, perhaps through a TLS-intercepting proxy the host trusts.
            mounts += ["-v", f"{Path(ca).resolve()}:{ca}:ro"]
        if Path("/etc/pip.conf").exists():
            mounts += ["-v", "/etc/pip.conf:/etc/pip.conf:ro"]
        _run(
            [
                *buildah,
                "bud",
                "--quiet",
                "--isolation=chroot",
                "--network=host",
                "--pull=never",
                *mounts,
                "-f",
                str(dockerfile),
                "-t",
                name,
                str(dockerfile.parent),
            ],
            "buildah bud (the project's Dockerfile)",
            env,
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".partial")
        tmp.unlink(missing_ok=True)
        _run([*buildah, "push", "--quiet", name, f"oci-archive:{tmp}:{name}"], "buildah push (oci-archive)", env)
        tmp.replace(dest)
        # Keep the base (next build reuses it); drop the built image and its build stage.
        with contextlib.suppress(ImageError):
            _run([*buildah, "rmi", name], "buildah rmi", env)
            _run([*buildah, "rmi", "--prune"], "buildah rmi --prune (the unnamed build stage)", env)
    for old in CACHE.glob("ibc-*.oci.tar"):
        if old != dest:
            old.unlink(missing_ok=True)
    log.info("project image %s built in %.0fs", name, time.monotonic() - t0)
    return Image(name, dest)


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    base: Image
    project: Image
    pause: Image
    scheduler: Image

    def all(self) -> list[Image]:
        return [self.pause, self.scheduler, self.project]


def build_all(node_bin_dir: Path, kube_bin_dir: Path, timings: dict[str, float] | None = None) -> ImageSet:
    """Every image the profile runs (each a no-op when cached); ``timings`` gets seconds per step."""
    times = timings if timings is not None else {}
    t0 = time.monotonic()
    base = base_image()
    times["rootfs"] = time.monotonic() - t0
    t0 = time.monotonic()
    project = project_image(base)
    times["image build"] = time.monotonic() - t0
    t0 = time.monotonic()
    pause = pause_image(node_bin_dir / "pause")
    scheduler = scheduler_image(kube_bin_dir)
    times["binary images"] = time.monotonic() - t0
    return ImageSet(base, project, pause, scheduler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pods.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-bin-dir", type=Path, required=True)
    parser.add_argument("--kube-bin-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[pods-images %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    timings: dict[str, float] = {}
    try:
        images = build_all(args.node_bin_dir, args.kube_bin_dir, timings)
    except ImageError as exc:
        print(f"[pods-images] ERROR: {exc}", file=sys.stderr)
        return 1
    for img in images.all():
        log.info("%s <- %s", img.name, img.archive)
    log.info("steps: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
