"""Durable writes per second with one commit per write versus group commit.

The same workload, in the same process, against a fresh database for each setting:
N small writes (one receipt row and one ledger row each) issued by a fixed number of
concurrent awaiters, with batch_max=1 (an fsync per write) and batch_max=256 (one fsync
per batch of whatever queued meanwhile). Absolute numbers depend on the disk; the ratio
is the point.

    PYTHONPATH=. python benchmarks/group_commit.py [--writes 20000] [--awaiters 64] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils.migrations import Migrations

from storage.db import Database


def make_migrations() -> Migrations:
    migrations = Migrations("group_commit_benchmark")

    @migrations()
    def create_tables(db):
        db.execute("CREATE TABLE receipts (id INTEGER PRIMARY KEY, store TEXT NOT NULL, total_cents INTEGER NOT NULL)")
        db.execute(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY,"
            " receipt_id INTEGER NOT NULL REFERENCES receipts(id), points INTEGER NOT NULL)"
        )

    return migrations


def write_receipt(n: int):
    def fn(conn: sqlite3.Connection) -> int:
        receipt_id = conn.execute(
            "INSERT INTO receipts (store, total_cents) VALUES (?, ?)", ("store-1", 1_000 + n % 9_000)
        ).lastrowid
        conn.execute("INSERT INTO ledger (receipt_id, points) VALUES (?, ?)", (receipt_id, n % 50))
        return receipt_id

    return fn


@dataclass
class Result:
    batch_max: int
    writes_per_s: float
    commits: int
    latencies_ms: list[float]

    def line(self) -> str:
        latencies = sorted(self.latencies_ms)
        p50_ms = statistics.median(latencies)
        p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        return (
            f"batch_max={self.batch_max:<4} {self.writes_per_s:>10,.0f} writes/s  "
            f"commits={self.commits:<6} mean batch={len(latencies) / self.commits:6.1f}  "
            f"latency p50={p50_ms:.2f} ms p99={p99_ms:.2f} ms"
        )


async def measure(path: Path, *, writes: int, awaiters: int, batch_max: int) -> Result:
    batch_sizes: list[int] = []
    db = Database(
        path,
        migrations=make_migrations(),
        batch_max=batch_max,
        on_commit=lambda batch_size, seconds: batch_sizes.append(batch_size),
    )
    db.open()
    try:
        numbers = iter(range(writes))
        latencies_ms: list[float] = []

        async def awaiter() -> None:
            for n in numbers:  # shared: each number is taken by exactly one awaiter
                started_s = time.perf_counter()
                await db.write(write_receipt(n))
                latencies_ms.append((time.perf_counter() - started_s) * 1_000)

        started_s = time.perf_counter()
        await asyncio.gather(*(awaiter() for _ in range(awaiters)))
        elapsed_s = time.perf_counter() - started_s

        stored = await db.read(lambda conn: conn.execute("SELECT count(*) FROM ledger").fetchone()[0])
        if stored != writes:
            raise AssertionError(f"expected {writes} ledger rows, found {stored}")
    finally:
        db.close()
    return Result(batch_max, writes / elapsed_s, len(batch_sizes), latencies_ms)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--awaiters", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go (the disk being measured)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="group-commit-", dir=args.dir) as tmp:
        print(f"{args.writes:,} writes, {args.awaiters} concurrent awaiters, synchronous=FULL, in {tmp}")
        single = await measure(Path(tmp) / "single.db", writes=args.writes, awaiters=args.awaiters, batch_max=1)
        print(single.line())
        grouped = await measure(Path(tmp) / "grouped.db", writes=args.writes, awaiters=args.awaiters, batch_max=256)
        print(grouped.line())
    print(f"group commit speed-up: {grouped.writes_per_s / single.writes_per_s:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
