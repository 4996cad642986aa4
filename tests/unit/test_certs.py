"""The certificates the apiserver and scheduler will check: names, chain, files, expiry, reload, errors."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.errors import CertFileError, InvalidInput
from certs.generate import (
    TLSBundle,
    generate_serving_certificate,
    read_files,
    renew_serving_certificate,
    rotation_reason,
    service_dns_names,
    write_files,
)
from certs.reload import CertReloader, build_server_context
from ibc.__main__ import main

pytestmark = pytest.mark.unit

NOW = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)
WEBHOOK_NAMES = service_dns_names("ibc-webhook", "ibc-system")


def _generate(**kwargs: object) -> TLSBundle:
    params: dict[str, object] = {"now": NOW}
    params.update(kwargs)
    return generate_serving_certificate("ibc-webhook", "ibc-system", **params)  # type: ignore[arg-type]


def _ext(cert: x509.Certificate, kind: type) -> object:
    return cert.extensions.get_extension_for_class(kind).value


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra_dns", "ips", "want_dns", "want_ips"),
    [
        ((), (), list(WEBHOOK_NAMES), []),
        (("localhost",), ("127.0.0.1",), [*WEBHOOK_NAMES, "localhost"], ["127.0.0.1"]),
        (
            ("Webhook.Example.COM.",),
            ("::1", "127.0.0.1"),
            [*WEBHOOK_NAMES, "webhook.example.com"],
            ["::1", "127.0.0.1"],
        ),
        (("ibc-webhook.ibc-system.svc",), (), list(WEBHOOK_NAMES), []),
        (("*.ibc-system.svc",), (), [*WEBHOOK_NAMES, "*.ibc-system.svc"], []),
    ],
    ids=["service-names", "localhost-and-loopback", "normalized-case-and-dot", "no-duplicates", "wildcard"],
)
def test_sans_hold_every_name_the_apiserver_may_dial(extra_dns, ips, want_dns, want_ips):
    bundle = _generate(extra_dns=extra_dns, ip_addresses=ips)
    assert list(bundle.dns_names) == want_dns
    assert list(bundle.ip_addresses) == want_ips
    assert bundle.dns_names[:4] == (
        "ibc-webhook",
        "ibc-webhook.ibc-system",
        "ibc-webhook.ibc-system.svc",
        "ibc-webhook.ibc-system.svc.cluster.local",
    )


# --- chain and key usage -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "key_class"), [("ecdsa", ec.EllipticCurvePublicKey), ("rsa", rsa.RSAPublicKey)], ids=["ecdsa", "rsa"]
)
def test_the_ca_signs_the_leaf_and_only_the_ca_may_sign(key_type, key_class):
    bundle = _generate(key_type=key_type)
    (ca,) = bundle.ca_certificates
    leaf = bundle.certificate
    leaf.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert bundle.issuer_ca() == ca

    assert _ext(ca, x509.BasicConstraints).ca is True
    assert _ext(ca, x509.KeyUsage).key_cert_sign is True
    assert _ext(leaf, x509.BasicConstraints).ca is False
    assert _ext(leaf, x509.KeyUsage).key_cert_sign is False
    assert list(_ext(leaf, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]

    assert isinstance(leaf.public_key(), key_class)
    if key_type == "ecdsa":
        assert isinstance(leaf.public_key().curve, ec.SECP256R1)
    else:
        assert leaf.public_key().key_size == 2048
    assert leaf.serial_number != ca.serial_number


def test_validity_is_the_requested_days_with_a_little_backdating_for_clock_skew():
    bundle = _generate(days=90)
    leaf = bundle.certificate
    assert leaf.not_valid_after_utc == NOW + timedelta(days=90)
    assert NOW - timedelta(minutes=10) < leaf.not_valid_before_utc < NOW
    (ca,) = bundle.ca_certificates
    assert ca.not_valid_after_utc == NOW + timedelta(days=3650), "the CA lives ten years by default"
    assert _generate(days=5000).ca_certificates[0].not_valid_after_utc == NOW + timedelta(days=5000)


def test_a_long_service_name_still_fits_the_64_character_common_name():
    bundle = generate_serving_certificate("s" * 63, "n" * 63, now=NOW)
    assert f"{'s' * 63}.{'n' * 63}.svc" in bundle.dns_names


def test_previous_ca_stays_in_the_bundle_after_the_new_one():
    old = _generate()
    new = _generate(previous_ca_pem=old.ca_pem)
    assert [c.serial_number for c in new.ca_certificates] == [
        new.issuer_ca().serial_number,
        old.ca_certificates[0].serial_number,
    ]
    assert new.issuer_ca() == new.ca_certificates[0]


@pytest.mark.parametrize("service", ["ibc-webhook", "ibc-extender"])
def test_cert_manager_certificates_carry_the_same_sans_as_ibc_certs(service):
    import yaml

    path = Path(__file__).resolve().parents[2] / "deploy/cert-manager/certificates.yaml"
    certificates = {
        d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "Certificate"
    }
    assert tuple(certificates[service]["dnsNames"]) == service_dns_names(service, "ibc-system")
    assert certificates[service]["secretName"] == f"{service}-tls"
    assert certificates[service]["issuerRef"]["name"] == "ibc-ca"
    assert certificates["ibc-ca"]["isCA"] is True


# --- files -------------------------------------------------------------------------------------------


def test_files_are_written_with_the_key_private_and_nothing_left_behind(tmp_path: Path):
    bundle = _generate()
    paths = write_files(bundle, tmp_path / "tls")
    assert stat.S_IMODE(os.stat(paths.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(paths.cert).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(paths.ca).st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert read_files(tmp_path / "tls") == replace(bundle, ca_key_pem=None), "the CA key is never written"


def test_rewriting_replaces_the_files_by_rename(tmp_path: Path):
    first = write_files(_generate(), tmp_path)
    inode = os.stat(first.cert).st_ino
    second_bundle = _generate()
    write_files(second_bundle, tmp_path)
    assert os.stat(first.cert).st_ino != inode  # a new file, never the old one rewritten in place
    assert read_files(tmp_path) == replace(second_bundle, ca_key_pem=None)
    assert stat.S_IMODE(os.stat(first.key).st_mode) == 0o600


def test_an_unwritable_directory_is_a_cert_file_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CertFileError, match="cannot write certificates"):
        write_files(_generate(), blocker / "tls")
    with pytest.raises(CertFileError, match="cannot read certificates"):
        read_files(tmp_path / "missing")


# --- rotation decisions ------------------------------------------------------------------------------


def _other_key_pem() -> bytes:
    return _generate().key_pem


@pytest.mark.parametrize(
    ("mutate", "now", "want"),
    [
        (lambda b: b, NOW + timedelta(days=1), None),
        (lambda b: b, NOW + timedelta(days=334), None),
        (lambda b: b, NOW + timedelta(days=335), "tls.crt expires 2031-01-15T12:00:00Z (renewal due 30 days"),
        (lambda b: b, NOW + timedelta(days=350), "tls.crt expires"),
        (lambda b: b, NOW + timedelta(days=400), "tls.crt expired"),
        (lambda b: b, NOW - timedelta(days=1), "tls.crt is not valid before"),
        (lambda b: TLSBundle(b.ca_pem, b.cert_pem, _other_key_pem()), NOW, "tls.key does not match tls.crt"),
        (lambda b: TLSBundle(_generate().ca_pem, b.cert_pem, b.key_pem), NOW, "not signed by a CA in ca.crt"),
        (lambda b: TLSBundle(b.ca_pem, b"garbage", b.key_pem), NOW, "tls.crt holds no PEM certificate"),
        (lambda b: TLSBundle(b"", b.cert_pem, b.key_pem), NOW, "ca.crt holds no PEM certificate"),
        (lambda b: TLSBundle(b.ca_pem, b.cert_pem, b"-----BEGIN PRIVATE KEY-----\n"), NOW, "not an unencrypted"),
    ],
    ids=[
        "fresh",
        "just-outside-renewal",
        "exactly-30-days-left",
        "inside-renewal-window",
        "expired",
        "clock-behind",
        "key-mismatch",
        "foreign-ca",
        "garbage-cert",
        "empty-ca",
        "garbage-key",
    ],
)
def test_rotation_is_due_when_the_pair_would_not_serve_for_long(mutate, now, want):
    reason = rotation_reason(mutate(_generate()), dns_names=WEBHOOK_NAMES, renew_before=timedelta(days=30), now=now)
    if want is None:
        assert reason is None
    else:
        assert reason is not None and want in reason


def test_a_missing_wanted_san_forces_rotation_but_extra_sans_do_not():
    bundle = _generate(extra_dns=["ibc-extender.ibc-system.svc"], ip_addresses=["127.0.0.1"])
    assert rotation_reason(bundle, dns_names=WEBHOOK_NAMES, now=NOW) is None
    reason = rotation_reason(bundle, dns_names=[*WEBHOOK_NAMES, "localhost"], ip_addresses=["::1"], now=NOW)
    assert reason == "tls.crt lacks SANs localhost, ::1"


def test_renewal_signs_a_new_leaf_under_the_same_ca_so_clients_keep_their_trust():
    old = _generate(ip_addresses=["127.0.0.1"])
    later = NOW + timedelta(days=340)
    new = renew_serving_certificate(old, "ibc-webhook", "ibc-system", ip_addresses=["127.0.0.1"], now=later)
    assert new.ca_pem == old.ca_pem and new.ca_key_pem == old.ca_key_pem
    assert new.serial != old.serial and new.key_pem != old.key_pem
    new.certificate.verify_directly_issued_by(old.ca_certificates[0])
    assert new.not_after == later + timedelta(days=365)
    assert rotation_reason(new, dns_names=WEBHOOK_NAMES, now=later) is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: replace(b, ca_key_pem=None), "no CA key"),
        (lambda b: replace(b, ca_key_pem=_other_key_pem()), "no CA key"),
        (lambda b: replace(b, ca_pem=_generate().ca_pem + b.ca_pem), "no CA key"),
        (lambda b: _generate(days=30, ca_days=60), "the CA ends"),
    ],
    ids=["no-ca-key", "foreign-ca-key", "signer-not-first-ca", "ca-too-short"],
)
def test_renewal_needs_the_ca_key_and_a_ca_that_outlives_the_new_leaf(mutate, message):
    with pytest.raises(InvalidInput, match=message):
        renew_serving_certificate(mutate(_generate()), "ibc-webhook", "ibc-system", now=NOW)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": "Bad_Name"}, "service 'Bad_Name' is not a DNS-1123 label"),
        ({"service": ""}, "service '' is not a DNS-1123 label"),
        ({"namespace": "x" * 64}, "namespace"),
        ({"namespace": "-lead"}, "namespace '-lead'"),
        ({"extra_dns": ["under_score.example"]}, "not a DNS name: 'under_score.example'"),
        ({"extra_dns": ["a" * 64 + ".example"]}, "not a DNS name"),
        ({"ip_addresses": ["300.1.1.1"]}, "not an IP address: '300.1.1.1'"),
        ({"ip_addresses": ["localhost"]}, "not an IP address"),
        ({"days": 0}, "days must be a whole number of days from 1"),
        ({"days": True}, "days must be a whole number"),
        ({"days": 30, "ca_days": 10}, "the CA must outlive the certificate"),
        ({"key_type": "dsa"}, "key type must be one of ecdsa, rsa"),
        ({"now": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
    ids=[
        "uppercase-service",
        "empty-service",
        "long-namespace",
        "leading-dash",
        "underscore-dns",
        "long-dns-label",
        "bad-ip",
        "hostname-as-ip",
        "zero-days",
        "bool-days",
        "ca-shorter",
        "bad-key-type",
        "naive-now",
    ],
)
def test_bad_input_is_refused_with_a_message_naming_the_value(kwargs, message):
    params = {"service": "ibc-webhook", "namespace": "ibc-system", **kwargs}
    with pytest.raises(InvalidInput, match=message.replace("*", r"\*").replace("(", r"\(")):
        generate_serving_certificate(params.pop("service"), params.pop("namespace"), **params)


def test_invalid_input_is_also_a_value_error():
    assert issubclass(InvalidInput, ValueError)


# --- hot reload (no sockets: contexts and files only) --------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reloader(tmp_path: Path, clock: FakeClock, interval_ms: int = 500) -> CertReloader:
    return CertReloader(tmp_path / "tls.crt", tmp_path / "tls.key", check_interval_ms=interval_ms, clock=clock)


def test_a_renewed_pair_is_picked_up_after_the_check_interval(tmp_path: Path):
    first = _generate(ip_addresses=["127.0.0.1"])
    write_files(first, tmp_path)
    clock = FakeClock()
    reloader = _reloader(tmp_path, clock)
    context = reloader.current()
    assert reloader.pair.serial == first.serial

    second = _generate(ip_addresses=["127.0.0.1"])
    write_files(second, tmp_path)
    assert reloader.current() is context, "checks at most once per interval"
    clock.now += 0.6
    assert reloader.current() is not context
    assert reloader.pair.serial == second.serial
    assert reloader.reloads == 1
    clock.now += 0.6
    assert reloader.check_now() is False, "unchanged files are not reloaded"


def test_a_kubelet_style_symlink_swap_is_picked_up(tmp_path: Path):
    first, second = _generate(), _generate()
    write_files(first, tmp_path / "..2030_01_15_one")
    write_files(second, tmp_path / "..2030_01_15_two")
    os.symlink("..2030_01_15_one", tmp_path / "..data")
    for name in ("ca.crt", "tls.crt", "tls.key"):
        os.symlink(f"..data/{name}", tmp_path / name)
    reloader = _reloader(tmp_path, FakeClock())
    assert reloader.pair.serial == first.serial

    os.symlink("..2030_01_15_two", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert reloader.check_now() is True
    assert reloader.pair.serial == second.serial


def test_a_half_written_pair_keeps_the_old_one_serving_and_logs_once(tmp_path: Path, caplog):
    first, second = _generate(), _generate()
    write_files(first, tmp_path)
    reloader = _reloader(tmp_path, FakeClock())
    context = reloader.current()

    (tmp_path / "tls.crt").write_bytes(second.cert_pem)  # new certificate, old key: not a pair
    with caplog.at_level("DEBUG", logger="certs.reload"):
        assert reloader.check_now() is False
        assert reloader.check_now() is False
    assert reloader.current() is context
    assert reloader.pair.serial == first.serial
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "still serving serial" in errors[0].getMessage()

    (tmp_path / "tls.crt").write_bytes(second.cert_pem[: len(second.cert_pem) // 2])  # truncated
    assert reloader.check_now() is False
    (tmp_path / "tls.key").write_bytes(second.key_pem)
    (tmp_path / "tls.crt").write_bytes(second.cert_pem)
    assert reloader.check_now() is True
    assert reloader.pair.serial == second.serial
    assert reloader.failures == 3


def test_a_vanished_file_keeps_the_old_pair(tmp_path: Path):
    write_files(_generate(), tmp_path)
    reloader = _reloader(tmp_path, FakeClock())
    context = reloader.current()
    os.unlink(tmp_path / "tls.key")
    assert reloader.check_now() is False
    assert reloader.current() is context


def test_the_listening_context_is_stable_and_hands_over_in_its_sni_callback(tmp_path: Path):
    write_files(_generate(), tmp_path)
    reloader = _reloader(tmp_path, FakeClock())
    front = reloader.server_context()
    assert reloader.server_context() is front
    assert front.sni_callback is not None


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        ("missing.crt", "tls.key", None, "cannot read TLS files"),
        ("tls.crt", "other.key", None, "do not load as a pair"),
        ("tls.key", "tls.key", None, "do not load as a pair"),
        ("tls.crt", "tls.key", "missing-ca.crt", "No such file or directory: .*missing-ca.crt"),
        ("tls.crt", "tls.key", "tls.key", "client CA file .*tls.key does not load"),
    ],
    ids=["missing-cert", "mismatched-key", "key-as-cert", "missing-client-ca", "key-as-client-ca"],
)
def test_a_bad_pair_at_start_is_a_one_line_cert_file_error(tmp_path: Path, cert, key, client_ca, message):
    write_files(_generate(), tmp_path)
    (tmp_path / "other.key").write_bytes(_other_key_pem())
    with pytest.raises(CertFileError, match=message) as info:
        CertReloader(tmp_path / cert, tmp_path / key, client_ca=tmp_path / client_ca if client_ca else None)
    assert "\n" not in str(info.value)


def test_client_ca_makes_client_certificates_required(tmp_path: Path):
    import ssl

    paths = write_files(_generate(), tmp_path)
    assert build_server_context(paths.cert, paths.key).verify_mode == ssl.CERT_NONE
    assert build_server_context(paths.cert, paths.key, client_ca=paths.ca).verify_mode == ssl.CERT_REQUIRED


# --- the command line --------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`main()` installs its own root handlers (ibc.logs.configure); put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_ibc_certs_generate_writes_a_servable_pair(tmp_path: Path, capsys, restore_logging):
    code = main(
        [
            "certs",
            "generate",
            "--service",
            "ibc-webhook",
            "--namespace",
            "ibc-system",
            "--out",
            str(tmp_path / "tls"),
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
            "--days",
            "7",
        ]
    )
    assert code == 0
    bundle = read_files(tmp_path / "tls")
    assert "localhost" in bundle.dns_names and "127.0.0.1" in bundle.ip_addresses
    assert rotation_reason(bundle, dns_names=WEBHOOK_NAMES, renew_before=timedelta(days=6)) is None
    out = capsys.readouterr().out
    assert out.startswith("wrote ") and out.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["certs"], "choose an action"),
        (["certs", "generate", "--service", "Bad", "--namespace", "n", "--out", "{tmp}"], "not a DNS-1123"),
        (
            ["certs", "generate", "--service", "s", "--namespace", "n", "--out", "{tmp}", "--ip", "x"],
            "not an IP address",
        ),
        (["certs", "generate", "--service", "s", "--namespace", "n", "--out", "{tmp}", "--days", "0"], "days must be"),
        (
            ["certs", "bootstrap", "--service", "s", "--namespace", "n", "--secret", "t", "--kubeconfig", "{tmp}/nope"],
            "no such file",
        ),
        (
            [
                "certs",
                "bootstrap",
                "--service",
                "s",
                "--namespace",
                "n",
                "--secret",
                "t",
                "--days",
                "20",
                "--renew-before-days",
                "30",
            ],
            "must be shorter than the validity",
        ),
    ],
    ids=["no-action", "bad-service", "bad-ip", "zero-days", "missing-kubeconfig", "renewal-longer-than-life"],
)
def test_ibc_certs_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, restore_logging, argv, message):
    code = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert "\n" not in err and "Traceback" not in err
