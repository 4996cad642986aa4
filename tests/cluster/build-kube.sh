#!/usr/bin/env bash
# Build the pinned Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler),
# kubectl and etcd from their Go modules, for the cluster test tier (tests/cluster).
#
# Why: the tier needs a real apiserver/scheduler/controller-manager of a known version; there is no
# docker engine and no prebuilt binary download here, but the Go module proxy and Go 1.26 are.
#
# Output: ${IBC_KUBE_CACHE:-$HOME/.cache/ibc/kube}/<kube version>/bin/{kube-apiserver,kube-controller-manager,
#         kube-scheduler,kubectl,etcd} plus a stamp file. Idempotent: a matching stamp means exit at once.
#
# Usage: build-kube.sh            build if needed, print progress, last stdout line is the bin dir
#        build-kube.sh --bin-dir  print the bin dir and exit (no build)
#        build-kube.sh --check    exit 0 if the cached binaries match the pins, 1 otherwise (no Go needed)
#        build-kube.sh --force    rebuild even if the stamp matches
set -euo pipefail

KUBE_VERSION=v1.36.3      # newest v1.36 patch on the Go proxy when pinned
STAGING_VERSION=v0.36.3   # k8s.io/<staging> modules of the same release (see kubebin/go.mod)
ETCD_VERSION=v3.6.16      # newest v3.6 patch on the Go proxy when pinned
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${IBC_KUBE_CACHE:-$HOME/.cache/ibc/kube}"
BIN_DIR="$CACHE/$KUBE_VERSION/bin"
STAMP="$BIN_DIR/.stamp"

log() { printf '[build-kube %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The stamp covers the pins and the wrapper modules' exact dependency graph.
want_stamp() {
    local sums
    sums="$(cat "$HERE/kubebin/go.mod" "$HERE/kubebin/go.sum" "$HERE/etcdbin/go.mod" "$HERE/etcdbin/go.sum" \
        | sha256sum | cut -c1-16)"
    printf 'kube=%s staging=%s etcd=%s modules=%s\n' "$KUBE_VERSION" "$STAGING_VERSION" "$ETCD_VERSION" "$sums"
}

is_cached() {
    [[ -f "$STAMP" ]] || return 1
    [[ "$(cat "$STAMP")" == "$(want_stamp)" ]] || return 1
    local b
    for b in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done
    return 0
}

force=0
case "${1:-}" in
    --bin-dir) echo "$BIN_DIR"; exit 0 ;;
    --check) is_cached; exit $? ;;
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--bin-dir|--check|--force]" >&2; exit 2 ;;
esac

if [[ $force -eq 0 ]] && is_cached; then
    log "cached: $BIN_DIR ($KUBE_VERSION, etcd $ETCD_VERSION)"
    echo "$BIN_DIR"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    log "ERROR: 'go' not found on PATH. Install Go 1.26 (https://go.dev/dl) to build the cluster test tier."
    exit 3
fi

GO_VERSION="$(go env GOVERSION)"            # e.g. go1.26.8
go_minor="$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$GO_VERSION")"
if [[ "$go_minor" -lt 26 ]]; then
    log "ERROR: $GO_VERSION is too old: Kubernetes $KUBE_VERSION needs Go >= 1.26."
    exit 3
fi
export GOTOOLCHAIN=local CGO_ENABLED=0
if [[ "$go_minor" -ge 27 ]]; then
    # Go 1.27 enables encoding/json/v2 by default; an apiserver built with it serves broken OpenAPI.
    export GOEXPERIMENT="${GOEXPERIMENT:+$GOEXPERIMENT,}nojsonv2"
    log "Go $GO_VERSION: building with GOEXPERIMENT=$GOEXPERIMENT"
fi
# 2 cores: one package at a time per core; the apiserver link peaks around 2 GB.
JOBS="${IBC_KUBE_BUILD_JOBS:-$(nproc)}"

mkdir -p "$BIN_DIR"
rm -f "$STAMP"
start=$(date +%s)

ver_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ver_flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=36"
    ver_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $KUBE_VERSION with $GO_VERSION" \
    "(-p $JOBS; cold build ~8-10 min on 2 cores, progress below)"
(
    cd "$HERE/kubebin"
    go mod download
    # -v lists each package as it is compiled: the progress indicator.
    go build -p "$JOBS" -v -trimpath -ldflags "-s -w$ver_flags" -o "$BIN_DIR/" tool 2>&1 \
        | awk -v t0="$start" '{n++; if (n % 200 == 0) { printf "[build-kube] %d packages compiled (%ds)\n", n, systime() - t0; fflush() } }
                               /^(go: |#|.*\.go:[0-9])/ { print; fflush() }' >&2
    exit "${PIPESTATUS[0]}"
)
log "kubernetes binaries done in $(( $(date +%s) - start ))s"

log "building etcd $ETCD_VERSION"
(
    cd "$HERE/etcdbin"
    go mod download
    go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd" go.etcd.io/etcd/server/v3
)

for b in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || { log "ERROR: $BIN_DIR/$b missing after build"; exit 1; }
done
want_stamp > "$STAMP"
log "all binaries built in $(( $(date +%s) - start ))s: $BIN_DIR"
"$BIN_DIR/kube-apiserver" --version >&2 || true
echo "$BIN_DIR"
