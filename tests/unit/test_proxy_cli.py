"""`ibc proxy` and `ibc mock-backend` refuse bad input with one line and exit 2, before serving anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from ibc.__main__ import main
from proxy.settings import SettingsError, digest_key, load_api_keys

pytestmark = pytest.mark.unit


@pytest.fixture
def kubeconfig(tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\n")
    return str(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--kubeconfig", "/nonexistent/kubeconfig"], "no such file", id="missing-kubeconfig"),
        pytest.param(["KUBECONFIG", "--queue-size", "0"], "queue size must be >= 1", id="queue-size-zero"),
        pytest.param(["KUBECONFIG", "--max-body-bytes", "0"], "max body bytes", id="body-limit-zero"),
        pytest.param(
            ["KUBECONFIG", "--api-key-file", "/nonexistent/keys"], "cannot read API key file", id="missing-key-file"
        ),
        pytest.param(["KUBECONFIG", "--threads", "0"], "--threads", id="zero-threads"),
    ],
)
def test_proxy_bad_input_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    kubeconfig: str,
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    argv = ["proxy", "--bind", "127.0.0.1:0"]
    for arg in extra:
        argv += ["--kubeconfig", kubeconfig] if arg == "KUBECONFIG" else [arg]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_proxy_outside_a_cluster_without_kubeconfig_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert main(["proxy"]) == 2
    assert "not running in a cluster" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--model", "m", "--bind", "nowhere"], id="bad-bind"),
        pytest.param(["--model", "m", "--tokens", "-1"], id="negative-tokens"),
        pytest.param(["--model", "m", "--kv-capacity-tokens", "0"], id="no-kv-capacity"),
    ],
)
def test_mock_backend_bad_input_exits_2(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    assert main(["mock-backend", *flags]) == 2
    assert "ibc mock-backend:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(["--max-running=-1"], "'-1' must be >= 0", id="negative-max-running"),
        pytest.param(["--max-running", "two"], "'two' is not a whole number", id="max-running-not-a-number"),
        pytest.param(["--prefix-cache-blocks", "1.5"], "'1.5' is not a whole number", id="fractional-cache-blocks"),
        pytest.param(["--prefill-per-block=-0.1"], "'-0.1' must be >= 0", id="negative-prefill"),
    ],
)
def test_mock_backend_bad_flag_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["mock-backend", "--model", "m", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_api_key_file_keeps_digests_only(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    keys = load_api_keys(path)
    assert keys == frozenset({digest_key("sk-one"), digest_key("sk-two")})
    assert all(b"sk-" not in k for k in keys)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("# nothing\n\n", "holds no key", id="empty"),
        pytest.param("sk one\n", "contains whitespace", id="space-in-key"),
    ],
)
def test_api_key_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message):
        load_api_keys(path)


GIB = 1 << 30


@pytest.mark.parametrize(
    ("meminfo_kib", "cgroup_v2", "cgroup_v1", "expected"),
    [
        pytest.param(16 * 1024 * 1024, None, None, 2 * GIB, id="no-cgroup-limit:-an-eighth-of-MemAvailable"),
        pytest.param(64 * 1024 * 1024, "max", None, 4 * GIB, id="cgroup-v2-unlimited:-capped-at-4GiB"),
        pytest.param(64 * 1024 * 1024, str(512 << 20), None, 64 << 20, id="512Mi-pod-on-a-64GiB-node"),
        pytest.param(64 * 1024 * 1024, None, str(1 << 30), 128 << 20, id="cgroup-v1-limit"),
        pytest.param(64 * 1024 * 1024, None, str((1 << 63) - 4096), 4 * GIB, id="cgroup-v1-no-limit"),
        pytest.param(1024 * 1024, str(8 * GIB), None, 128 << 20, id="node-smaller-than-the-limit"),
        pytest.param(None, None, None, 1 * GIB, id="nothing-readable:-assume-8GiB"),
    ],
)
def test_held_memory_default_follows_the_containers_limit(
    tmp_path: Path, meminfo_kib: int | None, cgroup_v2: str | None, cgroup_v1: str | None, expected: int
) -> None:
    from ibc.commands.proxy import default_held_bytes

    def file(name: str, text: str | None) -> str:
        path = tmp_path / name
        if text is not None:
            path.write_text(text + "\n")
        return str(path)

    meminfo = file("meminfo", None if meminfo_kib is None else f"MemTotal: 1 kB\nMemAvailable: {meminfo_kib} kB")
    limits = (file("memory.max", cgroup_v2), file("memory.limit_in_bytes", cgroup_v1))
    assert default_held_bytes(meminfo, limits) == expected
