"""What `kubectl apply -k` and `helm install` would create, rendered and checked without a cluster.

Why: a chart or overlay that does not render, a pod that would be refused by the restricted Pod Security
Standard, a Service that selects nothing, or a chart ClusterRole that drifted from the component's own
(deploy/<component>/rbac.yaml) is a broken install that only shows up in someone's cluster. Rendering
needs Helm and kustomize, which `deploy/tools/install.sh` builds from their Go modules (run by
`make test`); without them these tests skip, except under CI=true where they fail.

The helpers at the top are shared with tests/cluster/test_deploy.py, which applies the same renders to a
real kube-apiserver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "ibc"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = ("cert-manager", "self-signed")
NAMESPACE = "ibc-system"
RELEASE = "ibc"
#: Components with plain manifests in deploy/<name>/ (each owns its RBAC there).
COMPONENTS = ("proxy", "webhook", "scheduler", "controller")

Obj = dict[str, Any]

# --------------------------------------------------------------------------------------------------
# rendering helpers (shared with tests/cluster/test_deploy.py)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@cache
def tool_path(name: str) -> str | None:
    """helm or kustomize: from deploy/tools/install.sh's cache, else from PATH; None when absent."""
    out = subprocess.run(
        ["bash", str(DEPLOY / "tools" / "install.sh"), "--bin-dir"], capture_output=True, text=True, check=False
    )
    candidate = Path(out.stdout.strip()) / name
    if out.returncode == 0 and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """The tool's path; skips the test when it is missing (fails under CI=true)."""
    path = tool_path(name)
    if path is None:
        message = f"{name} not installed: run `bash deploy/tools/install.sh` (needs Go 1.26)"
        if _ci():
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    return path


def load_documents(text: str) -> list[Obj]:
    """Kubernetes objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr.strip()}")
    return proc.stdout


class RenderError(RuntimeError):
    """helm or kustomize refused to render (the message carries its stderr)."""


@cache
def _helm_template_text(settings: tuple[str, ...], release: str, namespace: str) -> str:
    argv = [require_tool("helm"), "template", release, str(CHART), "--namespace", namespace]
    for setting in settings:
        argv += ["--set", setting]
    return _run(argv)


def helm_template(*settings: str, release: str = RELEASE, namespace: str = NAMESPACE) -> list[Obj]:
    """Objects `helm install` would create with these `--set` values."""
    return load_documents(_helm_template_text(tuple(settings), release, namespace))


@cache
def _kustomize_text(path: str) -> str:
    return _run([require_tool("kustomize"), "build", path])


def kustomize_build(path: Path | str) -> list[Obj]:
    """Objects `kubectl apply -k <path>` would create."""
    return load_documents(_kustomize_text(str(path)))


def overlay(name: str) -> list[Obj]:
    return kustomize_build(KUSTOMIZE / "overlays" / name)


#: The chart's value sets that CI renders and the cluster tier applies (id -> --set values).
HELM_VARIANTS: dict[str, tuple[str, ...]] = {
    "helm-default": (),
    "helm-monitoring": ("monitoring.serviceMonitor.enabled=true", "monitoring.grafanaDashboard.enabled=true"),
    "helm-cert-manager": ("certificates.mode=cert-manager",),
}


def render(variant: str) -> list[Obj]:
    """One install variant: `helm-*` (HELM_VARIANTS) or `kustomize-<overlay>`."""
    if variant.startswith("kustomize-"):
        return overlay(variant.removeprefix("kustomize-"))
    return helm_template(*HELM_VARIANTS[variant])


VARIANTS = [*HELM_VARIANTS, *(f"kustomize-{o}" for o in OVERLAYS)]


def plain_component(name: str) -> list[Obj]:
    """The YAML files of deploy/<name>/ (not its kustomization), parsed."""
    objs: list[Obj] = []
    for path in sorted((DEPLOY / name).glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objs.extend(load_documents(path.read_text()))
    return objs


def of_kind(objs: list[Obj], *kinds: str) -> list[Obj]:
    return [o for o in objs if o.get("kind") in kinds]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o.get("kind") == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def pod_spec(workload: Obj) -> Obj:
    """The pod template's spec of a Deployment/StatefulSet/DaemonSet/Job/CronJob."""
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def pod_labels(workload: Obj) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["metadata"].get("labels") or {})


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def normalized_rules(role: Obj) -> list[tuple[str, str, str, str]]:
    """A role's rules as sorted (apiGroup, resource, resourceName, verb) tuples, for comparison."""
    out: set[tuple[str, str, str, str]] = set()
    for rule in role.get("rules") or []:
        for group in rule.get("apiGroups") or [""]:
            for resource in rule.get("resources") or []:
                for name in rule.get("resourceNames") or ["*"]:
                    for verb in rule.get("verbs") or []:
                        out.add((group, resource, name, verb))
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# the chart


def test_helm_lint_passes_strict():
    helm = require_tool("helm")
    for settings in HELM_VARIANTS.values():
        argv = [helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
        for s in settings:
            argv += ["--set", s]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("certificates.mode=vault", "certificates.mode"),
        ("proxy.replicas=-1", "proxy.replicas"),
        ("webhook.failurePolicy=Sometimes", "webhook.failurePolicy"),
        ("webhook.timeoutSeconds=31", "webhook.timeoutSeconds"),
        ("proxy.replicsa=2", "replicsa"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy"),
        ("proxy.workerClass=sync", "proxy.workerClass"),
        ("proxy.connections=0", "proxy.connections"),
        ("proxy.headerTimeoutSeconds=0", "proxy.headerTimeoutSeconds"),
    ],
    ids=[
        "unknown-cert-mode",
        "negative-replicas",
        "bad-failure-policy",
        "timeout-over-30",
        "typo-key",
        "bad-pull-policy",
        "unknown-worker-class",
        "no-connections",
        "zero-header-timeout",
    ],
)
def test_values_schema_refuses_bad_values(setting, fragment):
    with pytest.raises(RenderError, match=re.escape(fragment)):
        helm_template(setting)


PROXY_CONCURRENCY = ("worker_class", "threads", "connections", "header_timeout", "body_timeout", "queue_size")


def _proxy_args(*settings: str) -> Any:
    from ibc.__main__ import build_parser

    (container,) = pod_spec(named(helm_template(*settings), "Deployment", "ibc-proxy"))["containers"]
    return build_parser(only="proxy").parse_args(container["args"])


def test_chart_proxy_defaults_are_the_clis():
    # The chart states every concurrency setting; by default each is what `ibc proxy` alone would use,
    # so the docs' figures (measured with the CLI's defaults) hold for a default install.
    from ibc.__main__ import build_parser

    cli = build_parser(only="proxy").parse_args(["proxy"])
    chart = _proxy_args()
    assert {k: getattr(chart, k) for k in PROXY_CONCURRENCY} == {k: getattr(cli, k) for k in PROXY_CONCURRENCY}


@pytest.mark.parametrize(
    ("setting", "attribute", "value"),
    [
        ("proxy.workerClass=gthread", "worker_class", "gthread"),
        ("proxy.threads=96", "threads", 96),
        ("proxy.connections=2000", "connections", 2000),
        ("proxy.headerTimeoutSeconds=3", "header_timeout", 3),
        ("proxy.bodyTimeoutSeconds=45", "body_timeout", 45.0),
        ("proxy.queueSize=100", "queue_size", 100),
    ],
    ids=["worker-class", "threads", "connections", "header-timeout", "body-timeout", "queue-size"],
)
def test_chart_proxy_concurrency_values_reach_the_container(setting, attribute, value):
    assert getattr(_proxy_args(setting), attribute) == value


def test_proxy_can_be_disabled_entirely():
    objs = helm_template("proxy.enabled=false")
    assert not [o for o in objs if "proxy" in o["metadata"]["name"]]


# --------------------------------------------------------------------------------------------------
# every install variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_carries_the_standard_labels(variant):
    for obj in render(variant):
        labels = obj["metadata"].get("labels") or {}
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "inference-budget-controller", where
        assert labels.get("app.kubernetes.io/part-of") == "inference-budget-controller", where
        if variant.startswith("helm"):
            for key in (
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "app.kubernetes.io/version",
                "helm.sh/chart",
            ):
                assert key in labels, f"{where} lacks {key}"


#: The one object outside the install namespace: the second scheduler's delegated-authentication binding
#: must sit next to the Role it binds, which exists only in kube-system.
KUBE_SYSTEM_BINDING = "extension-apiserver-authentication-reader"


@pytest.mark.parametrize("variant", VARIANTS)
def test_namespaced_objects_land_in_the_install_namespace(variant):
    cluster_scoped = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingWebhookConfiguration",
        "ClusterIssuer",
    }
    for obj in render(variant):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], where
        elif obj["kind"] == "RoleBinding" and obj["roleRef"]["name"] == KUBE_SYSTEM_BINDING:
            assert obj["metadata"]["namespace"] == "kube-system", where
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, where


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_meet_the_restricted_pod_security_standard(variant):
    workloads = of_kind(render(variant), *WORKLOAD_KINDS)
    assert workloads
    for w in workloads:
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext") or {}
        assert pod_sc.get("runAsNonRoot") is True, w["metadata"]["name"]
        assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", w["metadata"]["name"]
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            where = f"{w['metadata']['name']}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], where
            assert not (sc.get("capabilities") or {}).get("add"), where
            assert sc.get("privileged") in (None, False), where
            assert (c.get("resources") or {}).get("requests"), f"{where} has no resource requests"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


#: Where each `ibc <command>` defines its HTTP routes: a probe must point at a route its server has.
ROUTE_SOURCES = {
    "proxy": ("proxy/app.py", "serving/http.py"),
    "webhook": ("webhook/app.py", "serving/http.py"),
    "extender": ("extender/app.py", "serving/http.py"),
    "controller": ("controller/metrics.py", "serving/http.py"),
}
#: Liveness is /livez everywhere except where the component does not serve it yet (see the report).
LIVENESS_EXCEPTIONS: dict[str, str] = {}


def ibc_command(container: Obj) -> str | None:
    """The `ibc` subcommand a container runs (None for other images, e.g. kube-scheduler)."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    argv = [a for a in argv if a != "ibc"]
    return next((a for a in argv if a in ROUTE_SOURCES or a in ("certs", "local", "mock-backend")), None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_long_running_containers_probe_livez_and_readyz_that_their_server_serves(variant):
    checked = set()
    for w in of_kind(render(variant), "Deployment"):
        for c in pod_spec(w)["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            live, ready = c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]
            assert ready == "/readyz", where
            command = ibc_command(c)
            if command is None:
                assert live == "/livez", where  # kube-scheduler serves /livez and /readyz
                continue
            assert live == LIVENESS_EXCEPTIONS.get(command, "/livez"), where
            source = "".join((REPO / f).read_text() for f in ROUTE_SOURCES[command])
            for path in (live, ready):
                # A probe on a path the app does not route restarts the pod forever.
                assert f'"{path}"' in source, f"{where}: {command} serves no {path}"
            port = c["livenessProbe"]["httpGet"]["port"]
            assert port in {p["name"] for p in c["ports"]}, f"{where}: probe port {port} not declared"
            checked.add(command)
    assert checked == {"proxy", "webhook", "extender", "controller"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_accounts_used_by_pods_exist_and_have_bindings(variant):
    objs = render(variant)
    accounts = {o["metadata"]["name"] for o in of_kind(objs, "ServiceAccount")}
    bound = {
        s["name"]
        for b in of_kind(objs, "RoleBinding", "ClusterRoleBinding")
        for s in b.get("subjects") or []
        if s.get("kind") == "ServiceAccount"
    }
    roles = {(o["kind"], o["metadata"]["name"]) for o in of_kind(objs, "Role", "ClusterRole")}
    for b in of_kind(objs, "RoleBinding", "ClusterRoleBinding"):
        ref = b["roleRef"]
        # system:* ClusterRoles and the kube-system authentication reader come with every cluster.
        if not ref["name"].startswith("system:") and ref["name"] != KUBE_SYSTEM_BINDING:
            assert (ref["kind"], ref["name"]) in roles, f"{b['metadata']['name']}: role {ref['name']} missing"
        for s in b.get("subjects") or []:
            assert s.get("kind") == "ServiceAccount", b["metadata"]["name"]
            assert s["name"] in accounts and s["namespace"] == NAMESPACE, b["metadata"]["name"]
    for w in of_kind(objs, *WORKLOAD_KINDS):
        sa = pod_spec(w).get("serviceAccountName")
        assert sa in accounts, f"{w['metadata']['name']} runs as missing ServiceAccount {sa!r}"
        assert sa in bound, f"{w['metadata']['name']}: ServiceAccount {sa} has no binding"


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_pdbs_and_network_policies_select_real_pods(variant):
    objs = render(variant)
    pods = [pod_labels(w) for w in of_kind(objs, *WORKLOAD_KINDS)]
    for svc in of_kind(objs, "Service"):
        sel = svc["spec"].get("selector") or {}
        assert any(selector_matches(sel, p) for p in pods), f"Service {svc['metadata']['name']} selects nothing"
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector_matches(sel, p) for p in pods), f"PDB {pdb['metadata']['name']} selects nothing"
    policies = of_kind(objs, "NetworkPolicy")
    covered = [
        p
        for p in pods
        if any(
            selector_matches(np["spec"]["podSelector"].get("matchLabels") or {}, p)
            or not np["spec"]["podSelector"].get("matchLabels")
            for np in policies
        )
    ]
    assert len(covered) == len(pods), "a pod is selected by no NetworkPolicy"
    for np in policies:
        sel = np["spec"]["podSelector"].get("matchLabels") or {}
        if sel:
            assert any(selector_matches(sel, p) for p in pods), f"{np['metadata']['name']} selects nothing"
        for rule in np["spec"].get("ingress") or []:
            for port in rule.get("ports") or []:
                # Named ports must exist on the selected pods, or the rule allows nothing.
                if isinstance(port["port"], str):
                    names = {
                        pt["name"]
                        for w in of_kind(objs, "Deployment")
                        if selector_matches(sel, pod_labels(w))
                        for c in pod_spec(w)["containers"]
                        for pt in c.get("ports") or []
                    }
                    assert port["port"] in names, f"NetworkPolicy {np['metadata']['name']}: no port {port['port']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_wildcard_rbac(variant):
    for role in of_kind(render(variant), "Role", "ClusterRole"):
        for group, resource, _name, verb in normalized_rules(role):
            assert "*" not in (group, resource, verb), f"{role['metadata']['name']}: {group}/{resource} {verb}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_proxy_cannot_write_deployments_or_touch_secrets(variant):
    rules = normalized_rules(named(render(variant), "ClusterRole", "ibc-proxy"))
    assert not {r for _, r, _, _ in rules} & {"secrets", "deployments/scale"}
    assert {v for _, r, _, v in rules if r == "deployments"} == {"get", "list", "watch"}
    writes = {(r, v) for _, r, _, v in rules if v not in ("get", "list", "watch")}
    assert writes == {("inferencemodels/scale", "patch"), ("inferencemodels/status", "patch"), ("events", "create")}


#: kubeview kind -> (apiGroup, resource) a list+watch cache of it needs.
KIND_RESOURCES = {
    "Node": ("", "nodes"),
    "Pod": ("", "pods"),
    "Deployment": ("apps", "deployments"),
    "InferenceModel": ("inference.eh-ops.io", "inferencemodels"),
    "ResourceSlice": ("resource.k8s.io", "resourceslices"),
}


def _watched_kinds(component: str) -> tuple[str, ...]:
    """The kinds a component's watch cache lists and watches, read from its code (a cache of Nodes watches
    their ResourceSlices too: kubeview.cache.watched_kinds)."""
    from kubeview.cache import watched_kinds

    if component == "proxy":
        from proxy.kube_scaler import KINDS

        return watched_kinds(tuple(KINDS))
    if component == "controller":
        from controller.manager import KINDS as CONTROLLER_KINDS

        return watched_kinds(tuple(CONTROLLER_KINDS))
    text = (REPO / {"webhook": "webhook/kube.py", "extender": "extender/kube.py"}[component]).read_text()
    return watched_kinds(tuple(k for k in KIND_RESOURCES if f'"{k}"' in text))


@pytest.mark.parametrize(
    ("component", "role"),
    [
        ("proxy", "ibc-proxy"),
        ("webhook", "ibc-webhook"),
        ("extender", "ibc-extender"),
        ("controller", "ibc-controller"),
    ],
)
def test_cluster_role_lets_each_component_list_and_watch_what_its_cache_watches(component, role):
    # A cache that cannot list a kind never syncs: /readyz stays 503 and the component never serves.
    rules = set(normalized_rules(named(helm_template(), "ClusterRole", role)))
    kinds = _watched_kinds(component)
    assert kinds
    for kind in kinds:
        group, resource = KIND_RESOURCES[kind]
        for verb in ("list", "watch"):
            assert (group, resource, "*", verb) in rules, f"{role} cannot {verb} {resource} ({kind})"


# --------------------------------------------------------------------------------------------------
# the chart agrees with the components' own manifests (deploy/<component>/ is the source of truth)

#: Plain manifest name -> the chart's name for release "ibc", where they differ.
CHART_NAMES = {"inference-budget-scheduler": "ibc-scheduler"}


def _rbac_by_name(objs: list[Obj]) -> dict[str, list[tuple[str, str, str, str]]]:
    out = {}
    for o in of_kind(objs, "Role", "ClusterRole"):
        name = o["metadata"]["name"]
        rules = normalized_rules(o)
        for plain, chart in CHART_NAMES.items():
            name = name.replace(plain, chart)
            rules = [tuple(x.replace(plain, chart) for x in r) for r in rules]
        out[name] = sorted(rules)
    return out


@pytest.mark.parametrize("component", COMPONENTS)
def test_chart_rbac_equals_the_component_rbac(component):
    plain = _rbac_by_name(plain_component(component))
    chart = _rbac_by_name(helm_template())
    assert plain, f"deploy/{component} has no Role/ClusterRole"
    for name, rules in plain.items():
        assert chart.get(name) == rules, f"chart {name} differs from deploy/{component}"


def _binding_refs(objs: list[Obj]) -> set[tuple[str, str, str]]:
    refs = set()
    for b in of_kind(objs, "RoleBinding", "ClusterRoleBinding"):
        ref = b["roleRef"]["name"]
        for plain, chart in CHART_NAMES.items():
            ref = ref.replace(plain, chart)
        for sub in b["subjects"]:
            refs.add((b["kind"], ref, sub["name"].replace("inference-budget-scheduler", "ibc-scheduler")))
    return refs


@pytest.mark.parametrize("component", COMPONENTS)
def test_chart_binds_each_service_account_to_the_same_roles(component):
    assert _binding_refs(plain_component(component)) <= _binding_refs(helm_template())


def _webhooks(objs: list[Obj]) -> list[Obj]:
    """The webhook entries with names, whitespace of CEL expressions and the caBundle normalized."""
    vwc = of_kind(objs, "ValidatingWebhookConfiguration")
    assert len(vwc) == 1
    hooks = json.loads(json.dumps(vwc[0]["webhooks"]))
    for hook in hooks:
        hook["clientConfig"].pop("caBundle", None)
        for cond in hook.get("matchConditions") or []:
            cond["expression"] = " ".join(cond["expression"].split())
    return hooks


def test_chart_webhook_configuration_equals_the_component_one():
    assert _webhooks(helm_template()) == _webhooks(plain_component("webhook"))


def test_webhook_failure_policy_and_timeout_come_from_values():
    hooks = _webhooks(helm_template("webhook.failurePolicy=Ignore", "webhook.timeoutSeconds=3"))
    assert {h["failurePolicy"] for h in hooks} == {"Ignore"}
    assert {h["timeoutSeconds"] for h in hooks} == {3}


def _scheduler_config(objs: list[Obj]) -> Obj:
    cms = [o for o in of_kind(objs, "ConfigMap") if "config.yaml" in (o.get("data") or {})]
    assert len(cms) == 1
    text = cms[0]["data"]["config.yaml"].replace("inference-budget-scheduler-lease", "")
    config = yaml.safe_load(text)
    config["leaderElection"].pop("resourceName")
    return dict(config)


def test_chart_scheduler_configuration_equals_the_component_one():
    assert _scheduler_config(helm_template()) == _scheduler_config(plain_component("scheduler"))


def chart_copies() -> list[tuple[Path, Path]]:
    """(source of truth, copy inside the chart) pairs that deploy/tools/sync-chart.sh maintains."""
    pairs = [
        (p, CHART / "files" / "crds" / p.name)
        for p in sorted((DEPLOY / "crd").glob("*.yaml"))
        if p.name != "kustomization.yaml"
    ]
    pairs.append(
        (
            DEPLOY / "webhook" / "validatingwebhookconfiguration.yaml",
            CHART / "files" / "webhook" / "validatingwebhookconfiguration.yaml",
        )
    )
    pairs.append((DEPLOY / "monitoring" / "grafana-dashboard.json", CHART / "files" / "grafana-dashboard.json"))
    return pairs


@pytest.mark.parametrize(("source", "copy"), chart_copies(), ids=lambda p: str(p.relative_to(DEPLOY)).replace("/", "."))
def test_chart_copies_are_in_sync(source, copy):
    assert copy.is_file() and copy.read_bytes() == source.read_bytes(), (
        f"{copy.relative_to(REPO)} is stale: run bash deploy/tools/sync-chart.sh"
    )


def test_chart_webhook_excludes_the_release_namespace():
    for hook in _webhooks(helm_template(namespace="ibc-other")):
        values = hook["namespaceSelector"]["matchExpressions"][0]["values"]
        assert "ibc-other" in values and "ibc-system" not in values
        assert hook["clientConfig"]["service"]["namespace"] == "ibc-other"


def test_chart_crd_is_the_component_crd():
    for path in sorted((DEPLOY / "crd").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        source = load_documents(path.read_text())[0]
        rendered = named(helm_template(), "CustomResourceDefinition", source["metadata"]["name"])
        assert rendered["spec"] == source["spec"]
        assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crd_can_be_left_out_and_unkept():
    assert not of_kind(helm_template("crds.install=false"), "CustomResourceDefinition")
    crd = of_kind(helm_template("crds.keep=false"), "CustomResourceDefinition")[0]
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


# --------------------------------------------------------------------------------------------------
# TLS wiring: every Secret a pod mounts is made by the install (else the pod waits forever)


def _secret_makers(objs: list[Obj]) -> set[str]:
    made = {o["spec"]["secretName"] for o in of_kind(objs, "Certificate")}
    for w in of_kind(objs, *WORKLOAD_KINDS):
        for c in containers(pod_spec(w)):
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if "bootstrap" in argv:
                made.update(a.split("=", 1)[1] for a in argv if a.startswith("--secret="))
    return made


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_mounted_secret_is_created_by_the_install(variant):
    objs = render(variant)
    made = _secret_makers(objs)
    for w in of_kind(objs, *WORKLOAD_KINDS):
        for vol in pod_spec(w).get("volumes") or []:
            if "secret" in vol and not vol["secret"].get("optional"):
                name = vol["secret"]["secretName"]
                assert name in made, f"{w['metadata']['name']} mounts Secret {name} that nothing creates"


@pytest.mark.parametrize("variant", VARIANTS)
def test_webhook_ca_bundle_has_a_source(variant):
    objs = render(variant)
    vwc = of_kind(objs, "ValidatingWebhookConfiguration")[0]
    inject = (vwc["metadata"].get("annotations") or {}).get("cert-manager.io/inject-ca-from")
    certificates = {f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in of_kind(objs, "Certificate")}
    patchers = [
        c
        for w in of_kind(objs, *WORKLOAD_KINDS)
        for c in containers(pod_spec(w))
        if f"--webhook-config={vwc['metadata']['name']}" in (c.get("args") or [])
    ]
    if certificates:
        # cert-manager mode: cainjector copies the CA of exactly this Certificate; nothing else patches.
        assert inject in certificates and not patchers
    else:
        # self-signed mode: `ibc certs bootstrap` patches the caBundle; no dangling cert-manager annotation.
        assert inject is None and patchers


@pytest.mark.parametrize("variant", VARIANTS)
def test_webhook_serving_certificate_names_the_service_the_apiserver_dials(variant):
    objs = render(variant)
    hook = of_kind(objs, "ValidatingWebhookConfiguration")[0]["webhooks"][0]["clientConfig"]["service"]
    dns = f"{hook['name']}.{hook['namespace']}.svc"
    certs = [o for o in of_kind(objs, "Certificate") if o["metadata"]["name"] == hook["name"]]
    for cert in certs:
        assert dns in cert["spec"]["dnsNames"]
    if not certs:
        bootstraps = [
            c
            for w in of_kind(objs, *WORKLOAD_KINDS)
            for c in containers(pod_spec(w))
            if f"--service={hook['name']}" in (c.get("args") or [])
        ]
        assert bootstraps and all(f"--namespace={hook['namespace']}" in c["args"] for c in bootstraps)


@pytest.mark.parametrize("variant", VARIANTS)
def test_certs_bootstrap_runs_with_the_rbac_it_needs(variant):
    objs = render(variant)
    for w in of_kind(objs, *WORKLOAD_KINDS):
        spec = pod_spec(w)
        for c in containers(spec):
            args = c.get("args") or []
            if "bootstrap" not in args:
                continue
            secret = next(a.split("=", 1)[1] for a in args if a.startswith("--secret="))
            sa = spec["serviceAccountName"]
            rules = set()
            for b in of_kind(objs, "RoleBinding", "ClusterRoleBinding"):
                if any(s["name"] == sa for s in b["subjects"]):
                    rules.update(normalized_rules(named(objs, b["roleRef"]["kind"], b["roleRef"]["name"])))
            assert ("", "secrets", secret, "get") in rules and ("", "secrets", secret, "update") in rules
            assert ("", "secrets", "*", "create") in rules
            for a in args:
                if a.startswith("--webhook-config="):
                    name = a.split("=", 1)[1]
                    for verb in ("get", "patch"):
                        assert ("admissionregistration.k8s.io", "validatingwebhookconfigurations", name, verb) in rules


def test_self_signed_overlay_has_no_cert_manager_objects():
    objs = overlay("self-signed")
    assert not [o for o in objs if o["apiVersion"].startswith("cert-manager.io/")]


def test_one_image_for_every_ibc_container():
    for variant in ("kustomize-cert-manager", "kustomize-self-signed"):
        images = {
            c["image"]
            for w in of_kind(render(variant), *WORKLOAD_KINDS)
            for c in containers(pod_spec(w))
            if "kube-scheduler" not in c["image"]
        }
        assert images == {"inference-budget-controller:0.1.0"}, (variant, images)


def test_helm_image_values_reach_every_ibc_container():
    objs = helm_template("image.repository=registry.example/ibc", "image.tag=1.2.3")
    images = {
        c["image"]
        for w in of_kind(objs, *WORKLOAD_KINDS)
        for c in containers(pod_spec(w))
        if "kube-scheduler" not in c["image"]
    }
    assert images == {"registry.example/ibc:1.2.3"}


# --------------------------------------------------------------------------------------------------
# monitoring


def test_monitoring_objects_only_when_asked():
    assert not of_kind(helm_template(), "ServiceMonitor")
    assert not [o for o in of_kind(helm_template(), "ConfigMap") if "grafana" in o["metadata"]["name"]]
    objs = helm_template(*HELM_VARIANTS["helm-monitoring"])
    monitors = of_kind(objs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"ibc-proxy", "ibc-webhook", "ibc-extender", "ibc-controller"}
    dashboards = [o for o in of_kind(objs, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(dashboards) == 1
    body = json.loads(next(iter(dashboards[0]["data"].values())))
    assert body["uid"] == "ibc-overview"


@pytest.mark.parametrize("source", ["helm", "plain"])
def test_service_monitors_scrape_ports_their_services_have(source):
    if source == "helm":
        objs = helm_template(*HELM_VARIANTS["helm-monitoring"])
    else:
        objs = [*plain_component("monitoring"), *overlay("cert-manager")]
    services = of_kind(objs, "Service")
    for sm in of_kind(objs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if selector_matches(sel, s["metadata"].get("labels") or {})]
        assert len(matched) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(matched)} Services"
        ports = {p["name"] for p in matched[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in ports
            if ep.get("scheme") == "https":
                assert ep["tlsConfig"]["serverName"].startswith(matched[0]["metadata"]["name"] + ".")
                assert ep["tlsConfig"]["ca"]["secret"]["name"] in _secret_makers(objs)


def exported_metric_names() -> set[str]:
    """Every series name the components export, read from live collectors (no server needed)."""
    from prometheus_client import CollectorRegistry

    from controller.metrics import ControllerMetrics
    from extender.metrics import Metrics as ExtenderMetrics
    from proxy.metrics import ProxyMetrics
    from serving.metrics import MemoryCollector
    from webhook.metrics import Metrics as WebhookMetrics

    registry = CollectorRegistry()
    ProxyMetrics(registry)
    WebhookMetrics(registry)
    ExtenderMetrics(registry)
    ControllerMetrics(registry)
    registry.register(MemoryCollector(lambda: []))
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def dashboard_metric_names(dashboard: Obj) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets") or []]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    words = set(re.findall(r"\b((?:ibc|inference)_[a-z_]+)\b", " ".join(exprs)))
    return words


def test_dashboard_queries_only_metrics_the_code_exports():
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    used = dashboard_metric_names(dashboard)
    assert len(used) >= 15
    unknown = used - exported_metric_names()
    assert not unknown, f"panels query metrics no component exports: {sorted(unknown)}"


def test_dashboard_json_is_the_generators_output():
    proc = subprocess.run(
        [sys.executable, str(DEPLOY / "tools" / "grafana_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_dashboard_panels_do_not_overlap():
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))


# --------------------------------------------------------------------------------------------------
# chart options a user is likely to set


def test_an_existing_issuer_replaces_the_charts_own_ca_chain():
    objs = helm_template(
        "certificates.mode=cert-manager",
        "certificates.certManager.issuerRef.kind=ClusterIssuer",
        "certificates.certManager.issuerRef.name=corp-ca",
    )
    assert not of_kind(objs, "Issuer")
    certs = of_kind(objs, "Certificate")
    assert {c["metadata"]["name"] for c in certs} == {"ibc-webhook", "ibc-extender"}
    assert all(c["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "corp-ca"} for c in certs)


def test_proxy_api_keys_come_from_a_mounted_secret_file():
    objs = helm_template("proxy.apiKeys.existingSecret=proxy-keys")
    spec = pod_spec(named(objs, "Deployment", "ibc-proxy"))
    container = spec["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    volume = next(v for v in spec["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "proxy-keys"
    assert f"--api-key-file={mount['mountPath']}/keys" in container["args"]
    # The key file is read by the proxy itself: its ServiceAccount still cannot read Secrets.
    assert "secrets" not in {r for _, r, _, _ in normalized_rules(named(objs, "ClusterRole", "ibc-proxy"))}


def test_network_policies_can_be_turned_off_and_widened():
    assert not of_kind(helm_template("networkPolicy.enabled=false"), "NetworkPolicy")
    peer = "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring"
    extender = named(helm_template(peer), "NetworkPolicy", "ibc-extender")
    sources = extender["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in sources
    assert any("podSelector" in s for s in sources), "the scheduler must stay allowed"


def test_components_can_be_left_out_without_dangling_references():
    objs = helm_template("proxy.enabled=false", "monitoring.serviceMonitor.enabled=true")
    assert "ibc-proxy" not in {o["metadata"]["name"] for o in objs}
    assert "ibc-proxy" not in {m["metadata"]["name"] for m in of_kind(objs, "ServiceMonitor")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_ibc_container_passes_flags_the_cli_accepts(variant, capsys):
    # A misspelt or removed flag is an exit 2 at start: a CrashLoopBackOff no render would show.
    from ibc.__main__ import build_parser

    seen = set()
    objs = render(variant)
    for w in of_kind(objs, *WORKLOAD_KINDS):
        for c in containers(pod_spec(w)):
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if "kube-scheduler" in argv:
                continue
            argv = argv[1:] if argv and argv[0] == "ibc" else argv
            command = ibc_command(c)
            assert command, f"{w['metadata']['name']}/{c['name']}: no ibc command in {argv}"
            try:
                args = build_parser(only=command).parse_args(argv)
            except SystemExit:
                pytest.fail(f"{w['metadata']['name']}/{c['name']}: {capsys.readouterr().err.strip()}")
            assert args.command == command
            seen.add(command)
    bootstrap = set() if of_kind(objs, "Certificate") else {"certs"}  # cert-manager mode runs no bootstrap
    assert seen == {"proxy", "webhook", "extender", "controller", *bootstrap}
