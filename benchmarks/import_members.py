"""Members a minute through `loyalty import members`, with an opening balance each.

Writes a CSV of N members (card, phone, birthday, tags, an opening balance and its expiry,
enrolled_on), imports it into a fresh database with the real command in a child process,
then runs `audit verify` and imports the same file again (which must add nothing). Prints
the time of each step and members a minute of the import. The target is 100,000 members a
minute or better.

    PYTHONPATH=. python benchmarks/import_members.py [--members 100000] [--batch-rows 1000] [--dir PATH]
"""
from __future__ import annotations

import argparse
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MEMBERS_MAX = 20_000_000


def write_members(path: Path, members: int, seed: int = 17) -> int:
    """The CSV, and the sum of its opening balances (for the check after the import)."""
    rng = random.Random(seed)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("card,phone,birthday,tags,opening_points,opening_expires_on,enrolled_on\n")
        for i in range(members):
            points = rng.randrange(0, 5_000)
            total += points
            phone = f"+38050{rng.randrange(10**7):07d}" if i % 3 else ""
            birthday = f"{rng.randrange(1950, 2008)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
            tags = "vip;newsletter" if i % 10 == 0 else ""
            expires = f"2027-{rng.randrange(1, 13):02d}-15"
            f.write(f"9{i:012d},{phone},{birthday},{tags},{points},{expires},"
                    f"{rng.randrange(2015, 2026)}-{rng.randrange(1, 13):02d}-01\n")
    return total


def loyalty(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"loyalty {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return seconds, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=1_000)
    parser.add_argument("--dir", type=Path, help="where to write the CSV and the database (default: a temporary folder)")
    args = parser.parse_args()
    if not 1 <= args.members <= MEMBERS_MAX:
        raise SystemExit(f"--members must be 1 to {MEMBERS_MAX}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source, db = work / "members.csv", work / "import.db"
        for stale in work.glob("import.db*"):
            stale.unlink()
        config = work / "import.yaml"
        config.write_text(yaml.safe_dump({
            "database": {"path": str(db)}, "rules": {"dir": str(ROOT / "rules/programs/market"), "watch": False},
            "clock": {"start": "2026-11-24T12:00:00+02:00"},
            "privacy": {"hmac_key": "benchmark-hmac-key-0123456789"}}))
        started = time.perf_counter()
        points = write_members(source, args.members)
        print(f"wrote {args.members} members in {time.perf_counter() - started:.1f} s")
        # The schema first, so the import's time is the import's alone.
        loyalty("import", "members", "--csv", str(_header_only(work)), "--config", str(config))
        seconds, summary = loyalty("import", "members", "--csv", str(source), "--config", str(config),
                                   "--batch-rows", str(args.batch_rows))
        print(summary)
        print(f"import: {seconds:.1f} s, {args.members / seconds * 60:,.0f} members a minute "
              f"(batches of {args.batch_rows})")
        with sqlite3.connect(db) as conn:
            posted = conn.execute("SELECT COALESCE(SUM(points), 0) FROM postings").fetchone()[0]
        assert posted == points, (posted, points)
        seconds, summary = loyalty("audit", "verify", "--config", str(config))
        print(f"audit verify: {seconds:.1f} s, ok; outstanding liability {posted} points")
        seconds, summary = loyalty("import", "members", "--csv", str(source), "--config", str(config))
        print(summary)
        print(f"rerun: {seconds:.1f} s")


def _header_only(work: Path) -> Path:
    path = work / "empty.csv"
    path.write_text("card\n")
    return path


if __name__ == "__main__":
    main()
