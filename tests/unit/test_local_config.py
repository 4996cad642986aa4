"""`ibc local` configuration: the seed scenario loads, and every mistake is named by file, field and value."""

import textwrap

import pytest

from budget.load import LoadTuning
from local.config import (
    DEFAULT_COOLDOWN_SECONDS,
    DEFAULT_HEALTH,
    DEFAULT_STARTUP_TIMEOUT_SECONDS,
    LocalConfigError,
    load_config,
    parse_config,
    parse_config_text,
)

pytestmark = pytest.mark.unit

GI = 2**30
SRC = "examples/local.yaml"
MINI = "nodes: [{name: shadow, memory: 1Gi}]\nmodels:\n  - {name: a, memory: 1Gi, command: 'x {port}'}\n"


def _mini(extra):
    """MINI with more fields for its model (flow style: `min_replicas: 2, load: {...}`)."""
    return MINI.replace("command: 'x {port}'", "command: 'x {port}', " + extra)


def _config(**model_overrides):
    model = {"name": "model-a", "memory": "80Gi", "command": ["serve", "--port", "{port}"]}
    model.update(model_overrides)
    return {"nodes": [{"name": "shadow", "memory": "128Gi"}], "models": [model]}


def test_example_file_is_the_seed_scenario():
    config = load_config("examples/local.yaml")
    assert [(n.name, n.memory_bytes) for n in config.nodes] == [("shadow", 128 * GI)]
    assert [(m.name, m.memory_bytes) for m in config.models] == [
        ("model-a", 80 * GI),
        ("model-b", 60 * GI),
        ("model-c", 16 * GI),
    ]
    for m in config.models:
        argv = m.argv(port=4321, node="shadow")
        assert argv[:2] == ["ibc", "mock-backend"]
        assert "127.0.0.1:4321" in argv and m.name in argv


def test_defaults_match_the_crd():
    model = parse_config(_config()).models[0]
    assert model.cooldown_seconds == DEFAULT_COOLDOWN_SECONDS == 600
    assert model.health == DEFAULT_HEALTH == "/health"
    assert model.startup_timeout_seconds == DEFAULT_STARTUP_TIMEOUT_SECONDS == 600
    assert model.key == "local/model-a"
    assert model.health_url(port=9000, node="shadow") == "http://127.0.0.1:9000/health"
    # No eviction policy, no wait: only the cooldown stops a model, and a request that does not fit gets the 429.
    view = model.to_model()
    assert (view.evict_idle_after_seconds, view.priority, view.pinned, view.max_wait_seconds) == (None, 0, False, 0.0)


def test_load_layer_reaches_the_budget():
    config = parse_config_text(
        "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
        "min_replicas: 1, max_replicas: 3, load: {kv_cache_saturation: 0.9, waiting_saturation: 2, concurrency: 4, "
        "margin: 0.3, scale_up_stabilization: 1s, scale_down_stabilization: 10s}}]\n",
        source=SRC,
    )
    model = config.models[0].to_model()
    assert (model.min_replicas, model.max_replicas) == (1, 3)
    assert model.load == LoadTuning(0.9, 2, 4, 0.3, 1.0, 10.0)


def test_load_layer_defaults_are_todays_behaviour():
    model = parse_config_text(MINI, source=SRC).models[0].to_model()
    assert (model.min_replicas, model.max_replicas, model.load) == (0, 1, LoadTuning())


def test_eviction_policy_reaches_the_budget():
    config = _config(evict_idle_after="60s", priority=-1, pinned=True, max_wait="2m")
    view = parse_config(config).models[0].to_model()
    assert (view.evict_idle_after_seconds, view.priority, view.pinned, view.max_wait_seconds) == (60.0, -1, True, 120.0)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        pytest.param(
            "llama-server -m /models/q4.gguf --port {port} --alias {model}",
            ["llama-server", "-m", "/models/q4.gguf", "--port", "7001", "--alias", "model-a"],
            id="string-split-like-a-shell",
        ),
        pytest.param(
            ["vllm", "serve", "org/m", "--port", 8000, "--host", "127.0.0.1", "--served-model-name", "{model}"],
            None,
            id="list-number-without-placeholder-rejected",
        ),
        pytest.param(
            ["run", "--json", '{"port": {port}}', "--gpu", "{node}"],
            ["run", "--json", '{"port": 7001}', "--gpu", "shadow"],
            id="braces-in-json-survive",
        ),
        pytest.param(
            "serve --port={port} --name 'two words'",
            ["serve", "--port=7001", "--name", "two words"],
            id="quoted-argument",
        ),
    ],
)
def test_commands_are_argv_templates(command, expected):
    if expected is None:
        with pytest.raises(LocalConfigError, match=r"models\[0\]\.command: .* has no \{port\} placeholder"):
            parse_config(_config(command=command))
        return
    model = parse_config(_config(command=command)).models[0]
    assert model.argv(port=7001, node="shadow") == expected


@pytest.mark.parametrize(
    ("health", "url"),
    [
        pytest.param("/v1/models", "http://127.0.0.1:7001/v1/models", id="path"),
        pytest.param("http://localhost:{port}/ready", "http://localhost:7001/ready", id="full-url"),
    ],
)
def test_health_path_or_url(health, url):
    model = parse_config(_config(health=health)).models[0]
    assert model.health_url(port=7001, node="shadow") == url


def test_gpus_as_separate_budgets_with_selector_and_env():
    config = parse_config_text(
        textwrap.dedent(
            """
            nodes:
              - {name: gpu0, memory: 80Gi, labels: {gpu: h100}, env: {CUDA_VISIBLE_DEVICES: "0"}}
              - {name: gpu1, memory: 24Gi, labels: {gpu: l4}, env: {CUDA_VISIBLE_DEVICES: 1}}
            models:
              - name: big
                memory: 70Gi
                cooldown: 90s
                startup_timeout: 15m
                stop_grace_period: 5s
                node_selector: {gpu: h100}
                env: {VLLM_LOGGING_LEVEL: DEBUG}
                command: vllm serve org/big --port {port}
            """
        )
    )
    gpu1 = config.node("gpu1")
    assert gpu1 is not None and gpu1.env == {"CUDA_VISIBLE_DEVICES": "1"}
    big = config.model("big")
    assert big is not None and config.model("local/big") is big
    assert (big.cooldown_seconds, big.startup_timeout_seconds, big.stop_grace_seconds) == (90, 900, 5)
    assert big.to_model().node_selector == {"gpu": "h100"}
    assert config.nodes[0].to_node().capacity_bytes == 80 * GI


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels:\n  - {name: a, memory: 1Gi, command: 'x {port}'}\n"
            "  - {name: b, memory: 60GB, command: 'x {port}'}\n",
            "examples/local.yaml: models[1].memory: '60GB' is not a memory quantity in whole bytes",
            id="bad-quantity-names-file-field-value",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 200Gi, command: 'x {port}'}]\n",
            "models[0].memory: '200Gi' is more than the largest matching node has (128Gi)",
            id="never-fits",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 0, command: 'x {port}'}]\n",
            "models[0].memory: 0 must be greater than 0",
            id="zero-memory",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "cooldownPeriod: 5m}]\n",
            "models[0].cooldownPeriod: unknown field (allowed: name, memory, cooldown,",
            id="unknown-field",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "cooldown: 10 minutes}]\n",
            "models[0].cooldown: '10 minutes' is not a duration",
            id="bad-duration",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "startup_timeout: 0}]\n",
            "models[0].startup_timeout: 0 must be greater than 0",
            id="zero-startup-timeout",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: serve}]\n",
            "models[0].command: 'serve' has no {port} placeholder",
            id="no-port-placeholder",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi}]\n",
            "models[0].command: is required",
            id="missing-command",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\n"
            "models: [{name: a, memory: 1Gi, command: 'serve --port {port} --name {name} --x {Port}'}]\n",
            "models[0].command: unknown placeholder {Port}, {name} (known: {model}, {node}, {port})",
            id="unknown-placeholder",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\n"
            "models: [{name: a, memory: 1Gi, command: 'x {port}', health: 'http://127.0.0.1:{port}/{path}'}]\n",
            "models[0].health: unknown placeholder {path}",
            id="unknown-placeholder-in-health",
        ),
        pytest.param(
            'nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: "x \'{port}"}]\n',
            'models[0].command: "x \'{port}" cannot be split into arguments',
            id="unbalanced-quote",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "health: health}]\n",
            "models[0].health: 'health' is neither a path",
            id="bad-health",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "node_selector: {gpu: h100}}]\n",
            "models[0].node_selector: {'gpu': 'h100'} matches none of the nodes",
            id="selector-matches-nothing",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}'}, "
            "{name: a, memory: 2Gi, command: 'y {port}'}]\n",
            "models[1].name: 'a' is declared twice",
            id="duplicate-model",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "env: {A: null}}]\n",
            "models[0].env.A: expected a string, got nothing",
            id="env-null",
        ),
        pytest.param(
            "nodes: [{name: shadow}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}'}]\n",
            "nodes[0].memory: is required",
            id="node-without-memory",
        ),
        pytest.param(
            "nodes: []\nmodels: [{name: a, memory: 1Gi, command: 'x {port}'}]\n",
            "nodes: expected a non-empty list",
            id="no-nodes",
        ),
        pytest.param("nodes: [{name: shadow, memory: 1Gi}]\n", "models: expected a non-empty list", id="no-models"),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "evict_idle_after: soon}]\n",
            "models[0].evict_idle_after",
            id="bad-evict-idle-after",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "priority: high}]\n",
            "models[0].priority: expected an integer, got str 'high'",
            id="priority-string",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "pinned: sure}]\n",
            "models[0].pinned: expected true or false, got str 'sure'",
            id="pinned-string",
        ),
        pytest.param(
            "nodes: [{name: shadow, memory: 128Gi}]\nmodels: [{name: a, memory: 1Gi, command: 'x {port}', "
            "max_wait: -5s}]\n",
            "models[0].max_wait",
            id="negative-max-wait",
        ),
        pytest.param("", "examples/local.yaml: the file is empty", id="empty-file"),
        pytest.param("- a\n- b\n", "top level: expected a mapping, got list", id="list-at-top"),
        pytest.param("nodes: [\n", "examples/local.yaml: line 2, column 1: not valid YAML", id="broken-yaml"),
        pytest.param(
            "node: [{name: shadow, memory: 1Gi}]\n",
            "node: unknown field (allowed: nodes, models, ports, logs); did you mean 'nodes'",
            id="typo-at-top",
        ),
        pytest.param(MINI + "ports: 30000-29999\n", "ports: '30000-29999' must be FIRST-LAST", id="ports-reversed"),
        pytest.param(MINI + "ports: 80-90\n", "ports: '80-90' must be FIRST-LAST with 1024 <=", id="ports-privileged"),
        pytest.param(MINI + "ports: lots\n", "ports: expected a port range like 30000-30999", id="ports-word"),
        pytest.param(MINI + "ports: [1, 2]\n", "ports: expected a port range like 30000-30999, got list", id="list"),
        pytest.param(
            MINI + "  - {name: b, memory: 1Gi, command: 'x {port}'}\nports: 30000\n",
            "ports: 30000 has fewer ports than there are models (2)",
            id="ports-fewer-than-models",
        ),
        pytest.param(
            MINI + "  - {name: b, memory: 1Gi, command: 'x {port}', max_replicas: 3}\nports: 30000-30002\n",
            "ports: '30000-30002' has fewer ports than there are model processes at most (4)",
            id="ports-fewer-than-replicas",
        ),
        pytest.param(
            _mini("min_replicas: 2"),
            "models[0].min_replicas: 2 must not exceed max_replicas (1)",
            id="min-over-max",
        ),
        pytest.param(
            _mini("max_replicas: -1"),
            "models[0].max_replicas: -1 must be at least 0",
            id="negative-max",
        ),
        pytest.param(
            _mini("load: {kv: 0.9}"),
            "models[0].load.kv: unknown field (allowed: kv_cache_saturation",
            id="load-typo",
        ),
        pytest.param(
            _mini("load: {kv_cache_saturation: 2}"),
            "models[0].load.kv_cache_saturation: expected a number above 0 and at most 1, got int 2",
            id="load-kv-over-1",
        ),
        pytest.param(
            _mini("load: {concurrency: 0}"),
            "models[0].load.concurrency: 0 must be at least 1",
            id="load-concurrency-zero",
        ),
        pytest.param(
            _mini("load: {scale_up_stabilization: soon}"),
            "models[0].load.scale_up_stabilization",
            id="load-window-prose",
        ),
        pytest.param(MINI + "logs: ''\n", "logs: expected a directory path", id="logs-empty"),
    ],
)
def test_invalid_config_names_file_field_and_value(text, message):
    with pytest.raises(LocalConfigError) as info:
        parse_config_text(text, source=SRC)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{SRC}: ")


@pytest.mark.parametrize(
    ("extra", "ports", "logs"),
    [
        pytest.param("", None, None, id="defaults"),
        pytest.param("ports: 30000-30999\n", (30000, 30999), None, id="range"),
        pytest.param("ports: 31000\n", (31000, 31000), None, id="one-port"),
        pytest.param("logs: /var/log/ibc\n", None, "/var/log/ibc", id="absolute-logs"),
        pytest.param("logs: logs\n", None, "examples/logs", id="logs-relative-to-the-config-file"),
    ],
)
def test_ports_and_logs(extra, ports, logs):
    config = parse_config_text(MINI + extra, source=SRC)
    assert (config.ports, config.logs) == (ports, logs)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(LocalConfigError, match=r"nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
