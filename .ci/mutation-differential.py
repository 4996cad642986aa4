"""Weigh the known gaps: does any random cluster tell a gap's mutant apart from the code?

For each entry of .ci/mutation-gaps.toml (or of the equivalents, with --equivalents) whose `before` line
occurs once in its module, a copy of budget/ gets the mutation, and decide_scale answers the same random
clusters (1 to 4 nodes in two pools, up to 7 models with or without a selector, running, starting and
stopping pods, admitted replicas not placed yet, cooldowns of 0, 60 and 600 s) under the code and under
the mutant. Prints how many answers (reason, Retry-After, blocking list, message) differ. Evidence, not
proof: 0 differences says no cluster of this shape tells them apart.

    python .ci/mutation-differential.py [--clusters 8000] [--seed 7] [--equivalents]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOW = 1_000_000.0


def emit(seed: int, count: int) -> None:
    """Print decide_scale's answer for `count` random clusters (budget/ from PYTHONPATH)."""
    from budget import ClusterView, Model, Node, Placement, decide_scale

    gi = 2**30
    rng = random.Random(seed)
    for k in range(count):
        nodes = [Node(f"n{i}", {"pool": rng.choice("ab")}, rng.randint(16, 160) * gi) for i in range(rng.randint(1, 4))]
        models, placements = [], []
        for i in range(rng.randint(1, 7)):
            memory = rng.randint(1, 120) * gi
            selector = rng.choice([{}, {"pool": "a"}, {"pool": "b"}])
            held = 0
            for n in nodes:
                if selector.get("pool", n.labels["pool"]) != n.labels["pool"] or rng.random() < 0.4:
                    continue
                for _ in range(rng.randint(1, 2)):
                    used = sum(p.memory_bytes for p in placements if p.node == n.name)
                    if used + memory > (n.capacity_bytes or 0):
                        break
                    state = rng.choice(["running", "running", "starting", "stopping"])
                    free_by = NOW + rng.choice([0, 0.5, 4, 10, 30]) if state == "stopping" else None
                    placements.append(Placement(f"d/m{i}-{held}", n.name, memory, f"d/m{i}", uid=f"m{i}-{held}",
                                                started_at=NOW - rng.choice([5, 20, 3600]), state=state,
                                                free_by=free_by))
                    held += 1
            idle = rng.choice([0, 100, 300, 590, 700, rng.randint(0, 700)])
            models.append(Model("d", f"m{i}", memory, f"m{i}", selector, rng.choice([0.0, 60.0, 600.0]),
                                held + rng.choice([0, 0, 1]), NOW - idle, startup_seconds=rng.choice([0.0, 20.0])))
        view = ClusterView.build(nodes=nodes, models=models, placements=placements)
        key = rng.choice(list(view.models))
        replicas = view.models[key].replicas + rng.randint(1, 3)
        try:
            d = decide_scale(view, key, replicas, NOW)
            blocking = [(b.model, b.memory_bytes, b.state, b.free_in_seconds) for b in d.blocking]
            print(k, d.reason, d.retry_after_seconds, d.retry_blocking, blocking, d.message)
        except Exception as exc:  # a mutant that crashes is told apart too
            print(k, "raised", type(exc).__name__)


def answers(tree: Path, seed: int, count: int) -> list[str]:
    out = subprocess.run([sys.executable, __file__, "--emit", "--seed", str(seed), "--clusters", str(count)],
                         capture_output=True, text=True, env={"PYTHONPATH": str(tree)}, check=True).stdout
    return out.splitlines()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--equivalents", action="store_true", help="weigh the equivalents list instead")
    parser.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emit:
        emit(args.seed, args.clusters)
        return 0
    name, kind = ("mutation-equivalent.toml", "equivalent") if args.equivalents else ("mutation-gaps.toml", "gap")
    entries = tomllib.loads((REPO / ".ci" / name).read_text()).get(kind, [])
    with tempfile.TemporaryDirectory(prefix="ibc-differential-") as tmp:
        tree = Path(tmp)
        shutil.copytree(REPO / "budget", tree / "budget")
        code = answers(tree, args.seed, args.clusters)
        for e in entries:
            module = tree / (e["function"].split(".")[1] + ".py")
            path = tree / "budget" / module.name
            text = (REPO / "budget" / module.name).read_text()
            if text.count(e["before"]) != 1:
                print(f"skipped (the line is not once in {module.name}): {e['function']}: {e['before']!r}")
                continue
            path.write_text(text.replace(e["before"], e["after"]))
            differ = sum(a != b for a, b in zip(code, answers(tree, args.seed, args.clusters), strict=True))
            path.write_text(text)
            print(f"{differ:5d} of {args.clusters} differ: {e['function']}: {e['before']!r} -> {e['after']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
