#!/usr/bin/env bash
# Everything the `pods` profile needs before pytest starts (called by `make test`; each step is a quick
# no-op when cached): the Debian packages, the node binaries, and the images (base rootfs, the project
# image from its Dockerfile, pause, kube-scheduler). See docs/testing.md, "The real node".
#
# Exit: 0 when ready, or when a piece cannot be made outside CI (one line says so; the profile then
#       skips with one line); 1 under CI=true when a piece is missing (CI must run the profile).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"

fail() {
    echo "[pods] $*" >&2
    if [[ "${CI:-}" == "true" ]]; then exit 1; fi
    echo "[pods] the pods profile will be skipped (under CI=true this fails)" >&2
    exit 0
}

[[ "$(id -u)" -eq 0 ]] || fail "not root: the pods profile runs a kubelet and containerd"
bash "$HERE/node-deps.sh" || fail "Debian packages for the real node are missing (tests/pods/node-deps.sh)"
kube_bin="$(bash "$REPO/tests/cluster/build-kube.sh" --bin-dir)"
bash "$REPO/tests/cluster/build-kube.sh" --check || fail "Kubernetes binaries missing (make kube-binaries)"
node_bin="$(bash "$HERE/build-node.sh" | tail -n 1)" || fail "building the node binaries failed (tests/pods/build-node.sh)"
(cd "$REPO" && "$PY" -m tests.pods.images --node-bin-dir "$node_bin" --kube-bin-dir "$kube_bin") || fail "making the images failed (python -m tests.pods.images)"
