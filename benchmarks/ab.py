"""Before/after a change, side by side: the real server from two git revisions, in turns.

    PYTHONPATH=. python benchmarks/ab.py BEFORE AFTER [--rules DIR] [--members 10000] [--rounds 3] [--rate R]

Each revision's tree is exported with `git archive` into benchmarks/data/ab-REV and run
with that tree first on PYTHONPATH; each gets its own copy of the same generated member
database, and the runs alternate (before, after, before, ...) so drift on a shared
machine hits both alike. Prints confirmed receipts/s and server CPU per request per run;
with --rate, wrk sends on that fixed schedule instead of at full load and the latency
percentiles are what to compare.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import gen_members, gen_rules, receipts  # noqa: E402
from benchmarks.run import DATA, ROOT, VENV_BIN, Server, drop_database, log, measured, server_config, wrk  # noqa: E402


def export(rev: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = DATA / f"ab-{sha}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rules", type=Path, default=None, help="program folder (default: generated 300 rules)")
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0, help="requests/s on a fixed schedule (default: full load)")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    rules_dir = args.rules or gen_rules.generate(DATA / "rules300", 300)
    templates = DATA / "receipts.txt"
    receipts.generate(templates)
    source = DATA / f"members-{args.members}.db"
    gen_members.generate(source, args.members)
    sides = {}
    for label, rev in (("before", args.before), ("after", args.after)):
        tree = export(rev)
        db = DATA / f"ab-{label}.db"
        drop_database(db)
        shutil.copy(source, db)
        knows_cache = "preload" in (tree / "server" / "config.py").read_text()
        sides[label] = (rev, tree, server_config(DATA / f"ab-{label}.yaml", db, rules_dir.resolve(),
                                                 members=args.members, cache=knows_cache))
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for round_no in range(args.rounds):
        for label, (rev, tree, config) in sides.items():
            with Server(f"ab-{label}", [str(VENV_BIN / "python"), "-m", "server.cli", "serve", "--config",
                                        str(config)], tree=tree, ready=True) as server:
                wrk(templates, args.members, 3)
                result, _ = measured(server, lambda: wrk(templates, args.members, args.duration, rate=args.rate))
            results[label].append(result)
            log(f"round {round_no + 1} {label} ({rev}): {result['confirmed_rps']:,.0f} confirmed/s, "
                f"{result['cpu_us_per_request']:,.0f} us CPU/request, p50 {ms(result, 'p50')} "
                f"p99 {ms(result, 'p99')} p99.9 {ms(result, 'p999')} ms")
    for key, unit in (("confirmed_rps", "confirmed receipts/s"), ("cpu_us_per_request", "us CPU/request"),
                      ("p99", "p99 us")):
        b = statistics.median(value(r, key) for r in results["before"])
        a = statistics.median(value(r, key) for r in results["after"])
        print(f"median {unit}: before {b:,.0f}, after {a:,.0f} ({a / b - 1:+.0%})")


def value(result: dict, key: str) -> float:
    return result["latency_us"][key] if key.startswith("p") else result[key]


def ms(result: dict, key: str) -> str:
    return f"{value(result, key) / 1000:.1f}"


if __name__ == "__main__":
    main()
