"""The Dockerfile, checked without a container engine: parsed into instructions and held to the rules that
decide whether the image starts and runs safely (in seconds, on any machine; the `pods` profile,
tests/pods, builds the image with buildah and runs it, but needs root and minutes; these rules also catch
what a build would not: root, a missing package).
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its flags (--from=...) and the rest."""

    keyword: str
    flags: dict[str, str]
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are skipped by the builder too
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        buf = []
        keyword, _, rest = joined.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        out.append(Instruction(keyword.upper(), flags, rest, start))
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each group starts with its FROM)."""
    groups: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(ins)
    return groups


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """Global ARG defaults (those before the first FROM)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def resolve_image(ref: str, args: dict[str, str]) -> str:
    """`${NAME}` / `$NAME` in a FROM replaced by the ARG defaults."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)


def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (a context-relative path) or a parent directory of it."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        if negate:
            continue  # none are used; a negation would need ordered evaluation
        bare = pattern[3:] if pattern.startswith("**/") else pattern
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or fnmatch.fnmatch(Path(candidate).name, bare):
                return True
    return False


def pyproject_packages() -> list[str]:
    """Top-level packages `pip install .` must find: pyproject's include patterns that exist as packages."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = data["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pattern.rstrip("*").rstrip(".") for pattern in include}
    return sorted(t for t in tops if (REPO / t / "__init__.py").is_file())


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
STAGES = stages(INSTRUCTIONS)
FINAL = STAGES[-1]


def test_every_stage_builds_on_python_311_slim():
    args = build_args(INSTRUCTIONS)
    images = [resolve_image(stage[0].args.split()[0], args) for stage in STAGES]
    assert images and all(image == "python:3.11-slim" for image in images), images


def test_final_stage_runs_as_a_numeric_non_root_user():
    users = [ins.args for ins in FINAL if ins.keyword == "USER"]
    assert users, "the final stage has no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]


def test_uid_matches_the_manifests_security_context():
    uid = next(ins.args for ins in reversed(FINAL) if ins.keyword == "USER").partition(":")[0]
    values = (REPO / "deploy" / "helm" / "ibc" / "values.yaml").read_text()
    assert f"runAsUser: {uid}" in values


def test_entrypoint_is_ibc_in_exec_form():
    entry = [ins for ins in FINAL if ins.keyword == "ENTRYPOINT"]
    assert entry, "no ENTRYPOINT"
    # Exec form: signals reach ibc (PID 1) directly, so a rollout drains held requests gracefully.
    assert json.loads(entry[-1].args) == ["ibc"]


def test_package_is_installed_with_pip_install_dot():
    runs = " ".join(ins.args for stage in STAGES for ins in stage if ins.keyword == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), runs


def copied_sources() -> list[str]:
    sources: list[str] = []
    for stage in STAGES:
        for ins in stage:
            if ins.keyword == "COPY" and "from" not in ins.flags:
                sources.extend(s.rstrip("/") for s in ins.args.split()[:-1])
    return sources


def test_every_package_of_the_distribution_is_copied_before_pip_install():
    # A package missing from the build context installs "fine" and fails with ImportError in the cluster.
    missing = sorted(set(pyproject_packages()) - set(copied_sources()))
    assert not missing, f"pyproject packages not copied into the image: {missing}"


@pytest.mark.parametrize("source", copied_sources())
def test_copy_source_exists_and_is_not_dockerignored(source):
    assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    assert not ignored(source, ignore_patterns()), f"COPY {source}: excluded by .dockerignore"


@pytest.mark.parametrize("path", [".git", ".venv", "tests", "deploy/helm/ibc/values.yaml", "x/__pycache__/m.pyc"])
def test_dockerignore_keeps_heavy_or_irrelevant_paths_out_of_the_context(path):
    assert ignored(path, ignore_patterns())


def test_final_stage_ships_no_sources_or_build_tree():
    copies = [ins for ins in FINAL if ins.keyword == "COPY"]
    assert copies and all(ins.flags.get("from") for ins in copies), "final stage copies from the context"


def test_no_remote_add_and_no_latest_tag():
    for ins in INSTRUCTIONS:
        assert ins.keyword != "ADD", f"line {ins.line}: use COPY (ADD fetches URLs and unpacks archives)"
        if ins.keyword == "FROM":
            assert not ins.args.split()[0].endswith(":latest"), f"line {ins.line}: pin the base image"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM a\nRUN x \\\n  && y\n", [("FROM", "a"), ("RUN", "x && y")]),
        ("# c\nFROM a AS b\nCOPY --from=b /x /y\n", [("FROM", "a AS b"), ("COPY", "/x /y")]),
        ("FROM a\nRUN x \\\n# inside\n  y\n", [("FROM", "a"), ("RUN", "x y")]),
    ],
    ids=["continuation", "flags", "comment-in-continuation"],
)
def test_parser(text, expected):
    assert [(i.keyword, i.args) for i in parse_dockerfile(text)] == expected
