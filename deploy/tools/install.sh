#!/usr/bin/env bash
# Install the tools the deploy manifest checks need: Helm and kustomize, built from their Go modules.
#
# Why: tests/unit/test_deploy*.py renders the chart (`helm template`, `helm lint`) and both kustomize
# overlays (`kustomize build`), so a broken manifest fails CI. There is no prebuilt-binary download on
# these machines, but the Go module proxy is reachable, so both tools are compiled with the local Go
# toolchain, pinned, into a cache outside the git tree.
#
# Output: ${IBC_TOOLS_DIR:-$HOME/.cache/ibc/tools}/bin/{helm,kustomize} plus a stamp per tool.
# Idempotent: a matching stamp means nothing to do (well under a second).
#
# Usage: install.sh            install what is missing; the last stdout line is the bin dir
#        install.sh --bin-dir  print the bin dir and exit
#        install.sh --check    exit 0 when every tool is cached at its pin, 1 otherwise (no Go needed)
#        install.sh --force    rebuild even when cached
# Exit: 0 installed or cached, or Go is missing (then one line says the deploy checks will skip);
#       1 a build failed.
set -euo pipefail

HELM_VERSION=v3.21.4        # helm.sh/helm/v3; needs Go >= 1.26
HELM_K8S_MINOR=36           # its k8s.io/client-go is v0.36: the Kubernetes version `helm template` assumes
KUSTOMIZE_VERSION=v5.8.2    # sigs.k8s.io/kustomize/kustomize/v5; v5.8.3 needs Go 1.27

TOOLS_DIR="${IBC_TOOLS_DIR:-$HOME/.cache/ibc/tools}"
BIN_DIR="$TOOLS_DIR/bin"

log() { printf '[deploy-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# name|module path|version
TOOLS=(
    "helm|helm.sh/helm/v3/cmd/helm|$HELM_VERSION"
    "kustomize|sigs.k8s.io/kustomize/kustomize/v5|$KUSTOMIZE_VERSION"
)

ldflags_of() {  # name version
    local flags="-s -w"
    if [[ $1 == helm ]]; then
        # What a release build sets: `helm version`, and the default Kubernetes version of `helm template`
        # and `helm lint` (without it a module build assumes v1.20 and refuses charts needing newer).
        flags+=" -X helm.sh/helm/v3/internal/version.version=$2"
        flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
        flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR"
        flags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
        flags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR"
    fi
    printf '%s' "$flags"
}

stamp_of() { printf '%s@%s ldflags=%s\n' "$2" "$3" "$(ldflags_of "$1" "$3")"; }

is_cached() {  # name module version
    [[ -x "$BIN_DIR/$1" && -f "$BIN_DIR/.$1.stamp" ]] || return 1
    [[ "$(cat "$BIN_DIR/.$1.stamp")" == "$(stamp_of "$@")" ]]
}

all_cached() {
    local entry name module version
    for entry in "${TOOLS[@]}"; do
        IFS='|' read -r name module version <<<"$entry"
        is_cached "$name" "$module" "$version" || return 1
    done
}

force=0
case "${1:-}" in
    --bin-dir) echo "$BIN_DIR"; exit 0 ;;
    --check) all_cached; exit $? ;;
    --force) force=1 ;;
    "") ;;
    *) echo "usage: $0 [--bin-dir|--check|--force]" >&2; exit 2 ;;
esac

if [[ $force -eq 0 ]] && all_cached; then
    log "cached: helm $HELM_VERSION, kustomize $KUSTOMIZE_VERSION in $BIN_DIR"
    echo "$BIN_DIR"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    log "'go' not found on PATH: helm/kustomize not installed; the deploy manifest checks will skip" \
        "(install Go 1.26 and re-run deploy/tools/install.sh)"
    exit 0
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-trimpath
mkdir -p "$BIN_DIR"
for entry in "${TOOLS[@]}"; do
    IFS='|' read -r name module version <<<"$entry"
    if [[ $force -eq 0 ]] && is_cached "$name" "$module" "$version"; then
        log "cached: $name $version"
        continue
    fi
    log "building $name $version from $module with $(go env GOVERSION) (a few minutes when cold)"
    started=$SECONDS
    # Build into a scratch dir, then move into place, so an interrupted build never leaves a
    # half-written binary that looks installed.
    scratch="$(mktemp -d "$TOOLS_DIR/.build.XXXXXX")"
    if ! GOBIN="$scratch" go install -ldflags "$(ldflags_of "$name" "$version")" "$module@$version"; then
        rm -rf "$scratch"
        log "ERROR: building $name $version failed"
        exit 1
    fi
    mv -f "$scratch/$name" "$BIN_DIR/$name"
    rm -rf "$scratch"
    stamp_of "$name" "$module" "$version" >"$BIN_DIR/.$name.stamp"
    log "built $name $version in $((SECONDS - started))s"
done
echo "$BIN_DIR"
