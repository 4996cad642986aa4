#!/usr/bin/env bash
# Copy the files the Helm chart ships verbatim from their single source of truth into the chart:
#   deploy/crd/*.yaml                         -> deploy/helm/ibc/files/crds/
#   deploy/webhook/validatingwebhookconfiguration.yaml -> deploy/helm/ibc/files/webhook/
#   deploy/monitoring/grafana-dashboard.json  -> deploy/helm/ibc/files/grafana-dashboard.json
# Why copies: `helm package` and `.Files.Get` only see files inside the chart directory.
# tests/unit/test_deploy.py fails when a copy is stale; run this script to fix it.
set -euo pipefail
DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$DEPLOY/helm/ibc"
mkdir -p "$CHART/files/crds"
rm -f "$CHART/files/crds/"*.yaml
cp "$DEPLOY"/crd/*.yaml "$CHART/files/crds/"
rm -f "$CHART/files/crds/kustomization.yaml"
mkdir -p "$CHART/files/webhook"
cp "$DEPLOY/webhook/validatingwebhookconfiguration.yaml" "$CHART/files/webhook/"
if [[ -f "$DEPLOY/monitoring/grafana-dashboard.json" ]]; then
    cp "$DEPLOY/monitoring/grafana-dashboard.json" "$CHART/files/grafana-dashboard.json"
fi
echo "chart files synced from $DEPLOY/{crd,webhook,monitoring}" >&2
