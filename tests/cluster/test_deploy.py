"""The install, against a real kube-apiserver: every manifest accepted, the CRD's validation, and RBAC that
is exactly enough.

Why: `helm template` and `kustomize build` only prove the YAML renders. The apiserver is what refuses an
unknown field, a CEL matchCondition that does not compile, a bad cron schedule or a quantity the CRD's
pattern rejects; and only real authorization shows that a ServiceAccount can do its job and nothing more.

What is applied for real (and left in place, identical to what the repository declares, as the other
cluster tests expect): the ibc-system Namespace, the CRD, and the ServiceAccounts, Roles and bindings of
the self-signed overlay. Everything else is applied with `--dry-run=server`: it passes through the whole
apply pipeline (defaulting, validation, admission) without persisting, so no Deployment starts and no
webhook configuration can block the other tests. Stub CRDs stand in for cert-manager and the Prometheus
Operator (their schemas are theirs; ours is what we check).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.harness import ControlPlane, ManagedProcess, free_port, wait_for
from tests.unit.test_deploy import (
    DEPLOY,
    NAMESPACE,
    VARIANTS,
    load_documents,
    named,
    of_kind,
    overlay,
    render,
)

SA_GROUPS = ("system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}")
FIELD_MANAGER = "ibc-deploy-test"
#: Kinds applied for real; everything else only with --dry-run=server.
REAL_KINDS = (
    "Namespace",
    "CustomResourceDefinition",
    "ServiceAccount",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
)


def _stub_crd(group: str, kind: str, plural: str, scope: str = "Namespaced") -> dict[str, Any]:
    """A CRD that accepts any object of that kind: stands in for cert-manager's or the Prometheus Operator's."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": {"ibc.test/stub": "true"}},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


STUB_CRDS = [
    _stub_crd("cert-manager.io", "Certificate", "certificates"),
    _stub_crd("cert-manager.io", "Issuer", "issuers"),
    _stub_crd("cert-manager.io", "ClusterIssuer", "clusterissuers", scope="Cluster"),
    _stub_crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
]


def kubectl_ok(cp: ControlPlane, *args: str, input: str | None = None, timeout: float = 90) -> str:
    res = cp.kubectl(*args, input=input, timeout=timeout)
    assert res.returncode == 0, f"kubectl {' '.join(args)} failed:\n{res.stderr}"
    return res.stdout


def server_side_apply(
    cp: ControlPlane, objs: list[dict[str, Any]], *, dry_run: bool, namespace: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`kubectl apply --server-side` with strict field validation (unknown fields are errors)."""
    args = [
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={FIELD_MANAGER}",
        "--validate=strict",
        "-o",
        "name",
        "-f",
        "-",
    ]
    if dry_run:
        args.append("--dry-run=server")
    if namespace:
        args += ["-n", namespace]
    return cp.kubectl(*args, input=yaml.safe_dump_all(objs, sort_keys=False), timeout=120)


@pytest.fixture(scope="module")
def installed(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """Stub CRDs, then the self-signed overlay's Namespace, CRD and RBAC for real."""
    cp = control_plane
    kubectl_ok(
        cp, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-", input=yaml.safe_dump_all(STUB_CRDS)
    )
    objs = overlay("self-signed")
    real = [o for o in objs if o["kind"] in REAL_KINDS]
    for kind in ("Namespace", "CustomResourceDefinition"):  # namespaced objects and CRs need these first
        res = server_side_apply(cp, [o for o in real if o["kind"] == kind], dry_run=False)
        assert res.returncode == 0, res.stderr
    kubectl_ok(cp, "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "ibc.test/stub=true")
    kubectl_ok(cp, "wait", "--for=condition=Established", "--timeout=60s", "crd/inferencemodels.inference.eh-ops.io")
    res = server_side_apply(
        cp, [o for o in real if o["kind"] not in ("Namespace", "CustomResourceDefinition")], dry_run=False
    )
    assert res.returncode == 0, res.stderr
    try:
        yield cp
    finally:
        cp.kubectl("delete", "crd", "-l", "ibc.test/stub=true", "--wait=false")


@pytest.fixture
def test_namespace(installed: ControlPlane) -> Iterator[str]:
    name = f"deploy-{secrets.token_hex(3)}"
    kubectl_ok(installed, "create", "namespace", name)
    try:
        yield name
    finally:
        installed.kubectl("delete", "namespace", name, "--wait=false")


# --------------------------------------------------------------------------------------------------
# every manifest is accepted


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_is_accepted_by_server_side_apply(installed, variant):
    objs = render(variant)
    res = server_side_apply(installed, objs, dry_run=True)
    assert res.returncode == 0, f"{variant}: the apiserver refused:\n{res.stderr}"
    applied = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(applied) == len(objs), f"{variant}: {len(objs)} objects, apiserver answered {len(applied)}"


def test_monitoring_kustomization_is_accepted(installed):
    from tests.unit.test_deploy import kustomize_build

    objs = kustomize_build(DEPLOY / "monitoring")
    assert {o["kind"] for o in objs} == {"ServiceMonitor", "ConfigMap"}
    res = server_side_apply(installed, objs, dry_run=True)
    assert res.returncode == 0, res.stderr


def test_a_broken_manifest_is_refused(installed):
    # The check above must be able to fail: a misspelt field in a Deployment is an error, not ignored.
    deployment = json.loads(json.dumps(named(overlay("self-signed"), "Deployment", "ibc-proxy")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    res = server_side_apply(installed, [deployment], dry_run=True)
    assert res.returncode != 0 and "readinesProbe" in res.stderr


def test_the_real_install_is_in_place(installed):
    ns = json.loads(kubectl_ok(installed, "get", "namespace", NAMESPACE, "-o", "json"))
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    names = kubectl_ok(installed, "get", "serviceaccounts", "-n", NAMESPACE, "-o", "name").split()
    for sa in ("ibc-proxy", "ibc-webhook", "ibc-extender", "ibc-controller", "ibc-certs", "inference-budget-scheduler"):
        assert f"serviceaccount/{sa}" in names


# --------------------------------------------------------------------------------------------------
# the CRD


def sample_files() -> list[Path]:
    return sorted((DEPLOY / "samples").glob("*.yaml"))


@pytest.mark.parametrize("sample", sample_files(), ids=lambda p: p.name)
def test_the_crd_accepts_the_samples(installed, test_namespace, sample):
    objs = load_documents(sample.read_text())
    models = of_kind(objs, "InferenceModel")
    assert models
    res = server_side_apply(installed, objs, dry_run=False, namespace=test_namespace)
    assert res.returncode == 0, res.stderr
    listing = kubectl_ok(installed, "get", "inferencemodels", "-n", test_namespace)
    header = listing.splitlines()[0].split()
    assert header[:4] == ["NAME", "READY", "REPLICAS", "MEMORY"], header
    for model in models:
        stored = json.loads(
            kubectl_ok(
                installed, "get", "inferencemodel", model["metadata"]["name"], "-n", test_namespace, "-o", "json"
            )
        )
        # The apiserver filled the CRD's defaults for what the sample left out.
        assert stored["spec"]["memory"] == model["spec"]["memory"]
        assert stored["spec"]["cooldownPeriod"] == model["spec"].get("cooldownPeriod", "10m")
        assert stored["spec"]["replicas"] == model["spec"].get("replicas", 1)
        assert stored["spec"]["port"] == model["spec"].get("port", 8000)
        assert model["metadata"]["name"] in listing


def _model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "inference.eh-ops.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"modelName": name, "backendUrl": "http://backend:8000", **spec},
    }


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"memory": "16GB"}, "spec.memory"),
        ({"memory": "100m"}, "spec.memory"),
        ({"memory": "16Gi", "cooldownPeriod": "ten minutes"}, "spec.cooldownPeriod"),
        ({"memory": "16Gi", "replicas": -1}, "spec.replicas"),
        ({"memory": "16Gi", "port": 70000}, "spec.port"),
        ({}, "spec.memory"),
    ],
    ids=["16GB", "milli-bytes", "bad-duration", "negative-replicas", "port-out-of-range", "memory-missing"],
)
def test_the_crd_refuses_bad_specs_at_apply_time(installed, test_namespace, spec, fragment):
    res = server_side_apply(installed, [_model("bad", **spec)], dry_run=False, namespace=test_namespace)
    assert res.returncode != 0, f"accepted {spec}"
    assert "Invalid" in res.stderr and fragment in res.stderr, res.stderr
    assert installed.kubectl("get", "inferencemodel", "bad", "-n", test_namespace).returncode != 0


def test_the_crd_accepts_every_quantity_form_it_documents(installed, test_namespace):
    forms = ["16Gi", "60G", "1.5Ti", "1e9", "17179869184"]
    objs = [_model(f"q{i}", memory=m) for i, m in enumerate(forms)]
    res = server_side_apply(installed, objs, dry_run=True, namespace=test_namespace)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------------------------------
# RBAC: each ServiceAccount can do its job, and nothing outside it


def sa_user(name: str) -> str:
    return f"system:serviceaccount:{NAMESPACE}:{name}"


def as_sa(name: str) -> list[str]:
    """kubectl flags that act exactly as the ServiceAccount's token would (user and groups)."""
    return [f"--as={sa_user(name)}", *(f"--as-group={g}" for g in (*SA_GROUPS, "system:authenticated"))]


# (ServiceAccount, can-i arguments, allowed). Namespaced checks use the test namespace unless -n is given.
CAN_I = [
    # proxy: read the budget view, scale from zero through /scale, record activity in /status
    ("ibc-proxy", ["watch", "inferencemodels.inference.eh-ops.io", "-A"], True),
    ("ibc-proxy", ["patch", "inferencemodels.inference.eh-ops.io", "--subresource=scale"], True),
    ("ibc-proxy", ["patch", "inferencemodels.inference.eh-ops.io", "--subresource=status"], True),
    ("ibc-proxy", ["list", "nodes"], True),
    ("ibc-proxy", ["watch", "pods", "-A"], True),
    ("ibc-proxy", ["list", "deployments.apps", "-A"], True),
    ("ibc-proxy", ["create", "events.events.k8s.io"], True),  # an Event on a model stopped to make room
    ("ibc-proxy", ["get", "secrets"], False),
    ("ibc-proxy", ["get", "secrets", "-n", NAMESPACE], False),
    ("ibc-proxy", ["patch", "deployments.apps"], False),
    ("ibc-proxy", ["patch", "deployments.apps", "--subresource=scale"], False),
    ("ibc-proxy", ["patch", "inferencemodels.inference.eh-ops.io"], False),
    ("ibc-proxy", ["delete", "inferencemodels.inference.eh-ops.io"], False),
    ("ibc-proxy", ["create", "pods"], False),
    # webhook: read the budget view; write only its ledger ConfigMap in its own namespace
    ("ibc-webhook", ["watch", "deployments.apps", "-A"], True),
    ("ibc-webhook", ["list", "inferencemodels.inference.eh-ops.io", "-A"], True),
    ("ibc-webhook", ["update", "configmaps/ibc-admission-ledger", "-n", NAMESPACE], True),
    ("ibc-webhook", ["create", "configmaps", "-n", NAMESPACE], True),
    ("ibc-webhook", ["update", "configmaps/other", "-n", NAMESPACE], False),
    ("ibc-webhook", ["create", "configmaps"], False),
    ("ibc-webhook", ["get", "secrets", "-n", NAMESPACE], False),
    ("ibc-webhook", ["patch", "inferencemodels.inference.eh-ops.io", "--subresource=scale"], False),
    # extender: view + bind pods; its own TLS Secret only
    ("ibc-extender", ["create", "pods", "--subresource=binding"], True),
    ("ibc-extender", ["list", "nodes"], True),
    ("ibc-extender", ["update", "secrets/ibc-extender-tls", "-n", NAMESPACE], True),
    ("ibc-extender", ["get", "secrets/ibc-webhook-tls", "-n", NAMESPACE], False),
    ("ibc-extender", ["delete", "pods"], False),
    ("ibc-extender", ["patch", "nodes"], False),
    # controller: Deployments and Services of models, status, idle /scale, Events, its Lease
    ("ibc-controller", ["create", "deployments.apps"], True),
    ("ibc-controller", ["patch", "inferencemodels.inference.eh-ops.io", "--subresource=status"], True),
    ("ibc-controller", ["patch", "inferencemodels.inference.eh-ops.io", "--subresource=scale"], True),
    ("ibc-controller", ["create", "events.events.k8s.io"], True),
    ("ibc-controller", ["update", "leases.coordination.k8s.io", "-n", NAMESPACE], True),
    ("ibc-controller", ["patch", "inferencemodels.inference.eh-ops.io"], False),
    ("ibc-controller", ["get", "secrets"], False),
    ("ibc-controller", ["delete", "pods"], False),
    ("ibc-controller", ["update", "leases.coordination.k8s.io"], False),
    # certs bootstrap (self-signed overlay): one Secret, one webhook configuration
    ("ibc-certs", ["update", "secrets/ibc-webhook-tls", "-n", NAMESPACE], True),
    ("ibc-certs", ["create", "secrets", "-n", NAMESPACE], True),
    ("ibc-certs", ["patch", "validatingwebhookconfigurations/ibc-webhook"], True),
    ("ibc-certs", ["patch", "validatingwebhookconfigurations/someone-elses"], False),
    ("ibc-certs", ["list", "secrets", "-n", NAMESPACE], False),
    ("ibc-certs", ["get", "secrets/ibc-extender-tls", "-n", NAMESPACE], False),
    ("ibc-certs", ["create", "secrets"], False),
    # the second scheduler: stock kube-scheduler rights plus its own Lease
    ("inference-budget-scheduler", ["create", "pods", "--subresource=binding"], True),
    (
        "inference-budget-scheduler",
        ["update", "leases.coordination.k8s.io/inference-budget-scheduler", "-n", NAMESPACE],
        True,
    ),
    ("inference-budget-scheduler", ["get", "secrets", "-n", NAMESPACE], False),
    ("inference-budget-scheduler", ["delete", "deployments.apps"], False),
]


@pytest.mark.parametrize(
    ("sa", "args", "allowed"),
    CAN_I,
    ids=[
        f"{sa}:{'+'.join(a for a in args if not a.startswith('-'))}:{'yes' if ok else 'no'}" for sa, args, ok in CAN_I
    ],
)
def test_service_account_permissions(installed, test_namespace, sa, args, allowed):
    scope = [] if any(a in ("-A", "-n") for a in args) else ["-n", test_namespace]
    res = installed.kubectl("auth", "can-i", *args, *scope, *as_sa(sa))
    assert res.stdout.strip() == ("yes" if allowed else "no"), f"{sa} can-i {args}: {res.stdout}{res.stderr}"


@pytest.fixture
def objects(installed: ControlPlane, test_namespace: str) -> str:
    """A model, a Deployment and a Secret in the test namespace for the real calls."""
    objs = [
        _model("m", memory="16Gi", replicas=0),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "d"}},
                "template": {
                    "metadata": {"labels": {"app": "d"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]},
                },
            },
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}},
    ]
    res = server_side_apply(installed, objs, dry_run=False, namespace=test_namespace)
    assert res.returncode == 0, res.stderr
    return test_namespace


def sa_api(cp: ControlPlane, sa: str) -> Any:
    """A Python client authenticated AS the ServiceAccount (its user name and groups, a client certificate):
    the calls the components make with their own client, e.g. a bare PATCH of /scale, which `kubectl patch`
    cannot make without a GET first."""
    from kubernetes import config

    kubeconfig = cp.write_user_kubeconfig(sa_user(sa), groups=SA_GROUPS)
    return config.new_client_from_config(config_file=str(kubeconfig))


def patch_model(cp: ControlPlane, sa: str, ns: str, name: str, subresource: str, body: dict[str, Any]) -> int:
    """A merge PATCH of inferencemodels/<name>/<subresource> as the proxy and the controller send it
    (no GET first); the HTTP status."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = sa_api(cp, sa)
    custom = client.CustomObjectsApi(api)
    patch = {
        "scale": custom.patch_namespaced_custom_object_scale,
        "status": custom.patch_namespaced_custom_object_status,
    }[subresource]
    try:
        patch("inference.eh-ops.io", "v1alpha1", ns, "inferencemodels", name, body)
        return 200
    except ApiException as exc:
        return int(exc.status)
    finally:
        api.close()


def patch_scale(cp: ControlPlane, sa: str, ns: str, name: str, replicas: int) -> int:
    return patch_model(cp, sa, ns, name, "scale", {"spec": {"replicas": replicas}})


def _as(cp: ControlPlane, sa: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cp.kubectl(*args, *as_sa(sa), timeout=60)


def assert_forbidden(res: subprocess.CompletedProcess[str]) -> None:
    """Refused by authorization (HTTP 403: `... is forbidden: User "..." cannot <verb> resource ...`)."""
    assert res.returncode != 0, res.stdout
    assert re.search(r'forbidden: User "system:serviceaccount:[^"]+" cannot ', res.stderr), res.stderr


def assert_allowed(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stderr


def test_the_proxy_does_its_job_and_cannot_read_secrets_or_patch_deployments(installed, objects):
    ns, cp = objects, installed
    assert "m" in _as(cp, "ibc-proxy", "get", "inferencemodels", "-A", "-o", "name").stdout
    assert patch_scale(cp, "ibc-proxy", ns, "m", 1) == 200
    assert json.loads(kubectl_ok(cp, "get", "inferencemodel", "m", "-n", ns, "-o", "json"))["spec"]["replicas"] == 1
    status = {"status": {"lastRequestTime": "2026-01-15T10:30:00Z"}}
    assert patch_model(cp, "ibc-proxy", ns, "m", "status", status) == 200
    stored = json.loads(kubectl_ok(cp, "get", "inferencemodel", "m", "-n", ns, "-o", "json"))
    assert stored["status"]["lastRequestTime"] == "2026-01-15T10:30:00Z"
    assert patch_model(cp, "ibc-webhook", ns, "m", "status", status) == 403
    assert_allowed(_as(cp, "ibc-proxy", "get", "pods,deployments", "-A"))
    assert_forbidden(_as(cp, "ibc-proxy", "get", "secret", "s", "-n", ns))
    assert_forbidden(_as(cp, "ibc-proxy", "get", "secrets", "-n", NAMESPACE))
    assert_forbidden(
        _as(cp, "ibc-proxy", "patch", "deployment", "d", "-n", ns, "--type=merge", "-p", '{"spec":{"replicas":1}}')
    )
    assert_forbidden(_as(cp, "ibc-proxy", "scale", "deployment", "d", "-n", ns, "--replicas=1"))
    assert patch_scale(cp, "ibc-extender", ns, "m", 3) == 403
    assert_forbidden(
        _as(
            cp, "ibc-proxy", "patch", "inferencemodel", "m", "-n", ns, "--type=merge", "-p", '{"spec":{"memory":"1Gi"}}'
        )
    )
    d = json.loads(kubectl_ok(cp, "get", "deployment", "d", "-n", ns, "-o", "json"))
    assert d["spec"]["replicas"] == 0


def test_the_webhook_reads_the_view_and_writes_nothing_else(installed, objects):
    ns, cp = objects, installed
    assert_allowed(_as(cp, "ibc-webhook", "get", "nodes,pods,deployments,inferencemodels", "-A"))
    assert_allowed(
        _as(cp, "ibc-webhook", "create", "configmap", "ibc-admission-ledger", "-n", NAMESPACE, "--dry-run=server")
    )
    assert_forbidden(_as(cp, "ibc-webhook", "create", "configmap", "x", "-n", ns, "--dry-run=server"))
    assert_forbidden(_as(cp, "ibc-webhook", "get", "secret", "s", "-n", ns))
    assert patch_scale(cp, "ibc-webhook", ns, "m", 2) == 403


def test_the_controller_manages_model_workloads_only(installed, objects):
    ns, cp = objects, installed
    assert_allowed(
        _as(cp, "ibc-controller", "create", "deployment", "model-x", "--image=x", "-n", ns, "--dry-run=server")
    )
    assert patch_scale(cp, "ibc-controller", ns, "m", 0) == 200
    assert_forbidden(
        _as(
            cp,
            "ibc-controller",
            "patch",
            "inferencemodel",
            "m",
            "-n",
            ns,
            "--type=merge",
            "-p",
            '{"spec":{"memory":"1Gi"}}',
        )
    )
    assert_forbidden(_as(cp, "ibc-controller", "get", "secret", "s", "-n", ns))
    assert_forbidden(_as(cp, "ibc-controller", "delete", "secret", "s", "-n", ns, "--dry-run=server"))


def test_the_extender_binds_but_cannot_touch_other_secrets(installed, objects):
    ns, cp = objects, installed
    assert_allowed(_as(cp, "ibc-extender", "get", "nodes,pods,inferencemodels", "-A"))
    assert_forbidden(_as(cp, "ibc-extender", "get", "secret", "s", "-n", ns))
    assert_forbidden(_as(cp, "ibc-extender", "delete", "deployment", "d", "-n", ns, "--dry-run=server"))


# --------------------------------------------------------------------------------------------------
# the components themselves, run with exactly their ServiceAccount's permissions


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("KUBECONFIG", None)
    return env


def _get(url: str, ca: Path | None = None) -> tuple[int, str]:
    import ssl
    import urllib.error
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("component", ["proxy", "webhook", "extender", "controller"])
def test_each_component_becomes_ready_with_only_its_service_account(installed, test_namespace, tmp_path, component):
    # Ready = its watch cache listed every kind it needs: a missing list/watch permission keeps /readyz 503.
    cp = installed
    kubeconfig = cp.write_user_kubeconfig(sa_user(f"ibc-{component}"), groups=SA_GROUPS)
    port = free_port()
    cert, key, ca = cp.issue_serving_cert(["localhost"], ["127.0.0.1"])
    common = [sys.executable, "-m", "ibc", "--log-level", "INFO"]
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    argv = {
        "proxy": [
            *common,
            "proxy",
            "--kubeconfig",
            str(kubeconfig),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "17",
            "--namespace",
            test_namespace,
        ],
        "webhook": [
            *common,
            "webhook",
            "--kubeconfig",
            str(kubeconfig),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--threads",
            "2",
            "--ledger-namespace",
            NAMESPACE,
            *tls,
        ],
        "extender": [
            *common,
            "extender",
            "--kubeconfig",
            str(kubeconfig),
            "--bind",
            f"127.0.0.1:{port}",
            "--threads",
            "2",
            *tls,
        ],
        "controller": [
            *common,
            "controller",
            "--kubeconfig",
            str(kubeconfig),
            "--metrics-bind",
            f"127.0.0.1:{port}",
            "--namespace",
            test_namespace,
            "--leader-elect",
            "--lease-namespace",
            NAMESPACE,
            "--lease-name",
            f"ibc-deploy-test-{secrets.token_hex(3)}",
        ],
    }[component]
    scheme = "https" if component in ("webhook", "extender") else "http"
    proc = ManagedProcess(f"{component}-as-sa", argv, tmp_path / f"{component}.log").start(env=_env())
    try:

        def ready() -> bool:
            proc.check_alive()
            try:
                status, _ = _get(f"{scheme}://127.0.0.1:{port}/readyz", ca if scheme == "https" else None)
            except OSError:
                return False
            return status == 200

        wait_for(ready, timeout=90, interval=0.5, message=f"{component} /readyz as its ServiceAccount")
        assert "Forbidden" not in proc.log_tail(200), proc.log_tail(40)
    finally:
        tail = proc.log_tail(30)
        proc.stop()
        print(f"--- {component} log tail ---\n{tail}")


def _inert_webhook_configuration() -> dict[str, Any]:
    """The self-signed overlay's webhook configuration, made to match no namespace (it must not get in the
    way of the other cluster tests): the certs bootstrap only needs it to exist."""
    vwc = json.loads(json.dumps(of_kind(overlay("self-signed"), "ValidatingWebhookConfiguration")[0]))
    for hook in vwc["webhooks"]:
        hook["namespaceSelector"] = {"matchLabels": {"ibc.test/never": "true"}}
        hook["failurePolicy"] = "Ignore"
    return vwc


def _bootstrap(component: str) -> tuple[list[str], str]:
    """The `ibc certs bootstrap` args the self-signed overlay runs for a component, and as which ServiceAccount."""
    objs = overlay("self-signed")
    for w in of_kind(objs, "Deployment", "Job"):
        spec = w["spec"]["template"]["spec"]
        for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if "bootstrap" in argv and f"--service=ibc-{component}" in argv:
                return argv[argv.index("certs") :], spec["serviceAccountName"]
    raise AssertionError(f"no bootstrap for {component} in the self-signed overlay")


@pytest.mark.parametrize("component", ["webhook", "extender"])
def test_certs_bootstrap_works_with_only_its_service_account(installed, tmp_path, component):
    cp = installed
    args, sa = _bootstrap(component)
    args = [a for a in args if not a.startswith("--out")] + ["--out", str(tmp_path / "tls")]
    secret = next(a.split("=", 1)[1] for a in args if a.startswith("--secret="))
    kubeconfig = cp.write_user_kubeconfig(sa_user(sa), groups=SA_GROUPS)
    if component == "webhook":
        res = server_side_apply(cp, [_inert_webhook_configuration()], dry_run=False)
        assert res.returncode == 0, res.stderr
    try:

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ibc", *args, "--kubeconfig", str(kubeconfig)],
                capture_output=True,
                text=True,
                timeout=120,
                env=_env(),
                check=False,
            )

        first = run()
        assert first.returncode == 0, first.stderr
        stored = json.loads(kubectl_ok(cp, "get", "secret", secret, "-n", NAMESPACE, "-o", "json"))
        assert {"tls.crt", "tls.key", "ca.crt"} <= set(stored["data"])
        assert (tmp_path / "tls" / "tls.crt").read_bytes() == base64.b64decode(stored["data"]["tls.crt"])
        if component == "webhook":
            vwc = json.loads(kubectl_ok(cp, "get", "validatingwebhookconfiguration", "ibc-webhook", "-o", "json"))
            assert {h["clientConfig"].get("caBundle") for h in vwc["webhooks"]} == {stored["data"]["ca.crt"]}
        # Idempotent: the CronJob (or a pod restart) re-runs it and finds nothing to change.
        second = run()
        assert second.returncode == 0, second.stderr
        again = json.loads(kubectl_ok(cp, "get", "secret", secret, "-n", NAMESPACE, "-o", "json"))
        assert again["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    finally:
        cp.kubectl("delete", "secret", secret, "-n", NAMESPACE, "--ignore-not-found")
        if component == "webhook":
            cp.kubectl("delete", "validatingwebhookconfiguration", "ibc-webhook", "--ignore-not-found")


# --------------------------------------------------------------------------------------------------
# Helm for real: install, upgrade, uninstall


def test_helm_install_upgrade_and_uninstall(installed, tmp_path):
    from tests.unit.test_deploy import CHART, require_tool

    helm = require_tool("helm")
    cp = installed
    ns, release = f"ibc-helm-{secrets.token_hex(3)}", "ibch"
    base = [helm, "--kubeconfig", str(cp.kubeconfig), "--namespace", ns]
    # The CRD is already installed (by this module, outside Helm): leave it alone. failurePolicy Ignore, so
    # this release's webhook (which has no running pods here) cannot block the other tests' objects.
    settings = ["--set", "crds.install=false", "--set", "webhook.failurePolicy=Ignore"]

    def helm_ok(*args: str) -> str:
        res = subprocess.run(
            [*base, *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stderr}"
        return res.stdout

    def names(kind: str, namespace: str | None = ns) -> set[str]:
        scope = ["-n", namespace] if namespace else []
        out = kubectl_ok(cp, "get", kind, *scope, "-l", f"app.kubernetes.io/instance={release}", "-o", "name")
        return {line.split("/", 1)[1] for line in out.split()}

    try:
        notes = helm_ok("install", release, str(CHART), "--create-namespace", *settings)
        assert "kubectl get inferencemodels" in notes and f"job/{release}-certs-bootstrap-1" in notes
        assert names("deployments") == {
            f"{release}-{c}" for c in ("proxy", "webhook", "extender", "scheduler", "controller")
        }
        assert names("jobs") == {f"{release}-certs-bootstrap-1"}
        assert f"{release}-proxy" in names("clusterroles", None)
        # An upgrade that changes the image: the bootstrap Job is a new one (a Job's template is immutable).
        helm_ok("upgrade", release, str(CHART), "--reuse-values", "--set", "image.tag=0.1.1")
        assert names("jobs") == {f"{release}-certs-bootstrap-2"}
        proxy = json.loads(kubectl_ok(cp, "get", "deployment", f"{release}-proxy", "-n", ns, "-o", "json"))
        assert proxy["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.1")
        helm_ok("uninstall", release, "--wait")
        assert not names("clusterroles", None)
        assert not names("deployments")
        assert not names("validatingwebhookconfigurations", None)
    finally:
        subprocess.run(
            [*base, "uninstall", release, "--ignore-not-found"],
            capture_output=True,
            timeout=120,
            check=False,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        cp.kubectl("delete", "namespace", ns, "--wait=false")
