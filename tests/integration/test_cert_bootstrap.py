"""`certs.bootstrap` against an HTTP fake of the few apiserver calls it makes, through the real client.

The fake keeps the semantics that matter: create answers 409 when the Secret exists, an update with a
stale resourceVersion answers 409, a JSON patch whose `test` fails answers 422, and anything but
`application/json-patch+json` on the webhook configuration is refused. Hooks let a "peer replica" act
between our read and our write, which is where the races are.
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask, jsonify, request
from kubernetes import client

from certs.bootstrap import BootstrapSettings, bootstrap
from certs.errors import BootstrapError
from certs.generate import TLSBundle, generate_serving_certificate
from ibc.__main__ import main
from serving.runner import ThreadedServer, serve_in_thread

pytestmark = pytest.mark.integration

NS = "ibc-system"
SECRET = "ibc-webhook-tls"
CONFIG = "ibc-webhook"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json_body() -> Any:
    """The request body as JSON. Like kube-apiserver, a missing Content-Type means JSON (the kubernetes 37
    client sends none on create and replace); a different one is refused."""
    if request.content_type not in (None, "", "application/json"):
        return None
    return request.get_json(force=True)


def _status(code: int, reason: str, message: str) -> Any:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return jsonify(body), code


class FakeApiServer:
    """Secrets and ValidatingWebhookConfigurations, enough for the bootstrap; every request is recorded."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.patch_types: list[str] = []
        self.hooks: dict[str, Callable[[], None]] = {}
        self.fail: dict[str, tuple[int, str]] = {}
        self._rv = 100

    def next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def put_secret(self, bundle: TLSBundle, annotations: dict[str, str] | None = None) -> None:
        self.secrets[SECRET] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": SECRET,
                "namespace": NS,
                "resourceVersion": self.next_rv(),
                "annotations": annotations or {},
            },
            "data": {
                "tls.crt": _b64(bundle.cert_pem),
                "tls.key": _b64(bundle.key_pem),
                "ca.crt": _b64(bundle.ca_pem),
                **({"ca.key": _b64(bundle.ca_key_pem)} if bundle.ca_key_pem else {}),
            },
        }

    def stored_bundle(self) -> TLSBundle:
        data = self.secrets[SECRET]["data"]
        return TLSBundle(
            *(base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key")),
            ca_key_pem=base64.b64decode(data["ca.key"]) if "ca.key" in data else None,
        )

    def add_config(self, name: str, ca_bundles: list[bytes | None]) -> None:
        webhooks = []
        for i, bundle in enumerate(ca_bundles):
            client_config: dict[str, Any] = {"service": {"name": "ibc-webhook", "namespace": NS, "path": f"/v{i}"}}
            if bundle is not None:
                client_config["caBundle"] = _b64(bundle)
            webhooks.append(
                {
                    "name": f"w{i}.inference.eh-ops.io",
                    "clientConfig": client_config,
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                }
            )
        self.configs[name] = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name, "resourceVersion": self.next_rv()},
            "webhooks": webhooks,
        }

    def ca_bundles(self, name: str) -> list[bytes]:
        return [base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in self.configs[name]["webhooks"]]

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if m != "GET"]

    def _before(self, key: str) -> Any:
        self.requests.append((request.method, request.path))
        hook = self.hooks.pop(key, None)
        if hook is not None:
            hook()
        if key in self.fail:
            code, reason = self.fail[key]
            return _status(code, reason, f"{key} refused by the test")
        return None

    def app(self) -> Flask:
        app = Flask("fake-apiserver")
        secret_path = f"/api/v1/namespaces/{NS}/secrets"
        config_path = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/<name>"

        @app.get(f"{secret_path}/<name>")
        def get_secret(name: str) -> Any:
            if (refused := self._before("GET secret")) is not None:
                return refused
            if name not in self.secrets:
                return _status(404, "NotFound", f'secrets "{name}" not found')
            return jsonify(self.secrets[name])

        @app.post(secret_path)
        def create_secret() -> Any:
            if (refused := self._before("POST secret")) is not None:
                return refused
            body = _json_body()
            if body is None:
                return _status(415, "UnsupportedMediaType", f"unsupported {request.content_type}")
            name = body["metadata"]["name"]
            if name in self.secrets:
                return _status(409, "AlreadyExists", f'secrets "{name}" already exists')
            body["metadata"]["resourceVersion"] = self.next_rv()
            self.secrets[name] = body
            return jsonify(body), 201

        @app.put(f"{secret_path}/<name>")
        def replace_secret(name: str) -> Any:
            if (refused := self._before("PUT secret")) is not None:
                return refused
            body = _json_body()
            if body is None:
                return _status(415, "UnsupportedMediaType", f"unsupported {request.content_type}")
            if name not in self.secrets:
                return _status(404, "NotFound", f'secrets "{name}" not found')
            if body["metadata"].get("resourceVersion") != self.secrets[name]["metadata"]["resourceVersion"]:
                return _status(
                    409, "Conflict", f'Operation cannot be fulfilled on secrets "{name}": the object has been modified'
                )
            body["metadata"]["resourceVersion"] = self.next_rv()
            self.secrets[name] = body
            return jsonify(body)

        @app.get(config_path)
        def get_config(name: str) -> Any:
            if (refused := self._before("GET config")) is not None:
                return refused
            if name not in self.configs:
                return _status(404, "NotFound", f'validatingwebhookconfigurations "{name}" not found')
            return jsonify(self.configs[name])

        @app.patch(config_path)
        def patch_config(name: str) -> Any:
            if (refused := self._before("PATCH config")) is not None:
                return refused
            self.patch_types.append(request.content_type or "")
            if request.content_type != "application/json-patch+json":
                return _status(415, "UnsupportedMediaType", f"unsupported patch type {request.content_type}")
            if name not in self.configs:
                return _status(404, "NotFound", f'validatingwebhookconfigurations "{name}" not found')
            patched = copy.deepcopy(self.configs[name])
            for op in request.get_json():
                *parents, last = [int(p) if p.isdigit() else p for p in op["path"].split("/")[1:]]
                target: Any = patched
                for part in parents:
                    target = target[part]
                if op["op"] == "test":
                    if target.get(last) != op["value"]:
                        return _status(422, "Invalid", f"Testing value {op['path']} failed")
                elif op["op"] in ("add", "replace"):
                    target[last] = op["value"]
                else:
                    return _status(400, "BadRequest", f"unsupported op {op['op']}")
            patched["metadata"]["resourceVersion"] = self.next_rv()
            self.configs[name] = patched
            return jsonify(patched)

        return app


@pytest.fixture
def fake() -> Iterator[tuple[FakeApiServer, ThreadedServer, client.ApiClient]]:
    api = FakeApiServer()
    server = serve_in_thread(api.app(), "127.0.0.1:0")
    configuration = client.Configuration()
    configuration.host = server.url
    with client.ApiClient(configuration) as api_client:
        yield api, server, api_client
    server.stop()


def _settings(tmp_path: Path | None = None, **kwargs: Any) -> BootstrapSettings:
    params: dict[str, Any] = {
        "service": "ibc-webhook",
        "namespace": NS,
        "secret_name": SECRET,
        "webhook_configs": (CONFIG,),
        "ip_addresses": ("127.0.0.1",),
    }
    if tmp_path is not None:
        params["out_dir"] = tmp_path / "tls"
    params.update(kwargs)
    return BootstrapSettings(**params)


def _bundle(days: int = 365, issued_days_ago: int = 0, **kwargs: Any) -> TLSBundle:
    return generate_serving_certificate(
        "ibc-webhook",
        NS,
        ip_addresses=["127.0.0.1"],
        days=days,
        now=datetime.now(UTC) - timedelta(days=issued_days_ago),
        **kwargs,
    )


def _cas(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def test_absent_secret_is_created_and_every_webhook_trusts_its_ca(fake, tmp_path: Path):
    api, _server, api_client = fake
    api.add_config(CONFIG, [None, _bundle().ca_pem])

    result = bootstrap(api_client, _settings(tmp_path))

    assert result.secret_action == "created"
    stored = api.secrets[SECRET]
    assert stored["type"] == "kubernetes.io/tls"
    assert set(stored["data"]) == {"tls.crt", "tls.key", "ca.crt", "ca.key"}
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ibc"
    bundle = api.stored_bundle()
    assert bundle == result.bundle
    assert api.ca_bundles(CONFIG) == [bundle.ca_pem, bundle.ca_pem]
    assert result.patched_webhook_configs == (CONFIG,)
    assert api.patch_types == ["application/json-patch+json"]
    assert (tmp_path / "tls" / "tls.crt").read_bytes() == bundle.cert_pem
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / "tls.key").st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert "ibc-webhook.ibc-system.svc" in bundle.dns_names and "127.0.0.1" in bundle.ip_addresses


def test_a_second_run_changes_nothing(fake):
    api, _server, api_client = fake
    api.add_config(CONFIG, [None])
    bootstrap(api_client, _settings())
    api.requests.clear()

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "unchanged"
    assert result.patched_webhook_configs == ()
    assert api.writes() == []


def test_losing_the_create_race_adopts_the_winners_pair(fake):
    api, _server, api_client = fake
    api.add_config(CONFIG, [None])
    winner = _bundle()
    api.hooks["POST secret"] = lambda: api.put_secret(winner)

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "adopted"
    assert result.bundle == winner
    assert api.stored_bundle() == winner
    assert api.ca_bundles(CONFIG) == [winner.ca_pem]


def test_an_expiring_pair_is_renewed_under_the_same_ca_without_touching_any_trust(fake):
    api, _server, api_client = fake
    old = _bundle(issued_days_ago=340)  # 25 days left, inside the 30-day renewal window
    api.put_secret(old)
    api.add_config(CONFIG, [old.ca_pem])
    api.requests.clear()

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "renewed"
    new = api.stored_bundle()
    assert new.serial != old.serial and new.key_pem != old.key_pem
    assert new.ca_pem == old.ca_pem and new.ca_key_pem == old.ca_key_pem
    new.certificate.verify_directly_issued_by(old.ca_certificates[0])
    assert result.patched_webhook_configs == ()
    assert [m for m, _ in api.writes()] == ["PUT"], "only the Secret changes; the caBundle already trusts it"


def test_a_ca_near_its_end_is_rotated_with_the_old_one_kept_in_the_bundle(fake):
    api, _server, api_client = fake
    old = _bundle(days=20, ca_days=200)  # the CA could not sign another year-long certificate
    api.put_secret(old)
    api.add_config(CONFIG, [old.ca_pem])

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "rotated"
    new_ca, kept_ca = _cas(api.stored_bundle().ca_pem)
    assert kept_ca == old.ca_certificates[0]
    assert new_ca.not_valid_after_utc > datetime.now(UTC) + timedelta(days=3000)


def test_an_expiring_pair_without_its_ca_key_rotates_trusting_the_new_ca_before_the_secret_changes(fake):
    api, _server, api_client = fake
    old = replace(_bundle(issued_days_ago=340), ca_key_pem=None)  # e.g. made by hand: no ca.key
    api.put_secret(old)
    api.add_config(CONFIG, [old.ca_pem, old.ca_pem])

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "rotated"
    assert result.reason and "expires" in result.reason
    new = api.stored_bundle()
    assert new.serial != old.serial
    new_ca, kept_ca = _cas(new.ca_pem)
    assert kept_ca == old.ca_certificates[0], "the old CA stays trusted while servers switch over"
    new.certificate.verify_directly_issued_by(new_ca)
    old.certificate.verify_directly_issued_by(kept_ca)
    assert api.ca_bundles(CONFIG) == [new.ca_pem, new.ca_pem]
    writes = api.writes()
    assert writes.index(
        ("PATCH", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{CONFIG}")
    ) < writes.index(("PUT", f"/api/v1/namespaces/{NS}/secrets/{SECRET}")), "trust first, then serve"


def test_a_missing_san_rotates(fake):
    api, _server, api_client = fake
    api.put_secret(_bundle())
    api.add_config(CONFIG, [None])

    result = bootstrap(api_client, _settings(extra_dns=("ibc-extender.ibc-system.svc",)))

    assert result.secret_action == "renewed"
    assert result.reason == "tls.crt lacks SANs ibc-extender.ibc-system.svc"
    assert "ibc-extender.ibc-system.svc" in api.stored_bundle().dns_names


def test_a_broken_secret_is_replaced(fake):
    api, _server, api_client = fake
    good = _bundle()
    api.put_secret(TLSBundle(good.ca_pem, good.cert_pem, _bundle().key_pem))
    api.add_config(CONFIG, [None])

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "rotated"
    assert result.reason == "tls.key does not match tls.crt"
    assert len(_cas(api.stored_bundle().ca_pem)) == 2


def test_losing_the_rotation_race_uses_the_peers_pair(fake):
    api, _server, api_client = fake
    old = _bundle(issued_days_ago=340)
    api.put_secret(old)
    api.add_config(CONFIG, [old.ca_pem])
    peer = _bundle(previous_ca_pem=old.ca_certificates[0].public_bytes(serialization.Encoding.PEM))
    api.hooks["PUT secret"] = lambda: api.put_secret(peer)

    result = bootstrap(api_client, _settings())

    assert result.secret_action == "rotated-by-peer"
    assert result.bundle == peer == api.stored_bundle()
    assert api.ca_bundles(CONFIG) == [peer.ca_pem], "the caBundle ends as the winner's ca.crt"


def test_a_concurrent_change_of_the_webhook_configuration_is_retried_not_overwritten(fake):
    api, _server, api_client = fake
    api.add_config(CONFIG, [None, None])

    def someone_edits() -> None:
        api.configs[CONFIG]["metadata"]["resourceVersion"] = api.next_rv()
        api.configs[CONFIG]["metadata"]["labels"] = {"edited": "yes"}

    api.hooks["PATCH config"] = someone_edits

    result = bootstrap(api_client, _settings())

    patches = [r for r in api.requests if r[0] == "PATCH"]
    assert len(patches) == 2, "the first patch failed its resourceVersion test and was retried"
    assert api.configs[CONFIG]["metadata"]["labels"] == {"edited": "yes"}
    assert api.ca_bundles(CONFIG) == [result.bundle.ca_pem] * 2


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda api: api.put_secret(_bundle(), {"cert-manager.io/certificate-name": "ibc-serving"}),
            "is issued by cert-manager (Certificate ibc-serving)",
        ),
        (lambda api: None, f"cannot read ValidatingWebhookConfiguration {CONFIG}: HTTP 404"),
        (
            lambda api: api.fail.update({"GET secret": (403, "Forbidden")}),
            f"cannot read Secret {NS}/{SECRET}: HTTP 403 FORBIDDEN: GET secret refused by the test",
        ),
        (
            lambda api: (api.add_config(CONFIG, [None]), api.fail.update({"POST secret": (422, "Invalid")})),
            f"cannot create Secret {NS}/{SECRET}: HTTP 422",
        ),
    ],
    ids=["cert-manager-owns-it", "no-webhook-config", "forbidden", "create-refused"],
)
def test_api_refusals_are_one_line_bootstrap_errors(fake, setup, message):
    api, _server, api_client = fake
    setup(api)
    with pytest.raises(BootstrapError) as info:
        bootstrap(api_client, _settings())
    assert message.lower() in str(info.value).lower()
    assert "\n" not in str(info.value)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`main()` installs its own root handlers (ibc.logs.configure); put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: fake, user: u}}]\n"
        "current-context: c\n"
    )
    return path


def test_ibc_certs_bootstrap_command(fake, tmp_path: Path, capsys, restore_logging):
    api, server, _api_client = fake
    api.add_config(CONFIG, [None])
    argv = [
        "certs",
        "bootstrap",
        "--service",
        "ibc-webhook",
        "--namespace",
        NS,
        "--secret",
        SECRET,
        "--webhook-config",
        CONFIG,
        "--ip",
        "127.0.0.1",
        "--out",
        str(tmp_path / "tls"),
        "--kubeconfig",
        str(_kubeconfig(tmp_path, server.url)),
    ]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"secret {NS}/{SECRET}: created") and out.count("\n") == 1
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == api.stored_bundle().ca_pem

    api.fail["GET secret"] = (500, "InternalError")
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ibc certs bootstrap: cannot read Secret") and "HTTP 500" in last


def test_an_unreachable_api_server_is_a_one_line_exit_1(tmp_path: Path, capsys, restore_logging):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    argv = [
        "certs",
        "bootstrap",
        "--service",
        "ibc-webhook",
        "--namespace",
        NS,
        "--secret",
        SECRET,
        "--kubeconfig",
        str(_kubeconfig(tmp_path, f"http://127.0.0.1:{port}")),
    ]

    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"ibc certs bootstrap: cannot read Secret {NS}/{SECRET}: API server unreachable")
    assert "Traceback" not in last
