"""The mutation check on budget/: mutmut against the unit tier, skipped (with one line) when nothing changed.

Why: the decisions in budget/ are the product; a fit check loosened by a byte must fail a test. This runs
mutmut 3 (config in pyproject's [tool.mutmut]), then fails if any mutant survives that is not listed, with
its reason, in .ci/mutation-equivalent.toml. A passing run is recorded under the cache dir keyed by a hash
of budget/*.py, the equivalents list and the mutmut config, so `make test` re-runs it only when one of
those changed. The run has a time cap; a run cut by the cap fails, naming how many mutants (per function) it
did not run, and records nothing: a check that stopped early proved nothing about the rest.

    python .ci/mutation.py            # check (skip if recorded)
    python .ci/mutation.py --force    # check even if recorded
    python .ci/mutation.py --table    # print the equivalent mutants as a Markdown table (docs/testing.md)
    python .ci/mutation.py --report   # sort the last run's survivors (mutants/) against edited lists, no run
    python .ci/mutation.py --glue     # mutate the request path's decision glue instead (a report, not cached)
    python .ci/mutation.py --glue webhook/admit.py --keep /tmp/g   # one glue file; keep the tree and survivors

Environment: IBC_MUTATION_CACHE (default .mutation_cache/ in the checkout, git-ignored),
IBC_MUTATION_TIMEOUT_SECONDS (default 3600), IBC_MUTATION_JOBS (default: number of cores).
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
    # In the checkout's ignored dir (as mutants/ is): a fresh clone, CI's, always runs the check cold; a
    # developer's checkout skips what it has already checked.
    default = REPO / ".mutation_cache"
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


# The decision in each glue file: the functions that turn a request into the one budget decision and back. The
# score the target (>= 90%) is judged on counts mutants of these; the whole file's score is reported beside it
# (the rest is the forwarder, auth, process supervision and logging, which other tiers drive). None: all of it.
GLUE_DECISION: dict[str, set[str] | None] = {
    "webhook/admit.py": None,
    "extender/service.py": None,
    "local/scaler.py": {"LocalScaler.scale_up", "LocalScaler.can_make_room", "LocalScaler.note",
                        "LocalScaler.wait_backends", "LocalScaler.state", "LocalScaler.balance",
                        "LocalScaler.load_status", "LocalScaler._balance_one", "LocalScaler._signals",
                        "LocalScaler._step_up", "LocalScaler._step_down", "LocalScaler._view_locked",
                        "LocalScaler._busy_locked", "LocalScaler._evict_locked", "LocalScaler._freeing_helps_locked",
                        "LocalScaler._unavailable_locked", "LocalScaler.stop_idle", "_free_by", "_without_name"},
    "proxy/app.py": {"ProxyApp._cold", "ProxyApp._decide", "ProxyApp._may_make_room", "ProxyApp._waiting",
                     "ProxyApp._wait", "ProxyApp._wait_then_stream", "ProxyApp._queue", "ProxyApp._queue_full",
                     "ProxyApp._expected_start", "ProxyApp._has_room", "ProxyApp._start_failed"},
}


def _glue_function(name: str) -> tuple[str, str]:
    """webhook.admit.xǁClassifierǁ_model_scale__mutmut_3 -> ("webhook/admit.py", "Classifier._model_scale")."""
    qualified = function_of(name)
    module = name.split(".x")[0]
    return module.replace(".", "/") + ".py", qualified[len(module) + 1:]


def glue(jobs: int, timeout: float, files: list[str], keep: Path | None) -> int:
    """Mutate the decision glue (GLUE, or the files named) in a copy of the tree, against the unit tier; a report."""
    import tempfile

    files = files or GLUE
    unknown = [f for f in files if f not in GLUE_DECISION]
    if unknown:
        raise SystemExit(f"mutation: not glue files: {unknown} (the glue is {', '.join(GLUE)})")
    missing = [g for g in files if not (REPO / g).exists()]
    if missing:
        raise SystemExit(f"mutation: glue files not found: {missing} (update GLUE in {Path(__file__).name})")
    with tempfile.TemporaryDirectory(prefix="ibc-mutation-glue-") as tmp:
        root = keep.resolve() if keep else Path(tmp) / "tree"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", ".venv", "mutants", "*.egg-info",
                                                                    "__pycache__", ".*_cache", ".hypothesis"))
        pyproject = root / "pyproject.toml"
        text = pyproject.read_text()
        source = 'source_paths = ["budget/"]'
        if source not in text:
            raise SystemExit(f"mutation: expected `{source}` in pyproject.toml's [tool.mutmut]")
        also = ", ".join(f'"{p}"' for p in ["budget/", *sorted({g.split("/")[0] + "/" for g in GLUE})])
        text = text.replace(source, "source_paths = [" + ", ".join(f'"{g}"' for g in files) + "]")
        text = text.replace("also_copy = [", f"also_copy = [{also}, ", 1)
        pyproject.write_text(text)
        # With --keep the log stays with its tree, so runs on different files at once do not share one log.
        log = root / "glue-run.log" if keep else cache_dir() / "last-glue-run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"mutation (glue): {', '.join(files)} against the unit tier, {jobs} jobs, cap {timeout:.0f} s; log {log}"
              + (f"; tree kept in {root}" if keep else ""), flush=True)
        started = time.monotonic()
        complete = run_mutmut(jobs, timeout, log, root)
        elapsed = time.monotonic() - started
        status = results(root)
        tried = {n: s for n, s in status.items() if s != "not checked"}
        # per file: [tried, killed, decision tried, decision killed]
        per_file: dict[str, list[int]] = {}
        per_function: dict[tuple[str, str], list[int]] = {}
        for name, st in tried.items():
            path, func = _glue_function(name)
            decision = GLUE_DECISION[path] is None or func in (GLUE_DECISION[path] or ())
            counts = per_file.setdefault(path, [0, 0, 0, 0])
            dead = st in KILLED
            counts[0] += 1
            counts[1] += dead
            counts[2] += decision
            counts[3] += decision and dead
            f_counts = per_function.setdefault((path, func), [0, 0])
            f_counts[0] += 1
            f_counts[1] += dead
        survivors = sorted(n for n, st in tried.items() if st not in KILLED)
        if keep:
            with (root / "survivors.txt").open("w") as out:
                for name in survivors:
                    before, after = diff_of(name, root)
                    path, func = _glue_function(name)
                    out.write(f"{name} ({status[name]}) in {path} {func}\n  - {before}\n  + {after}\n")
            print(f"mutation (glue): every survivor's diff in {root / 'survivors.txt'}; one by one: "
                  f"cd {root} && {MUTMUT} show NAME")
        else:
            for name in survivors[:40]:  # `mutmut show` takes about a second each: the first few, then names only
                before, after = diff_of(name, root)
                print(f"  {name} ({status[name]}): {before!r} -> {after!r}")
            for name in survivors[40:]:
                print(f"  {name} ({status[name]})")
        for (path, func), (made, k) in sorted(per_function.items()):
            if k < made:
                print(f"  {path} {func}: {k}/{made} killed")
        print("  | file | tried | killed | % | decision functions: tried | killed | % |")
        all_counts = [0, 0, 0, 0]
        for path, c in sorted(per_file.items()):
            all_counts = [a + b for a, b in zip(all_counts, c, strict=True)]
            print(f"  | {path} | {c[0]} | {c[1]} | {100 * c[1] / max(1, c[0]):.1f} | {c[2]} | {c[3]} | "
                  f"{100 * c[3] / max(1, c[2]):.1f} |")
        score = 100 * all_counts[3] / max(1, all_counts[2])
        print(f"mutation (glue): {len(status)} mutants made, {len(tried)} tried, {all_counts[1]} killed "
              f"({100 * all_counts[1] / max(1, len(tried)):.1f}% of the files), decision functions "
              f"{all_counts[3]}/{all_counts[2]} killed ({score:.1f}%), {len(survivors)} not killed, in {elapsed:.0f} s"
              + ("" if complete else " (cut by the time cap)"))
        return 0 if complete and score >= 90 else 1


SHOWN = 20  # survivors shown with their whole diff (`mutmut show` takes about a second each); the rest by name


def report_survivors(surviving: list[tuple[str, str, str]], status: dict[str, str]) -> None:
    """Each new survivor's diff, how to look at it and the two ways out: a test, or an equivalent entry."""
    out = sys.stderr
    print(f"mutation: {len(surviving)} mutant(s) of budget/ no unit test fails on, and not listed "
          f"(a decision can change and every test still passes):", file=out)
    for i, (name, before, after) in enumerate(surviving):
        print(f"\n  {name} ({status[name]}) in {function_of(name)}", file=out)
        if i < SHOWN:
            diff = subprocess.run([str(MUTMUT), "show", name], capture_output=True, text=True, cwd=REPO,
                                  check=False).stdout
            print("\n".join("    " + ln for ln in diff.splitlines() if ln.startswith(("@@", "-", "+"))), file=out)
        else:
            print(f"    {before!r} -> {after!r}", file=out)
    print(f"""
  To work on one: .venv/bin/mutmut show NAME (its diff); .venv/bin/mutmut apply NAME (writes it into budget/:
  run the unit tests, then `git checkout budget/`); .venv/bin/mutmut results (every mutant's state; the run is
  in mutants/). Kill it with a unit test a user would recognise (an edge in a table with ids), or, only if no
  behaviour can tell it apart, list it in {EQUIVALENTS.relative_to(REPO)} with the reason, e.g.:

[[equivalent]]
function = "{function_of(surviving[0][0])}"
before = {json.dumps(surviving[0][1], ensure_ascii=False)}
after = {json.dumps(surviving[0][2], ensure_ascii=False)}
reason = "why no behaviour can tell the two apart"
""", file=out)


def capped(status: dict[str, str], timeout: float, elapsed: float) -> int:
    """A run cut by the cap: say loudly what was not run and what survived so far; it fails."""
    untried = [n for n, s in status.items() if s == "not checked"]
    tried = len(status) - len(untried)
    out = sys.stderr
    print(f"mutation: FAILED: the {timeout:.0f} s time cap was reached after {elapsed:.0f} s: {tried} of "
          f"{len(status)} mutants tried, {len(untried)} NOT RUN. Nothing is proved about those, so the check "
          "fails (and records nothing).", file=out)
    by_function: dict[str, int] = {}
    for name in untried:
        by_function[function_of(name)] = by_function.get(function_of(name), 0) + 1
    for function, count in sorted(by_function.items(), key=lambda kv: (-kv[1], kv[0]))[:30]:
        print(f"  not run: {count:5d} in {function}", file=out)
    if len(by_function) > 30:
        print(f"  not run: ... and {len(by_function) - 30} more functions", file=out)
    so_far = sorted(n for n, s in status.items() if s not in KILLED and s != "not checked")
    if so_far:
        print(f"  not killed among those tried: {len(so_far)} (listed or not; a full run sorts them)", file=out)
    print("  Raise the cap (IBC_MUTATION_TIMEOUT_SECONDS, or MUTATION_CAP for make), run on a quieter machine, "
          "or speed up the unit tests that cover budget/ (docs/testing.md).", file=out)
    return 1


def table() -> None:
    print("| function | mutation | why no test can tell |")
    print("|---|---|---|")
    for e in load_equivalents():
        print(f"| `{e['function']}` | `{e['before']}` → `{e['after']}` | {e['reason']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="run even if this state of budget/ was recorded")
    parser.add_argument("--table", action="store_true", help="print the equivalent mutants as Markdown")
    parser.add_argument("--report", action="store_true", help="sort the last run's survivors (in mutants/) against "
                        "the lists again, without running mutmut (after editing the equivalents or gaps)")
    parser.add_argument("--glue", nargs="*", metavar="FILE", help="mutate the request path's decision glue instead, "
                        "all of it or the files named (a report: exits 1 below 90%% of the decision functions' "
                        "mutants killed, or when cut by the time cap)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="with --glue: run in DIR and keep it (mutants/, "
                        "survivors.txt with every survivor's diff), to look at the survivors afterwards")
    args = parser.parse_args()
    if args.table:
        table()
        return 0
    if args.report:
        if not (REPO / "mutants").is_dir():
            print("mutation: no mutants/ here: run `make mutation` first", file=sys.stderr)
            return 1
        status = results()
        untried = sum(1 for s in status.values() if s == "not checked")
        if untried:
            print(f"mutation: the last run did not try {untried} of {len(status)} mutants (cut short)", file=sys.stderr)
        tried = {n: s for n, s in status.items() if s != "not checked"}
        return classify(tried, load_equivalents(), 0.0, None) or (1 if untried else 0)
    jobs = int(os.environ.get("IBC_MUTATION_JOBS") or os.cpu_count() or 2)
    timeout = float(os.environ.get("IBC_MUTATION_TIMEOUT_SECONDS") or 3600)
    if args.glue is not None:
        return glue(jobs, timeout, args.glue, args.keep)
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
    complete = run_mutmut(jobs, timeout, log)
    elapsed = time.monotonic() - started
    status = results()
    if not complete:
        return capped(status, timeout, elapsed)
    return classify(status, equivalents, elapsed, record)


def classify(status: dict[str, str], equivalents: list[dict[str, str]], elapsed: float, record: Path | None) -> int:
    """Sort the undetected mutants into listed equivalents, known gaps and new survivors; fail on a new one."""
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
        report_survivors(surviving, status)
        return 1
    matched = {(function_of(n), b, a) for n, b, a in equivalent}
    stale = [e for e in equivalents if (e["function"], e["before"], e["after"]) not in matched]
    for e in stale:
        print(f"mutation: note: listed equivalent no longer made or now killed: {e['function']}: {e['before']!r} "
              f"-> {e['after']!r}")
    found = {(function_of(n), b, a) for n, b, a in gap}
    for g in sorted(gaps - found):
        print(f"mutation: note: listed gap no longer made or now killed (delete it from {GAPS.name}): {g[0]}: "
              f"{g[1]!r} -> {g[2]!r}")
    if record is None:
        print(f"mutation: report of the last run in mutants/ (nothing recorded): {summary}")
        return 0
    record.write_text(json.dumps({"made": made, "killed": killed, "equivalent": len(equivalent),
                                  "seconds": round(elapsed), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())}))
    print(f"mutation: passed: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
