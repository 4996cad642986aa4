#!/usr/bin/env bash
# Install the Debian packages the `pods` test profile needs (a real kubelet node, see docs/testing.md):
#   runc                          the OCI runtime containerd starts containers with
#   containernetworking-plugins   the CNI plugins bridge, host-local, portmap, loopback
#   iptables nftables conntrack   kube-proxy (Service VIPs); nft to drop the tables iptables-nft leaves
#   mmdebstrap                    the Debian bookworm root filesystem the base image is made from
#   buildah                       builds the project's Dockerfile without a daemon or a registry
#   prometheus                    the real Prometheus the profile scrapes components with
# Idempotent and quick when everything is installed (one dpkg query, no network).
#
# Usage: node-deps.sh           install what is missing (needs root and apt-get)
#        node-deps.sh --check   exit 0 if every package is installed, 1 otherwise
set -euo pipefail

PACKAGES=(runc containernetworking-plugins iptables nftables conntrack mmdebstrap buildah prometheus)

log() { printf '[node-deps %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

missing() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

todo="$(missing)"
case "${1:-}" in
    --check) [[ -z "$todo" ]]; exit $? ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
if [[ -z "$todo" ]]; then
    log "installed: ${PACKAGES[*]}"
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "ERROR: missing $(echo $todo) and cannot install them (needs root and apt-get)"
    exit 3
fi
start=$(date +%s)
log "installing: $(echo $todo)"
export DEBIAN_FRONTEND=noninteractive
# Another apt-get (a person, another test run) may hold the dpkg lock: wait for it, bounded.
apt-get -o DPkg::Lock::Timeout=600 update -qq
# --no-install-recommends: buildah recommends podman's stack, prometheus a web of exporters.
# shellcheck disable=SC2086
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $todo >/dev/null
# The Debian prometheus package starts a system service on install; the profile runs its own.
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
log "installed in $(( $(date +%s) - start ))s"
