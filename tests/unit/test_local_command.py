"""`ibc local` on the command line: bad input is one line on stderr and exit 2; `--check` shows what would run."""

from pathlib import Path

import pytest

from ibc.__main__ import main

pytestmark = pytest.mark.unit


def test_check_summarises_the_seed_example(capsys):
    assert main(["local", "--config", "examples/local.yaml", "--check"]) == 0
    out = capsys.readouterr().out
    assert "examples/local.yaml: 1 node(s), 3 model(s)" in out
    assert "node  shadow: 128Gi [inference-pool=gpu-nodes]" in out
    assert "model model-b: 60Gi, cooldown 600s: ibc mock-backend --bind 127.0.0.1:{port} --model model-b" in out


@pytest.mark.parametrize(
    ("argv", "config", "message"),
    [
        pytest.param(
            [],
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 60GB, command: 'x {port}'}]\n",
            "local.yaml: models[0].memory: '60GB' is not a memory quantity in whole bytes",
            id="bad-config",
        ),
        pytest.param(["--bind", "8080"], None, "bind '8080': expected HOST:PORT", id="bad-bind"),
        pytest.param(
            ["--worker-class", "gthread", "--threads", "4"], None, "--threads 4: at least 17", id="too-few-threads"
        ),
        pytest.param(["--connections", "0"], None, "--connections must be >= 1", id="no-connections"),
        pytest.param(["--header-timeout", "0"], None, "--header-timeout must be >= 1", id="no-header-time"),
        pytest.param(["--max-held-mib", "0"], None, "--max-held-mib must be >= 1", id="no-held-memory"),
        pytest.param(["--queue-size", "0"], None, "queue size must be >= 1", id="bad-queue"),
        pytest.param(["--api-key-file", "/nonexistent/keys"], None, "cannot read API key file", id="no-key-file"),
        pytest.param(["--prefix-imbalance", "0"], None, "prefix imbalance", id="no-prefix-imbalance"),
        pytest.param(["--prefix-max-in-flight", "0"], None, "prefix max in flight must be >= 1", id="no-in-flight"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, config, message):
    path = tmp_path / "local.yaml"
    if config is None:
        path.write_text(Path("examples/local.yaml").read_text())
    else:
        path.write_text(config)
    assert main(["local", "--config", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibc local: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_missing_config_file(capsys):
    assert main(["local", "--config", "nope.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "ibc local: nope.yaml: no such file"
