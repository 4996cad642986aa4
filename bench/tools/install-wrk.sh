#!/usr/bin/env bash
# Install wrk, the HTTP load generator bench/proxy_bench.py uses for throughput and the paced 429 check.
#
# Why: without wrk the benchmark falls back to a Python client that saturates before the proxy does, so
# its req/s figures measure the client (bench/RESULTS.md says which client each table used). wrk is a
# Debian package; `apt-get download` fetches it and LuaJIT (its one library missing here) without root
# and without touching the system: both are unpacked into a cache outside the git tree, and `wrk` there
# is a wrapper that points the loader at the unpacked library.
#
# Output: ${IBC_TOOLS_DIR:-$HOME/.cache/ibc/tools}/bin/wrk plus a stamp. Idempotent: a stamp means
# nothing to do. A wrk already on PATH is used as it is.
#
# Usage: install-wrk.sh            install when missing; the last stdout line is the bin dir to put on PATH
#        install-wrk.sh --bin-dir  print the bin dir and exit
# Exit: 0 installed, cached, or impossible here (no apt-get: one line says the Python client will be used);
#       1 a download or unpack failed.
set -euo pipefail

TOOLS_DIR="${IBC_TOOLS_DIR:-$HOME/.cache/ibc/tools}"
BIN_DIR="$TOOLS_DIR/bin"
ROOT="$TOOLS_DIR/wrk-root"
STAMP="$TOOLS_DIR/wrk.stamp"
PACKAGES=(wrk libluajit2-5.1-2)

log() { printf '[bench-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ ${1:-} == --bin-dir ]]; then
    echo "$BIN_DIR"
    exit 0
fi
if command -v wrk >/dev/null 2>&1 && [[ $(command -v wrk) != "$BIN_DIR/wrk" ]]; then
    log "wrk on PATH: $(command -v wrk)"
    echo "$BIN_DIR"
    exit 0
fi
if [[ -f $STAMP && -x $BIN_DIR/wrk ]]; then
    echo "$BIN_DIR"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    log "no apt-get/dpkg-deb here: wrk not installed; bench/proxy_bench.py uses its Python client"
    echo "$BIN_DIR"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "downloading ${PACKAGES[*]} (apt-get download, no root needed)"
(cd "$work" && apt-get download "${PACKAGES[@]}" >/dev/null 2>&1) || {
    log "apt-get download ${PACKAGES[*]} failed"
    exit 1
}
rm -rf "$ROOT"
mkdir -p "$ROOT" "$BIN_DIR"
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$ROOT"
done
lib="$(dirname "$(find "$ROOT" -name 'libluajit-5.1.so.2' | head -n 1)")"
cat >"$BIN_DIR/wrk" <<WRAPPER
#!/bin/sh
# wrk unpacked by bench/tools/install-wrk.sh; its LuaJIT is beside it, not on the system.
LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$ROOT/usr/bin/wrk" "\$@"
WRAPPER
chmod +x "$BIN_DIR/wrk"
version="$("$BIN_DIR/wrk" --version 2>&1 || true)"  # prints its version and usage, exits 1
if [[ $version != wrk* ]]; then
    log "the unpacked wrk does not run: $version"
    exit 1
fi
printf '%s\n' "${version%%$'\n'*}" >"$STAMP"
log "installed $(cat "$STAMP")"
echo "$BIN_DIR"
