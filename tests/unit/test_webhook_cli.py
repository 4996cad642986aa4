"""`ibc webhook` refuses bad input with exit code 2 and one clear line, before any server starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ibc.__main__ import main
from ibc.commands import webhook as command

pytestmark = pytest.mark.unit

SEED = str(Path(__file__).resolve().parents[2] / "examples" / "seed-scenario.yaml")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        pytest.param(["--cluster-state", "/nonexistent/state.yaml"], "/nonexistent/state.yaml: no such file",
                     id="missing-snapshot"),
        pytest.param(["--cluster-state", SEED, "--workers", "2"], "--workers 2 with --cluster-state",
                     id="offline-several-workers"),
        pytest.param(["--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig /nonexistent/kubeconfig: no such file",
                     id="missing-kubeconfig"),
        pytest.param([], "not running in a cluster: give --kubeconfig FILE (live) or --cluster-state FILE",
                     id="no-source-outside-a-cluster"),
        pytest.param(["--cluster-state", SEED, "--bind", "localhost"], "expected HOST:PORT", id="bad-bind"),
        pytest.param(["--cluster-state", SEED, "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together",
                     id="cert-without-key"),
        pytest.param(["--cluster-state", SEED, "--ledger-ttl", "0"], "ledger_ttl_seconds must be > 0",
                     id="zero-ttl"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["webhook", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(fragment in line for line in err), err
    assert not any("Traceback" in line for line in err)


def test_deny_code_other_than_403_or_429_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["webhook", "--cluster-state", SEED, "--deny-code", "500"])
    assert info.value.code == 2
    assert "invalid choice: 500" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"POD_NAMESPACE": "platform"}, "platform", id="downward-api"),
        pytest.param({}, "ibc-system", id="default"),
    ],
)
def test_ledger_namespace_defaults_to_the_webhooks_own(env, expected, monkeypatch, tmp_path):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(command, "SA_NAMESPACE_FILE", tmp_path / "absent")
    assert command.default_namespace() == expected


def test_service_account_namespace_file_is_used_in_a_pod(monkeypatch, tmp_path):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    ns_file = tmp_path / "namespace"
    ns_file.write_text("inference\n")
    monkeypatch.setattr(command, "SA_NAMESPACE_FILE", ns_file)
    assert command.default_namespace() == "inference"


def test_snapshot_cache_holds_models_before_their_pods():
    """A pod without its own memory annotation takes its model's memory: models must be applied first."""
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "default", "uid": "u",
                                       "labels": {"inference.eh-ops.io/model": "m"}},
           "spec": {"nodeName": "n"}, "status": {"phase": "Running"}}
    model = {"kind": "InferenceModel", "metadata": {"name": "m", "namespace": "default"},
             "spec": {"memory": "16Gi", "replicas": 1}}
    node = {"kind": "Node", "metadata": {"name": "n", "annotations": {"inference.eh-ops.io/memory-capacity": "64Gi"}}}
    cache = command.snapshot_cache((pod, model, node))
    view = cache.view()
    assert [p.memory_bytes for p in view.placements] == [16 * 2**30]
    assert view.free_bytes(0) == {"n": 48 * 2**30}
