"""The mutation check on budget/: mutmut against the unit tier, skipped (with one line) when nothing changed.

Why: the decisions in budget/ are the product; a fit check loosened by a byte must fail a test. This runs
mutmut 3 (config in pyproject's [tool.mutmut]), then fails if any mutant survives that is not listed, with
its reason, in .ci/mutation-equivalent.toml. A passing run is recorded under the cache dir keyed by a hash
of budget/*.py, the equivalents list and the mutmut config, so `make test` re-runs it only when one of
those changed. The run has a time cap; a run cut by the cap fails (it proved nothing) and records nothing.

    python .ci/mutation.py            # check (skip if recorded)
    python .ci/mutation.py --force    # check even if recorded
    python .ci/mutation.py --table    # print the equivalent mutants as a Markdown table (docs/testing.md)
    python .ci/mutation.py --glue     # mutate the request path's decision glue instead (a report, not cached)

Environment: IBC_MUTATION_CACHE (default ~/.cache/ibc/mutation), IBC_MUTATION_TIMEOUT_SECONDS (default 2400),
IBC_MUTATION_JOBS (default: number of cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENTS = REPO / ".ci" / "mutation-equivalent.toml"
# Survivors in budget/ code that landed after the check did, not killed yet: reported on every run (a count and
# the file), never failing it; a new survivor outside this list fails. Shrink it; never add to it by hand.
GAPS = REPO / ".ci" / "mutation-gaps.toml"
MUTMUT = Path(sys.executable).with_name("mutmut")
# The request path's decision glue: what turns a request into the one budget decision and back.
GLUE = ["webhook/admit.py", "proxy/app.py", "local/scaler.py", "extender/service.py"]
KILLED = {"killed", "timeout", "segfault", "caught by type check"}  # mutmut's names for a detected mutant


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "ibc" / "mutation"
    return Path(os.environ.get("IBC_MUTATION_CACHE") or default)


def fingerprint() -> str:
    """What a recorded result depends on: budget's code, the equivalents list, mutmut's config and version."""
    h = hashlib.sha256()
    for path in [*sorted((REPO / "budget").glob("*.py")), EQUIVALENTS, GAPS]:
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    h.update(json.dumps(config, sort_keys=True).encode())
    version = subprocess.run([str(MUTMUT), "--version"], capture_output=True, text=True, check=False).stdout
    h.update(version.encode())
    return h.hexdigest()[:16]


def load_equivalents() -> list[dict[str, str]]:
    entries = tomllib.loads(EQUIVALENTS.read_text())["equivalent"]
    for e in entries:
        missing = {"function", "before", "after", "reason"} - set(e)
        if missing:
            raise SystemExit(f"{EQUIVALENTS.name}: an entry lacks {sorted(missing)}: {e}")
    return entries


def diff_of(name: str, root: Path = REPO) -> tuple[str, str]:
    """The changed line of a mutant as (before, after), whitespace-trimmed; from `mutmut show`."""
    out = subprocess.run([str(MUTMUT), "show", name], capture_output=True, text=True, cwd=root, check=False).stdout
    before = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    after = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " ".join(before), " ".join(after)


def function_of(name: str) -> str:
    """budget.decide.x__blocking__mutmut_47 -> budget.decide._blocking (methods: Class.method)."""
    module, _, rest = name.partition(".x")
    while "." in rest and not rest.startswith("_") and not rest.startswith("ǁ"):
        part, _, rest = rest.partition(".x")
        module += "." + part
    func = re.sub(r"__mutmut_\d+$", "", rest)
    func = func[1:] if func.startswith("_") else func
    return f"{module}.{func.replace('ǁ', '.').strip('.')}"


def check_also_copy(root: Path) -> None:
    """Every package the unit tier imports must be copied into mutants/: mutmut takes the repo off sys.path."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    config = pyproject["tool"]["mutmut"]
    copied = {Path(p).parts[0] for p in config["source_paths"] + config["also_copy"]}
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = sorted(packages - copied)
    if missing:
        raise SystemExit(f"mutation: add {missing} to [tool.mutmut] also_copy in pyproject.toml (the unit tier "
                         "imports them and mutmut runs it from a copy of the tree)")


def run_mutmut(jobs: int, timeout: float, log: Path, root: Path = REPO) -> bool:
    """Run mutmut from a clean copy; False when the time cap cut it."""
    check_also_copy(root)
    shutil.rmtree(root / "mutants", ignore_errors=True)
    with log.open("w") as out:
        proc = subprocess.Popen([str(MUTMUT), "run", "--max-children", str(jobs)], cwd=root, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"mutation: mutmut failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return True


def results(root: Path = REPO) -> dict[str, str]:
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], capture_output=True, text=True, cwd=root,
                         check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            found[name] = status
    return found


def glue(jobs: int, timeout: float) -> int:
    """Mutate the decision glue (GLUE) in a copy of the tree, against the unit tier; a report, bounded by time."""
    import tempfile

    missing = [g for g in GLUE if not (REPO / g).exists()]
    if missing:
        raise SystemExit(f"mutation: glue files not found: {missing} (update GLUE in {Path(__file__).name})")
    with tempfile.TemporaryDirectory(prefix="ibc-mutation-glue-") as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", ".venv", "mutants", "*.egg-info",
                                                                    "__pycache__", ".*_cache", ".hypothesis"))
        pyproject = root / "pyproject.toml"
        text = pyproject.read_text()
        source = 'source_paths = ["budget/"]'
        if source not in text:
            raise SystemExit(f"mutation: expected `{source}` in pyproject.toml's [tool.mutmut]")
        also = ", ".join(f'"{p}"' for p in ["budget/", *sorted({g.split("/")[0] + "/" for g in GLUE})])
        text = text.replace(source, "source_paths = [" + ", ".join(f'"{g}"' for g in GLUE) + "]")
        text = text.replace("also_copy = [", f"also_copy = [{also}, ", 1)
        pyproject.write_text(text)
        log = cache_dir() / "last-glue-run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"mutation (glue): {', '.join(GLUE)} against the unit tier, {jobs} jobs, cap {timeout:.0f} s; log {log}",
              flush=True)
        started = time.monotonic()
        complete = run_mutmut(jobs, timeout, log, root)
        elapsed = time.monotonic() - started
        status = results(root)
        tried = {n: s for n, s in status.items() if s != "not checked"}
        killed = sum(1 for s in tried.values() if s in KILLED)
        per_file: dict[str, list[int]] = {}
        for name, st in tried.items():
            counts = per_file.setdefault(name.split(".x")[0], [0, 0])
            counts[0] += 1
            counts[1] += st in KILLED
        survivors = sorted(n for n, st in tried.items() if st not in KILLED)
        for name in survivors[:40]:  # `mutmut show` takes about a second each: the first few, then names only
            before, after = diff_of(name, root)
            print(f"  {name} ({status[name]}): {before!r} -> {after!r}")
        for name in survivors[40:]:
            print(f"  {name} ({status[name]})")
        for module, (made, k) in sorted(per_file.items()):
            print(f"  {module}: {k}/{made} killed")
        score = 100 * killed / max(1, len(tried))
        print(f"mutation (glue): {len(status)} mutants made, {len(tried)} tried, {killed} killed ({score:.1f}%), "
              f"{len(survivors)} not killed, in {elapsed:.0f} s" + ("" if complete else " (cut by the time cap)"))
        return 0 if complete and score >= 90 else 1


def table() -> None:
    print("| function | mutation | why no test can tell |")
    print("|---|---|---|")
    for e in load_equivalents():
        print(f"| `{e['function']}` | `{e['before']}` → `{e['after']}` | {e['reason']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="run even if this state of budget/ was recorded")
    parser.add_argument("--table", action="store_true", help="print the equivalent mutants as Markdown")
    parser.add_argument("--glue", action="store_true", help="mutate the request path's decision glue instead "
                        "(a report: exits 1 below 90%% killed or when cut by the time cap)")
    args = parser.parse_args()
    if args.table:
        table()
        return 0
    jobs = int(os.environ.get("IBC_MUTATION_JOBS") or os.cpu_count() or 2)
    timeout = float(os.environ.get("IBC_MUTATION_TIMEOUT_SECONDS") or 2400)
    if args.glue:
        return glue(jobs, timeout)
    if not MUTMUT.exists():
        print(f"mutation: {MUTMUT} not found: run `make setup` (mutmut is in the dev extra)", file=sys.stderr)
        return 1
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = fingerprint()
    record = cache / f"{key}.json"
    if record.exists() and not args.force:
        seen = json.loads(record.read_text())
        print(f"mutation: skipped: budget/ unchanged since the passing run recorded {seen['finished']} "
              f"({seen['killed']}/{seen['made']} killed, {seen['equivalent']} equivalent; key {key}, {record})")
        return 0
    equivalents = load_equivalents()
    log = cache / "last-run.log"
    print(f"mutation: budget/ changed (key {key}): mutmut over budget/ against the unit tier, {jobs} jobs, "
          f"cap {timeout:.0f} s; log {log}", flush=True)
    started = time.monotonic()
    if not run_mutmut(jobs, timeout, log):
        print(f"mutation: FAILED: the run hit its {timeout:.0f} s cap before every mutant was tried "
              "(raise IBC_MUTATION_TIMEOUT_SECONDS or speed up the tests that cover budget/)", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    status = results()
    made = len(status)
    killed = sum(1 for s in status.values() if s in KILLED)
    undetected = sorted(n for n, s in status.items() if s not in KILLED)
    known = {(e["function"], e["before"], e["after"]) for e in equivalents}
    gaps = {(g["function"], g["before"], g["after"]) for g in tomllib.loads(GAPS.read_text()).get("gap", [])}
    equivalent, surviving, gap = [], [], []
    for name in undetected:
        before, after = diff_of(name)
        entry = (function_of(name), before, after)
        (equivalent if entry in known else gap if entry in gaps else surviving).append((name, before, after))
    if gap:
        print(f"mutation: {len(gap)} known gaps: mutants of code that landed after the check, not killed yet "
              f"(listed in {GAPS.relative_to(REPO)}; kill them and delete their entries)")
    summary = (f"{made} mutants made, {killed} killed, {len(equivalent)} equivalent, {len(gap)} known gaps, "
               f"{len(surviving)} surviving "
               f"in {elapsed:.0f} s; score {100 * killed / max(1, made - len(equivalent)):.1f}% of the "
               f"non-equivalent")
    if surviving:
        print(f"mutation: FAILED: {summary}", file=sys.stderr)
        for name, before, after in surviving:
            print(f"  {name} ({status[name]}): {before!r} -> {after!r}", file=sys.stderr)
        print(f"  kill each with a test (mutmut show NAME; mutmut apply NAME), or, if no behaviour can tell it "
              f"apart, list it with the reason in {EQUIVALENTS.relative_to(REPO)}", file=sys.stderr)
        return 1
    matched = {(function_of(n), b, a) for n, b, a in equivalent}
    stale = [e for e in equivalents if (e["function"], e["before"], e["after"]) not in matched]
    for e in stale:
        print(f"mutation: note: listed equivalent no longer made or now killed: {e['function']}: {e['before']!r} "
              f"-> {e['after']!r}")
    record.write_text(json.dumps({"made": made, "killed": killed, "equivalent": len(equivalent),
                                  "seconds": round(elapsed), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}))
    print(f"mutation: passed: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
