"""The install docs say what the manifests do: generated parts are current, links resolve, names match.

Why: a getting-started page whose commands name a Deployment that does not exist, or a CRD reference
that lists last month's fields, sends a user down the wrong path on their first day.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
OWN_DOCS = ("getting-started.md", "crd-reference.md", "operations.md", "observability-dashboard.md", "local-mode.md")
# local-mode.md's examples are also run, as written, by tests/integration/test_docs_local_mode.py.


def test_crd_reference_is_generated_from_the_current_crd():
    proc = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "tools" / "crd_reference.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _schema_paths(schema: dict, path: str) -> list[str]:
    out = [path]
    if schema.get("type") == "array":
        for name, child in ((schema.get("items") or {}).get("properties") or {}).items():
            out += _schema_paths(child, f"{path}[].{name}")
    for name, child in (schema.get("properties") or {}).items():
        out += _schema_paths(child, f"{path}.{name}")
    return out


def test_crd_reference_documents_every_field_with_its_default():
    import yaml

    crd = yaml.safe_load((REPO / "deploy" / "crd" / "inferencemodels.inference.eh-ops.io.yaml").read_text())
    doc = (DOCS / "crd-reference.md").read_text()
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    paths = _schema_paths(root["spec"], "spec") + _schema_paths(root["status"], "status")
    assert len(paths) > 20
    for path in paths:
        assert f"#### `{path}`" in doc, f"{path} missing from docs/crd-reference.md"
    for field, default in (("cooldownPeriod", "10m"), ("replicas", "1"), ("port", "8000")):
        section = doc.split(f"#### `spec.{field}`", 1)[1].split("####", 1)[0]
        assert f"Default: `{default}`" in section


@pytest.mark.parametrize("name", OWN_DOCS)
def test_relative_links_resolve(name):
    text = re.sub(r"```.*?```", "", (DOCS / name).read_text(), flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)  # code, e.g. regex patterns, is not a link
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).resolve().exists(), f"{name} links to missing {target}"


def test_every_dashboard_panel_is_described():
    dashboard = json.loads((REPO / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    doc = (DOCS / "observability-dashboard.md").read_text()
    for panel in dashboard["panels"]:
        assert panel["title"] in doc, f"panel {panel['title']!r} is not described"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("getting-started.md", "kubectl apply --server-side -k deploy/kustomize/overlays/self-signed"),
        ("getting-started.md", "kubectl apply --server-side -k deploy/kustomize/overlays/cert-manager"),
        ("getting-started.md", "helm install ibc deploy/helm/ibc --namespace ibc-system"),
        ("getting-started.md", "kubectl -n models get inferencemodels"),
        ("operations.md", "helm.sh/resource-policy: keep"),
        ("operations.md", "failurePolicy"),
    ],
)
def test_the_documented_commands_use_paths_that_exist(name, fragment):
    text = (DOCS / name).read_text()
    assert fragment in text
    for path in re.findall(r"deploy/[\w./-]+", fragment):
        assert (REPO / path).exists(), path


def test_getting_started_names_the_objects_the_install_creates():
    from tests.unit.test_deploy import overlay, require_tool

    require_tool("kustomize")  # skips without it, fails under CI=true
    doc = (DOCS / "getting-started.md").read_text()
    deployments = {o["metadata"]["name"] for o in overlay("self-signed") if o["kind"] == "Deployment"}
    for name in deployments:
        assert name in doc, f"getting-started does not mention Deployment {name}"
    for job in ("ibc-certs-bootstrap", "ibc-certs-renew"):
        assert job in doc or job in (DOCS / "operations.md").read_text()
