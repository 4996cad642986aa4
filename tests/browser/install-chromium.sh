#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the browser test (tests/browser), once per machine.
# Quick when both are present; otherwise `apt-get update` first, then install. Run by `make test`
# (target `browser-deps`). Needs root (CI and the dev machines run as root) or sudo.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-chromium: not root and no sudo: install chromium and chromium-driver by hand" >&2; exit 1
  fi
fi
# Another apt run on the same machine holds the lock for a while: wait for it rather than fail.
APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
export DEBIAN_FRONTEND=noninteractive
$SUDO "${APT[@]}" update -qq
$SUDO "${APT[@]}" install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
echo "install-chromium: $(chromium --version 2>/dev/null | head -1)"
