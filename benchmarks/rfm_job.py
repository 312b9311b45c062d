"""The RFM job on a generated database, with small writes going on beside it.

    PYTHONPATH=. python benchmarks/gen_members.py /tmp/m1.db --members 1000000
    PYTHONPATH=. python benchmarks/rfm_job.py /tmp/m1.db [--window-days 365]

Prints how long the job took, how many members it scored, and the latency of one small
write transaction every 20 ms while it ran (a receipt's commit stands for these): the job
reads on a reader connection and writes its scores in batches, so these stay short.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from server import rfm
from storage.db import Database
from storage.schema import migrations

# gen_members.py lays its history out before this day
NOW = datetime(2026, 11, 23, 10, tzinfo=timezone.utc)
WRITE_EVERY_S = 0.02


async def measure(db: Database, window_days: int) -> tuple[rfm.RfmRun, list[float]]:
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
        result = await rfm.run(db, window_days, ZoneInfo("Europe/Kyiv"), NOW, force=True)
    finally:
        done.set()
        await writer
    return result, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--window-days", type=int, default=365)
    args = parser.parse_args()
    db = Database(args.db, migrations=migrations)
    db.open()
    try:
        members = db.read_sync(lambda conn: conn.execute("SELECT COUNT(*) FROM members").fetchone()[0])
        result, lat = asyncio.run(measure(db, args.window_days))
    finally:
        db.close()
    lat_ms = sorted(x * 1000 for x in lat)
    print(f"members: {members:,}; scored: {result.scored:,}; rfm job: {result.seconds:.1f} s "
          f"({result.read_seconds:.1f} s reading and scoring)")
    print(f"writes beside it: {len(lat_ms)}, median {statistics.median(lat_ms):.1f} ms, "
          f"p99 {lat_ms[int(len(lat_ms) * 0.99) - 1]:.1f} ms, max {lat_ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
