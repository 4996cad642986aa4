#!/usr/bin/env bash
# Build the node half of the `pods` test profile from Go modules: kubelet and kube-proxy (the same
# Kubernetes release and module graph as the control plane, tests/cluster/kubebin), containerd 2.x with
# its runc shim and ctr (tests/pods/containerdbin), and a static pause binary for the sandbox image.
#
# Why: the profile runs real pods on a real kubelet (docs/testing.md). Debian's containerd is 1.6, which
# Kubernetes 1.36 supports only through a fallback (1.35 was the last release for containerd 1.x), so
# containerd is built too; runc and the CNI plugins come from Debian (node-deps.sh).
#
# Output: ${IBC_NODE_CACHE:-$HOME/.cache/ibc/node}/<stamp hash>/bin/{kubelet,kube-proxy,containerd,
#         containerd-shim-runc-v2,ctr,pause}. Idempotent: a matching stamp means exit at once.
# Needs:  the Go toolchain build-kube.sh checks for (run that first: both builds share the Go cache).
#
# Usage: build-node.sh            build if needed; the last stdout line is the bin dir
#        build-node.sh --bin-dir  print the bin dir and exit (no build)
#        build-node.sh --check    exit 0 if the cached binaries match the pins, 1 otherwise
set -euo pipefail

CONTAINERD_VERSION=v2.4.2      # newest containerd 2.x on the Go proxy when pinned (containerdbin/go.mod)
CONTAINERD_TAGS=no_btrfs,no_zfs,no_devmapper   # no snapshotters needing cgo or kernel features we lack
BINARIES=(kubelet kube-proxy containerd containerd-shim-runc-v2 ctr pause)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBEBIN="$HERE/../cluster/kubebin"
# The control plane's pin: kubelet and kube-proxy come from the same release and module graph.
KUBE_VERSION="$(sed -n 's/^KUBE_VERSION=\(v[0-9.]*\).*/\1/p' "$HERE/../cluster/build-kube.sh")"
KUBE_MINOR="$(cut -d. -f2 <<<"$KUBE_VERSION")"
CACHE="${IBC_NODE_CACHE:-$HOME/.cache/ibc/node}"

log() { printf '[build-node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

want_stamp() {
    local sums
    sums="$(cat "$KUBEBIN/go.mod" "$KUBEBIN/go.sum" "$HERE/node-go.sum" "$HERE/containerdbin/go.mod" \
        "$HERE/containerdbin/go.sum" "$HERE/containerdbin/pause/main.go" | sha256sum | cut -c1-16)"
    printf 'kube=%s containerd=%s tags=%s inputs=%s\n' "$KUBE_VERSION" "$CONTAINERD_VERSION" "$CONTAINERD_TAGS" "$sums"
}
BIN_DIR="$CACHE/$(want_stamp | sha256sum | cut -c1-12)/bin"
STAMP="$BIN_DIR/.stamp"

is_cached() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(want_stamp)" ]] || return 1
    local b
    for b in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done
}

case "${1:-}" in
    --bin-dir) echo "$BIN_DIR"; exit 0 ;;
    --check) is_cached; exit $? ;;
    "") ;;
    *) echo "usage: $0 [--bin-dir|--check]" >&2; exit 2 ;;
esac
if is_cached; then
    log "cached: $BIN_DIR (kubelet $KUBE_VERSION, containerd $CONTAINERD_VERSION)"
    echo "$BIN_DIR"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    log "ERROR: 'go' not found on PATH: install Go 1.26 to build the pods profile's node"
    exit 3
fi
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false
if [[ "$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')" -ge 27 ]]; then
    export GOEXPERIMENT="${GOEXPERIMENT:+$GOEXPERIMENT,}nojsonv2"   # as build-kube.sh
fi
JOBS="${IBC_KUBE_BUILD_JOBS:-$(nproc)}"
mkdir -p "$BIN_DIR"
rm -f "$STAMP"
start=$(date +%s)

# kubelet and kube-proxy: kubebin's go.mod as is, its go.sum plus the few sums only they need, through
# -modfile so the control plane's module files (and build-kube.sh's stamp) stay untouched.
modfile_dir="$(mktemp -d)"
trap 'rm -rf "$modfile_dir"' EXIT
cp "$KUBEBIN/go.mod" "$modfile_dir/go.mod"
sort -u "$KUBEBIN/go.sum" "$HERE/node-go.sum" > "$modfile_dir/go.sum"
ver_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ver_flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$KUBE_MINOR"
    ver_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
log "building kubelet, kube-proxy $KUBE_VERSION (-p $JOBS; ~1 min on a warm Go cache, ~5 min cold)"
(
    cd "$KUBEBIN"
    go build -modfile="$modfile_dir/go.mod" -p "$JOBS" -trimpath -ldflags "-s -w$ver_flags" -o "$BIN_DIR/" \
        k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
)
log "kubelet, kube-proxy built in $(( $(date +%s) - start ))s"

t1=$(date +%s)
log "building containerd $CONTAINERD_VERSION, its runc shim, ctr and pause (~1.5 min cold)"
(
    cd "$HERE/containerdbin"
    ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
    go build -p "$JOBS" -trimpath -tags "$CONTAINERD_TAGS" -ldflags "$ld" -o "$BIN_DIR/" tool
    go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/pause" ./pause
)
log "containerd built in $(( $(date +%s) - t1 ))s"

for b in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || { log "ERROR: $BIN_DIR/$b missing after build"; exit 1; }
done
want_stamp > "$STAMP"
# Binaries of older pins are never used again.
find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -path "$(dirname "$BIN_DIR")" -exec rm -rf {} +
log "node binaries built in $(( $(date +%s) - start ))s: $BIN_DIR"
echo "$BIN_DIR"
