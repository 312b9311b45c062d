"""Peak memory and time of `audit verify` on PostgreSQL, two revisions side by side.

    PYTHONPATH=. python benchmarks/pg_audit_memory.py BEFORE AFTER [--members 50000] [--rounds 3]

A generated SQLite database (benchmarks/gen_members.py: a welcome lot and 1 to 4 past
receipts per member) is moved to a throwaway PostgreSQL cluster with `loyalty migrate
sqlite-to-postgres` (this tree's), then each revision's tree (exported as benchmarks/ab.py
does) runs storage.pg.audit.verify over it in a process of its own, alternating. Prints each
run's peak resident memory (VmHWM of that process), CPU and wall time, the problems it
found (none expected) and the medians per revision.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.ab import export  # noqa: E402
from benchmarks.pg_rounds import throwaway_database  # noqa: E402
from benchmarks.run import VENV_BIN  # noqa: E402

CHILD = r'''
import json, sys, time
from storage.pg.audit import verify
from storage.pg.connection import connect
conn = connect(sys.argv[1])
cpu0, wall0 = time.process_time(), time.perf_counter()
report = verify(conn)
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its
# parent's peak when that was higher.
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mib": hwm_kib / 1024, "cpu_s": cpu,
                  "wall_s": wall, "problems": len(report.problems), "postings": report.postings}))
'''


def audit_once(tree: Path, url: str) -> dict:
    done = subprocess.run([str(VENV_BIN / "python"), "-c", CHILD, url], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": export(args.before), "after": export(args.after)}
    from benchmarks import gen_members
    from server.migrate_cli import sqlite_to_postgres
    with tempfile.TemporaryDirectory() as tmp, throwaway_database() as (_, url):
        source = Path(tmp) / "members.db"
        gen_members.generate(source, args.members)
        if sqlite_to_postgres(source, url, datetime.now(timezone.utc)) != 0:
            sys.exit("the move to PostgreSQL failed")
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(audit_once(tree, url))
                print(name, json.dumps(runs[name][-1]), flush=True)
    for name, results in runs.items():
        print(f"{name}: peak {statistics.median(r['peak_mib'] for r in results):.0f} MiB, "
              f"CPU {statistics.median(r['cpu_s'] for r in results):.1f} s, "
              f"wall {statistics.median(r['wall_s'] for r in results):.1f} s, "
              f"{results[0]['postings']} postings, problems {[r['problems'] for r in results]}")


if __name__ == "__main__":
    main()
