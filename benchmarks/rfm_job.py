"""The daily segment job on a generated database, with small writes going on beside it.

    PYTHONPATH=. python benchmarks/gen_members.py /tmp/m1.db --members 1000000
    PYTHONPATH=. python benchmarks/rfm_job.py /tmp/m1.db [--window-days 365] [--rfm-only]

The job scores RFM and decides the segments of SEGMENTS below for every member: two `rfm`
ones and four `when` ones reading every member fact (tier, tags, the days since the last
purchase, receipts and spend in the window, the days since enrolment); --rfm-only scores
alone, as the job did before it decided segments. The first run on a database opens every
membership; later runs write only what changed (run it twice to see both).

Prints how long the job took (and the CPU time this process spent, which depends less on
what else the machine runs), how many members it scored, the memberships it began and
ended, and the latency of one small write transaction every 20 ms while it ran (a receipt's
commit stands for these): the job reads on a reader connection and writes in batches, so
these stay short.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from rules import load_files
from server import rfm
from storage.db import Database
from storage.schema import migrations

# gen_members.py lays its history out before this day
NOW = datetime(2026, 11, 23, 10, tzinfo=timezone.utc)
WRITE_EVERY_S = 0.02
SEGMENTS = """\
program: {id: bench, name: Bench, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {metric: spend, window_days: 365, levels: [{id: base, from: 0}, {id: silver, from: 50000},
                                                   {id: gold, from: 150000}]}
stores: [{id: S001}]
segments:
  rfm: {window_days: %d}
  define:
    - {id: champions, rfm: {r: [4, 5], f: [4, 5], m: [4, 5]}}
    - {id: big-spenders, rfm: {m: [5, 5]}}
    - {id: lapsing, when: {days_since_last_purchase: {between: [60, 180]}}}
    - {id: gold-regulars, when: {tier: gold, receipts_in_window: {gte: 3}, not: {tags: [staff]}}}
    - {id: big-baskets, when: {spend_in_window: {gte: 100000}}}
    - {id: newcomers, when: {enrolled_days: {lt: 60}}}
    - {id: staff, list: true}
rules:
  - {id: base, reward: {percent: 2}}
"""


async def measure(db: Database, window_days: int, program) -> tuple[rfm.RfmRun, list[float]]:
    latencies: list[float] = []
    done = asyncio.Event()

    async def writes():
        while not done.is_set():
            started = time.perf_counter()
            await db.write(lambda conn: conn.execute("UPDATE members SET updated_at = updated_at WHERE id = 1"))
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(WRITE_EVERY_S)

    writer = asyncio.create_task(writes())
    try:
        result = await rfm.run(db, window_days, ZoneInfo("Europe/Kyiv"), NOW, force=True, program=program)
    finally:
        done.set()
        await writer
    return result, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--window-days", type=int, default=365)
    parser.add_argument("--rfm-only", action="store_true", help="scores only, no segments decided")
    args = parser.parse_args()
    program = None if args.rfm_only else load_files({"program.yaml": SEGMENTS % args.window_days}, NOW.date())
    db = Database(args.db, migrations=migrations)
    db.open()
    try:
        members = db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM members").fetchone()[0])
        cpu = time.process_time()
        result, lat = asyncio.run(measure(db, args.window_days, program))
        cpu = time.process_time() - cpu
    finally:
        db.close()
        if program is not None:
            program.close()
    lat_ms = sorted(x * 1000 for x in lat)
    print(f"members: {members:,}; scored: {result.scored:,}; memberships begun {result.opened:,}, ended "
          f"{result.closed:,}; job: {result.seconds:.1f} s ({result.read_seconds:.1f} s reading, scoring and "
          f"deciding segments); CPU of this process {cpu:.1f} s (all its threads; SQLite's own work included)")
    print(f"writes beside it: {len(lat_ms)}, median {statistics.median(lat_ms):.1f} ms, "
          f"p99 {lat_ms[int(len(lat_ms) * 0.99) - 1]:.1f} ms, max {lat_ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
