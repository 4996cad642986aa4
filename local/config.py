"""The `ibc local` configuration: one machine's memory budgets and the models that may run on it.

Local mode has no cluster to read nodes and InferenceModels from, so a small YAML file declares
them: `nodes:` (the whole machine as one budget, or each GPU as its own) and `models:` with the
command that serves each one. Everything is validated here, once, at the edge: quantities become
bytes, durations seconds, commands argv templates. Every error names the file, the field and the
value, because a person fixing a typo needs exactly those three things.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from budget import BudgetError, Device, Model, Node, ObjectError, format_bytes, parse_duration, parse_quantity
from budget.objects import parse_devices
from budget.view import matches, share_bytes

NAMESPACE = "local"
"""Local models are keyed `local/<name>`; clients only ever see the name."""

DEFAULT_COOLDOWN_SECONDS = 600.0
"""10m, the InferenceModel CRD's cooldownPeriod default, so both modes idle out alike."""

DEFAULT_STARTUP_TIMEOUT_SECONDS = 600.0
"""Large models take minutes to load weights; the proxy's own hold timeout bounds clients anyway."""

DEFAULT_STOP_GRACE_SECONDS = 30.0
"""Kubernetes' terminationGracePeriodSeconds default: SIGTERM, then SIGKILL after this long."""

DEFAULT_HEALTH = "/health"
"""vLLM, llama-server and `ibc mock-backend` all answer 200 on /health once they can serve."""

_TOP_FIELDS = ("nodes", "models", "ports", "logs")
_NODE_FIELDS = ("name", "memory", "devices", "labels", "env")
_MODEL_FIELDS = (
    "name",
    "memory",
    "cooldown",
    "command",
    "health",
    "startup_timeout",
    "stop_grace_period",
    "node_selector",
    "env",
    "evict_idle_after",
    "priority",
    "pinned",
    "max_wait",
    "devices",
)

DEVICE_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
"""Set for each process on a node with `devices:` to the devices the decision chose (NVIDIA and AMD)."""


class LocalConfigError(ValueError):
    """The local configuration file is missing, unreadable or invalid; the message names file and field."""


@dataclass(frozen=True)
class LocalNode:
    """One memory budget: the machine (unified memory), or its GPUs (`devices`: bytes per device, indexed
    from 0 as CUDA_VISIBLE_DEVICES counts them); `env` is given to processes placed on it."""

    name: str
    memory_bytes: int
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    devices: tuple[int, ...] = ()  # () = one unified-memory device of memory_bytes

    def to_node(self) -> Node:
        """The budget's view of this node."""
        if self.devices:
            listed = tuple(Device(i, size) for i, size in enumerate(self.devices))
            return Node(name=self.name, labels=dict(self.labels), capacity_source="config", devices=listed)
        return Node(
            name=self.name, labels=dict(self.labels), capacity_bytes=self.memory_bytes, capacity_source="config"
        )

    def largest(self, devices: int) -> int:
        """The largest replica `devices` of its devices can hold together (0 when it has fewer)."""
        sizes = sorted(self.devices or (self.memory_bytes,), reverse=True)
        return sizes[devices - 1] * devices if len(sizes) >= devices else 0


@dataclass(frozen=True)
class LocalModel:
    """One model: its OpenAI name, declared memory, idle cooldown and how to run and probe it."""

    name: str
    memory_bytes: int
    command: tuple[str, ...]
    cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS
    health: str = DEFAULT_HEALTH
    startup_timeout_seconds: float = DEFAULT_STARTUP_TIMEOUT_SECONDS
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS
    node_selector: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    evict_idle_after_seconds: float | None = None  # None: only the cooldown stops it (the CRD's default too)
    priority: int = 0
    pinned: bool = False
    max_wait_seconds: float = 0.0  # 0: a request that does not fit gets the 429 at once, as before
    devices: int = 1  # each process is split over this many devices of one node (tensor parallelism)

    @property
    def key(self) -> str:
        return f"{NAMESPACE}/{self.name}"

    def argv(self, *, port: int, node: str) -> list[str]:
        """The command with `{port}`, `{model}` and `{node}` filled in (no shell is involved)."""
        return [_fill(arg, port=port, model=self.name, node=node) for arg in self.command]

    def health_url(self, *, port: int, node: str) -> str:
        """The readiness URL: a path on 127.0.0.1:{port}, or a full URL with placeholders filled in."""
        if self.health.startswith("/"):
            return f"http://127.0.0.1:{port}{self.health}"
        return _fill(self.health, port=port, model=self.name, node=node)

    def to_model(
        self, *, replicas: int = 0, last_request_time: float | None = None, startup_seconds: float = 0.0
    ) -> Model:
        """The budget's view of this model with the runtime's replica count, idle clock and start-up time."""
        return Model(
            namespace=NAMESPACE,
            name=self.name,
            memory_bytes=self.memory_bytes,
            model_name=self.name,
            node_selector=dict(self.node_selector),
            cooldown_seconds=self.cooldown_seconds,
            replicas=replicas,
            last_request_time=last_request_time,
            source="local",
            startup_seconds=startup_seconds,
            evict_idle_after_seconds=self.evict_idle_after_seconds,
            priority=self.priority,
            pinned=self.pinned,
            max_wait_seconds=self.max_wait_seconds,
            devices=self.devices,
        )


@dataclass(frozen=True)
class LocalConfig:
    """The whole file: budgets and models, plus where it came from (for messages)."""

    nodes: tuple[LocalNode, ...]
    models: tuple[LocalModel, ...]
    source: str = "<config>"
    ports: tuple[int, int] | None = None  # first and last port model processes may use; None: any free one
    logs: str | None = None  # directory of each model's own log file; None: `ibc local` picks a fresh one

    def model(self, ref: str) -> LocalModel | None:
        """Find a model by name or by `local/<name>` key."""
        for m in self.models:
            if ref in (m.name, m.key):
                return m
        return None

    def node(self, name: str) -> LocalNode | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None


def _fill(text: str, *, port: int, model: str, node: str) -> str:
    # Plain replacement, not str.format: arguments may legitimately contain JSON braces.
    return text.replace("{port}", str(port)).replace("{model}", model).replace("{node}", node)


class _Checker:
    """Turns raw YAML into config values; each error is prefixed with the file name."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> LocalConfigError:
        return LocalConfigError(f"{self.source}: {where}: {problem}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {_describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"keys must be strings, got {key!r}")
        return value

    def known_fields(self, value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(
                    f"{where}.{key}" if where else key,
                    f"unknown field (allowed: {', '.join(allowed)}){suggestion}",
                )

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty name, got {_describe(value)}")
        if "/" in value or value != value.strip():
            raise self.fail(where, f"{value!r} may not contain '/' or surrounding spaces")
        return value

    def memory(self, value: Any, where: str) -> int:
        if value is None:
            raise self.fail(where, "is required (a Kubernetes quantity such as 16Gi)")
        try:
            memory_bytes = parse_quantity(value, field=where)
        except BudgetError as exc:
            raise LocalConfigError(f"{self.source}: {exc}") from exc
        if memory_bytes <= 0:
            raise self.fail(where, f"{value!r} must be greater than 0")
        return memory_bytes

    def duration(self, value: Any, where: str, default: float, *, positive: bool = False) -> float:
        if value is None:
            return default
        try:
            seconds = parse_duration(value, field=where)
        except BudgetError as exc:
            raise LocalConfigError(f"{self.source}: {exc}") from exc
        if positive and seconds <= 0:
            raise self.fail(where, f"{value!r} must be greater than 0")
        return seconds

    def optional_duration(self, value: Any, where: str) -> float | None:
        return None if value is None else self.duration(value, where, 0.0)

    def node_devices(self, item: dict[str, Any], where: str) -> tuple[int, tuple[int, ...]]:
        """A node's `memory:` (one unified device) or `devices:` (the annotation's grammar): (bytes, devices)."""
        raw = item.get("devices")
        if raw is None:
            return self.memory(item.get("memory"), f"{where}.memory"), ()
        if item.get("memory") is not None:
            raise self.fail(where, "give memory (one unified-memory budget) or devices (per GPU), not both")
        try:
            sizes = tuple(parse_devices(raw, field=f"{where}.devices"))
        except ObjectError as exc:
            raise LocalConfigError(f"{self.source}: {exc}") from exc
        env = item.get("env")
        clash = sorted(k for k in DEVICE_ENV if isinstance(env, dict) and k in env)
        if clash:
            raise self.fail(f"{where}.env", f"{', '.join(clash)} is set by ibc to the devices each process gets")
        return sum(sizes), sizes

    def integer(self, value: Any, where: str, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"expected an integer, got {_describe(value)}")
        return value

    def flag(self, value: Any, where: str) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_describe(value)}")
        return value

    def string_map(self, value: Any, where: str) -> dict[str, str]:
        if value is None:
            return {}
        raw = self.mapping(value, where)
        out: dict[str, str] = {}
        for key, item in raw.items():
            if isinstance(item, bool) or item is None or not isinstance(item, str | int | float):
                raise self.fail(f"{where}.{key}", f"expected a string, got {_describe(item)} (quote it)")
            out[key] = str(item)
        return out

    def command(self, value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            raise self.fail(where, "is required: a list or string with a {port} placeholder")
        if isinstance(value, str):
            try:
                argv = shlex.split(value)
            except ValueError as exc:
                raise self.fail(where, f"{value!r} cannot be split into arguments: {exc}") from exc
        elif isinstance(value, list):
            argv = []
            for i, arg in enumerate(value):
                if isinstance(arg, bool) or not isinstance(arg, str | int | float):
                    raise self.fail(f"{where}[{i}]", f"expected a string, got {_describe(arg)}")
                argv.append(str(arg))
        else:
            raise self.fail(where, f"expected a list or a string, got {_describe(value)}")
        if not argv or not argv[0]:
            raise self.fail(where, "is empty")
        if not any("{port}" in arg for arg in argv):
            raise self.fail(
                where,
                f"{value!r} has no {{port}} placeholder: the runtime picks a free port for each process "
                "(e.g. `--port {port}`)",
            )
        self.known_placeholders(" ".join(argv), where)
        return tuple(argv)

    def known_placeholders(self, text: str, where: str) -> None:
        """A `{word}` the runtime does not fill would reach the process as it is: a typo, said now."""
        unknown = sorted(set(_PLACEHOLDER.findall(text)) - PLACEHOLDERS)
        if unknown:
            names = ", ".join(f"{{{u}}}" for u in unknown)
            known = ", ".join(f"{{{k}}}" for k in sorted(PLACEHOLDERS))
            raise self.fail(where, f"unknown placeholder {names} (known: {known})")

    def health(self, value: Any, where: str) -> str:
        if value is None:
            return DEFAULT_HEALTH
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a URL path or URL, got {_describe(value)}")
        if value.startswith("/"):
            return value
        if value.startswith(("http://", "https://")):
            if "{port}" not in value:
                raise self.fail(where, f"{value!r} has no {{port}} placeholder")
            self.known_placeholders(value, where)
            return value
        raise self.fail(where, f"{value!r} is neither a path (/health) nor a URL (http://127.0.0.1:{{port}}/health)")

    def ports(self, value: Any, where: str) -> tuple[int, int] | None:
        if value is None:
            return None
        text = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""
        first, sep, last = text.partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise self.fail(where, f"expected a port range like 30000-30999, got {_describe(value)}") from None
        if not 1024 <= low <= high <= 65535:
            raise self.fail(where, f"{value!r} must be FIRST-LAST with 1024 <= FIRST <= LAST <= 65535")
        return low, high

    def directory(self, value: Any, where: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a directory path, got {_describe(value)}")
        path = Path(value).expanduser()
        if not path.is_absolute() and self.source != "<config>":
            path = Path(self.source).parent / path  # relative to the config file, not the working directory
        return str(path)


PLACEHOLDERS = frozenset({"port", "model", "node"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict | list):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def parse_config(data: Any, *, source: str = "<config>") -> LocalConfig:
    """Validate a parsed YAML document into a LocalConfig; raises LocalConfigError naming the field."""
    c = _Checker(source)
    if data is None:
        raise LocalConfigError(f"{source}: the file is empty; it needs `nodes:` and `models:`")
    top = c.mapping(data, "top level")
    c.known_fields(top, _TOP_FIELDS, "")

    raw_nodes = top.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise c.fail("nodes", f"expected a non-empty list of {{name, memory}}, got {_describe(raw_nodes)}")
    nodes: list[LocalNode] = []
    for i, raw in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        item = c.mapping(raw, where)
        c.known_fields(item, _NODE_FIELDS, where)
        name = c.name(item.get("name"), f"{where}.name")
        if any(n.name == name for n in nodes):
            raise c.fail(f"{where}.name", f"{name!r} is declared twice")
        memory_bytes, devices = c.node_devices(item, where)
        nodes.append(
            LocalNode(
                name=name,
                memory_bytes=memory_bytes,
                labels=c.string_map(item.get("labels"), f"{where}.labels"),
                env=c.string_map(item.get("env"), f"{where}.env"),
                devices=devices,
            )
        )

    raw_models = top.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise c.fail("models", f"expected a non-empty list of models, got {_describe(raw_models)}")
    models: list[LocalModel] = []
    for i, raw in enumerate(raw_models):
        where = f"models[{i}]"
        item = c.mapping(raw, where)
        c.known_fields(item, _MODEL_FIELDS, where)
        name = c.name(item.get("name"), f"{where}.name")
        if any(m.name == name for m in models):
            raise c.fail(f"{where}.name", f"{name!r} is declared twice")
        memory_bytes = c.memory(item.get("memory"), f"{where}.memory")
        selector = c.string_map(item.get("node_selector"), f"{where}.node_selector")
        pool = [n for n in nodes if matches(selector, n.labels)]
        if not pool:
            raise c.fail(
                f"{where}.node_selector", f"{selector!r} matches none of the nodes, so {name} could never start"
            )
        devices = c.integer(item.get("devices"), f"{where}.devices", 1)
        if devices < 1:
            raise c.fail(f"{where}.devices", f"{devices!r} must be at least 1")
        largest = max(n.largest(devices) for n in pool)
        if largest == 0:
            raise c.fail(
                f"{where}.devices", f"{devices} devices: no matching node has that many, so {name} could never start"
            )
        if share_bytes(memory_bytes, devices) * devices > largest:
            what = f"{devices} devices of one node have"
            if devices == 1:
                what = "GPU has" if any(n.devices for n in pool) else "node has"
            raise c.fail(
                f"{where}.memory",
                f"{item.get('memory')!r} is more than the largest matching {what} ({format_bytes(largest)}), "
                f"so {name} could never start",
            )
        models.append(
            LocalModel(
                name=name,
                memory_bytes=memory_bytes,
                command=c.command(item.get("command"), f"{where}.command"),
                cooldown_seconds=c.duration(item.get("cooldown"), f"{where}.cooldown", DEFAULT_COOLDOWN_SECONDS),
                health=c.health(item.get("health"), f"{where}.health"),
                startup_timeout_seconds=c.duration(
                    item.get("startup_timeout"),
                    f"{where}.startup_timeout",
                    DEFAULT_STARTUP_TIMEOUT_SECONDS,
                    positive=True,
                ),
                stop_grace_seconds=c.duration(
                    item.get("stop_grace_period"), f"{where}.stop_grace_period", DEFAULT_STOP_GRACE_SECONDS
                ),
                node_selector=selector,
                env=c.string_map(item.get("env"), f"{where}.env"),
                evict_idle_after_seconds=c.optional_duration(item.get("evict_idle_after"), f"{where}.evict_idle_after"),
                priority=c.integer(item.get("priority"), f"{where}.priority", 0),
                pinned=c.flag(item.get("pinned"), f"{where}.pinned"),
                max_wait_seconds=c.duration(item.get("max_wait"), f"{where}.max_wait", 0.0),
                devices=devices,
            )
        )
    ports = c.ports(top.get("ports"), "ports")
    if ports is not None and ports[1] - ports[0] + 1 < len(models):
        raise c.fail("ports", f"{top.get('ports')!r} has fewer ports than there are models ({len(models)})")
    return LocalConfig(
        nodes=tuple(nodes),
        models=tuple(models),
        source=source,
        ports=ports,
        logs=c.directory(top.get("logs"), "logs"),
    )


def parse_config_text(text: str, *, source: str = "<config>") -> LocalConfig:
    """Parse YAML text (safe loader only) and validate it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise LocalConfigError(f"{source}: {where}: not valid YAML: {problem}") from exc
    return parse_config(data, source=source)


def load_config(path: str | Path) -> LocalConfig:
    """Read and validate a local configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LocalConfigError(f"{p}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalConfigError(f"{p}: cannot read: {exc}") from exc
    return parse_config_text(text, source=str(p))
