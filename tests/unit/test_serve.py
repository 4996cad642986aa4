"""The server runner's input handling: bind addresses, TLS flag combinations, shared flags (no sockets)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from certs.generate import generate_serving_certificate, write_files
from serving.bind import BindError, ServeError, format_bind, parse_bind
from serving.runner import add_server_arguments, check_tls_options, serve, server_options

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("bind", "want"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":9000", ("0.0.0.0", 9000)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:8443", ("::1", 8443)),
        ("[::]:80", ("::", 80)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
    ],
    ids=["ipv4", "ephemeral", "all-interfaces", "hostname-max-port", "ipv6-loopback", "ipv6-any", "spaces"],
)
def test_parse_bind_accepts_host_port(bind, want):
    assert parse_bind(bind) == want
    assert parse_bind(format_bind(*want)) == want


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("8443", "expected HOST:PORT"),
        ("127.0.0.1:", "port must be a number from 0 to 65535"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number"),
        ("127.0.0.1:-1", "port must be a number"),
        ("::1:8443", "put an IPv6 address in brackets"),
        ("[::1]8443", "expected [IPv6]:PORT"),
        ("[]:8443", "expected [IPv6]:PORT"),
        ("unix:/tmp/sock", "unix sockets are not supported"),
        ("", "expected HOST:PORT"),
    ],
    ids=[
        "no-colon",
        "no-port",
        "named-port",
        "port-too-big",
        "negative",
        "bare-ipv6",
        "ipv6-no-colon",
        "empty-brackets",
        "unix",
        "empty",
    ],
)
def test_parse_bind_refuses_with_one_line_naming_the_input(bind, message):
    with pytest.raises(BindError, match=re.escape(message)) as info:
        parse_bind(bind)
    assert repr(bind) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        ("c", None, None, "go together"),
        (None, "k", None, "go together"),
        (None, None, "ca", "--client-ca needs --tls-cert"),
    ],
    ids=["cert-only", "key-only", "client-ca-without-tls"],
)
def test_incomplete_tls_options_are_refused(cert, key, client_ca, message):
    with pytest.raises(ServeError, match=message):
        check_tls_options(cert, key, client_ca)


def test_complete_or_absent_tls_options_pass():
    check_tls_options(None, None, None)
    check_tls_options("c", "k", None)
    check_tls_options("c", "k", "ca")


def test_shared_server_flags_map_onto_serve_keywords():
    parser = argparse.ArgumentParser()
    add_server_arguments(parser, default_bind="0.0.0.0:8443", default_workers=2)
    args = parser.parse_args(["--tls-cert", "c.crt", "--tls-key", "c.key", "--threads", "4"])
    assert server_options(args) == {
        "bind": "0.0.0.0:8443",
        "workers": 2,
        "threads": 4,
        "timeout": 30,
        "tls_cert": "c.crt",
        "tls_key": "c.key",
        "client_ca": None,
    }


def _never_called():
    raise AssertionError("the app must not be built when the configuration is refused")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bind": "nonsense"}, "expected HOST:PORT"),
        ({"bind": "127.0.0.1:0", "workers": 0}, "must be >= 1"),
        ({"bind": "127.0.0.1:0", "tls_cert": "{tmp}/tls.crt"}, "go together"),
        ({"bind": "127.0.0.1:0", "tls_cert": "{tmp}/missing.crt", "tls_key": "{tmp}/tls.key"}, "No such file"),
        ({"bind": "127.0.0.1:0", "tls_cert": "{tmp}/tls.key", "tls_key": "{tmp}/tls.key"}, "do not load"),
    ],
    ids=["bad-bind", "zero-workers", "cert-without-key", "missing-cert", "key-as-cert"],
)
def test_serve_refuses_bad_configuration_with_exit_2_and_one_line(tmp_path: Path, capsys, kwargs, message):
    write_files(generate_serving_certificate("probe", "default"), tmp_path)
    kwargs = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in kwargs.items()}
    assert serve(_never_called, name="probe", **kwargs) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibc probe: ") and message in err and "\n" not in err
