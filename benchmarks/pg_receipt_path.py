"""The PostgreSQL backend's receipt path as the server would run it: confirms of the market
program through PgDatabase.write (a pool thread's connection, one transaction each: the
member locked, read, planned, answered, applied), for 1, 4 and 8 threads.

For each it prints confirms/s and CPU µs per confirm in this process (the read, the rules,
the plan, the answer and the driver; no HTTP) and in PostgreSQL (every process of the
cluster), the median of the rounds, which alternate the thread counts.

    PYTHONPATH=. .venv/bin/python benchmarks/pg_receipt_path.py [--receipts 2000] [--rounds 3]

Needs Debian's postgresql (the throwaway cluster of tests/pg_cluster.py).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from pg_rounds import ClusterCpu, alternate, medians, throwaway_database  # noqa: E402

from rules import load_program  # noqa: E402
from server import schema  # noqa: E402
from server.ops import sha256  # noqa: E402
from server.ops.receipts import confirm_write  # noqa: E402
from storage import ledger  # noqa: E402
from storage.apply import fire_events  # noqa: E402
from storage.pg.connection import connect  # noqa: E402
from storage.pg.database import PgDatabase  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from pg_cluster import Cluster  # noqa: E402

MEMBERS = 2_000
PROGRAM = ROOT / "tests" / "programs" / "market"
START = datetime.fromisoformat("2026-11-24T09:00:00+02:00")
CATEGORIES = ("dairy", "bakery", "produce", "drinks", "tobacco")


def card(n: int) -> str:
    return f"hmac-of-card-{n}"


def enroll_all(url: str, program) -> None:
    conn = connect(url)

    def in_tx(c):
        for n in range(MEMBERS):
            member_id = ledger.insert_member(c, card=card(n), card_last4=f"{n:04d}"[-4:], phone_hmac=None,
                                             phone_last4=None, birthday=None, tags="[]", referred_by=None,
                                             store_id="S001", now="2026-11-01T10:00:00.000000Z")
            fire_events(c, program, member_id, "enrolled", "enrolled", START - timedelta(days=20))
    try:
        conn.transaction(in_tx)
    finally:
        conn.close()


def receipts(first: int, count: int, rnd: random.Random) -> list[tuple[schema.Receipt, str, bytes]]:
    out = []
    for n in range(first, first + count):
        lines = []
        for no in range(1, rnd.randint(3, 20) + 1):
            qty, price = rnd.randint(1, 3), rnd.randrange(500, 20_000)
            lines.append({"line_no": no, "sku": f"48200000{no:05d}", "category": rnd.choice(CATEGORIES),
                          "qty": qty, "price": price, "amount": qty * price})
        holder = card(rnd.randrange(MEMBERS))
        r = msgspec.convert({"receipt_id": f"R{n:08d}", "store_id": "S001", "register_id": "K01",
                             "ts": (START + timedelta(milliseconds=n)).isoformat(), "card": "7000000000001",
                             "lines": lines, "total": sum(x["amount"] for x in lines)}, schema.Receipt)
        body = schema.canonical(msgspec.structs.replace(r, card=holder))
        out.append((r, holder, body))
    return out


async def run(db: PgDatabase, program, todo, threads: int) -> None:
    gate = asyncio.Semaphore(threads)
    now = START + timedelta(seconds=5)

    async def one(r, holder, body):
        async with gate:
            await db.write_grouped(confirm_write(program, r, holder, body, sha256(body), now, [], None))
    await asyncio.gather(*(one(*item) for item in todo))


def measure(url: str, cluster: Cluster, program, todo, threads: int) -> tuple[float, float, float]:
    db = PgDatabase(url, connections=threads)
    db.open()
    meter = ClusterCpu(cluster)
    try:
        meter.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        asyncio.run(run(db, program, todo, threads))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        pg = meter.stop()       # the pool's backends still alive
    finally:
        db.close()
    return len(todo) / elapsed, cpu / len(todo) * 1e6, pg / len(todo) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--receipts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    program = load_program(PROGRAM, START)
    with throwaway_database() as (cluster, url):
        PgDatabase(url).open()      # migrations
        enroll_all(url, program)
        rnd, numbers = random.Random(11), itertools.count(step=args.receipts)

        def threads_run(threads: int):
            return lambda: measure(url, cluster, program, receipts(next(numbers), args.receipts, rnd), threads)

        results = alternate({threads: threads_run(threads) for threads in (1, 4, 8)}, args.rounds,
                            lambda threads, r: print(f"  {threads} threads: {r[0]:,.0f} confirms/s, client "
                                                     f"{r[1]:.0f} µs, PostgreSQL {r[2]:.0f} µs", flush=True))
        print(f"\n{args.receipts} confirms x {args.rounds} rounds, {MEMBERS:,} members; medians\n")
        print("| threads | confirms/s | client CPU µs/confirm | PostgreSQL CPU µs/confirm |")
        print("| ---: | ---: | ---: | ---: |")
        for threads, rows in results.items():
            rate, client, pg = medians(rows)
            print(f"| {threads} | {rate:,.0f} | {client:.0f} | {pg:.0f} |")


if __name__ == "__main__":
    main()
