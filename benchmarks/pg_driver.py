"""asyncpg against psycopg 3 on the receipt path's statement pattern, for the PostgreSQL backend.

Each confirmed receipt is one transaction: lock the member by card (SELECT ... FOR UPDATE),
read its state (lots with points left, open holds, receipt counts for the tier, the limited
rules' uses), claim the receipt's key (INSERT ... ON CONFLICT DO NOTHING RETURNING), insert its
lot (RETURNING id), its postings by executemany, draw a redeemed lot down, COMMIT. Workers
send receipts of random members of 10,000 over their own connections at once.

Three ways: asyncpg (async only), psycopg 3 async, and psycopg 3 sync with a thread per
connection (the shape that runs the storage functions, which take a connection and return,
unchanged). Rounds alternate the three; for each it prints receipts/s and CPU µs per receipt
in this process (time.process_time) and in PostgreSQL (utime + stime of every process of the
cluster, from /proc), the median of the rounds.

    .venv/bin/pip install asyncpg==0.32.0 psycopg==3.3.9 psycopg-binary==3.3.9   # not pinned for serving yet
    .venv/bin/python benchmarks/pg_driver.py [--receipts 3000] [--workers 8] [--rounds 3]

Needs Debian's postgresql (the throwaway cluster of tests/pg_cluster.py; as root it runs as `postgres`).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import random
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_cluster import Cluster  # noqa: E402
from pg_rounds import ClusterCpu, alternate, medians, throwaway_database  # noqa: E402

MEMBERS = 10_000

SCHEMA = """
CREATE TABLE members (id bigserial PRIMARY KEY, card_hmac text UNIQUE NOT NULL, tags text NOT NULL,
    enrolled_at timestamptz NOT NULL, manual_tier text, manual_tier_until date);
CREATE TABLE lots (id bigserial PRIMARY KEY, member_id bigint NOT NULL REFERENCES members,
    available_from date NOT NULL, expires_on date, remaining bigint NOT NULL);
CREATE INDEX lots_live ON lots (member_id) WHERE remaining <> 0;
CREATE TABLE holds (store_id text, register_id text, receipt_id text, member_id bigint NOT NULL,
    points bigint NOT NULL, expires_at timestamptz NOT NULL, closed_at timestamptz,
    PRIMARY KEY (store_id, register_id, receipt_id));
CREATE INDEX holds_open ON holds (member_id) WHERE closed_at IS NULL;
CREATE TABLE receipts (store_id text, register_id text, receipt_id text, member_id bigint,
    ts timestamptz NOT NULL, total bigint NOT NULL, status text NOT NULL, body bytea NOT NULL,
    PRIMARY KEY (store_id, register_id, receipt_id));
CREATE INDEX receipts_member ON receipts (member_id, ts);
CREATE TABLE rule_fires (member_id bigint NOT NULL, rule_id text NOT NULL, local_date date NOT NULL,
    receipt_id text NOT NULL);
CREATE INDEX rule_fires_member ON rule_fires (member_id, rule_id, local_date);
CREATE TABLE postings (id bigserial PRIMARY KEY, member_id bigint NOT NULL, lot_id bigint NOT NULL,
    kind text NOT NULL, points bigint NOT NULL, counter text NOT NULL, rule_id text,
    receipt_id text, hash bytea NOT NULL);
"""

LOCK = "SELECT id, tags, enrolled_at, manual_tier, manual_tier_until FROM members WHERE card_hmac = $1 FOR UPDATE"
LOTS = "SELECT id, available_from, expires_on, remaining FROM lots WHERE member_id = $1 AND remaining <> 0"
HOLDS = ("SELECT store_id, register_id, receipt_id, points, expires_at FROM holds "
         "WHERE member_id = $1 AND closed_at IS NULL AND expires_at > $2")
COUNTS = ("SELECT count(*), count(*) FILTER (WHERE ts > $2), coalesce(sum(total) FILTER (WHERE ts > $2), 0) "
          "FROM receipts WHERE member_id = $1 AND status = 'confirmed'")
USES = "SELECT rule_id, count(*) FROM rule_fires WHERE member_id = $1 AND local_date >= $2 GROUP BY rule_id"
CLAIM = ("INSERT INTO receipts (store_id, register_id, receipt_id, member_id, ts, total, status, body) "
         "VALUES ($1, $2, $3, $4, $5, $6, 'confirmed', $7) ON CONFLICT DO NOTHING RETURNING 1")
LOT = "INSERT INTO lots (member_id, available_from, expires_on, remaining) VALUES ($1, $2, $3, $4) RETURNING id"
POSTING = ("INSERT INTO postings (member_id, lot_id, kind, points, counter, rule_id, receipt_id, hash) "
           "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
FIRE = "INSERT INTO rule_fires (member_id, rule_id, local_date, receipt_id) VALUES ($1, $2, $3, $4)"
DRAW = "UPDATE lots SET remaining = remaining - $2 WHERE id = $1"


def card(n: int) -> str:
    return hashlib.sha256(b"card%d" % n).hexdigest()


class Receipt:
    """What one receipt sends to the database, the same for every driver."""
    __slots__ = ("card", "key", "ts", "total", "body", "since", "today")

    def __init__(self, n: int, rnd: random.Random):
        self.card = card(rnd.randrange(MEMBERS))
        self.key = ("S001", f"K{n % 8:02d}", f"R{n:08d}")
        self.ts = datetime(2026, 11, 24, 12, tzinfo=timezone.utc) + timedelta(seconds=n)
        self.total = rnd.randrange(1_000, 200_000)
        self.body = rnd.randbytes(1_200)        # a 20-line receipt, compressed
        self.since = self.ts - timedelta(days=365)
        self.today = self.ts.date()


def writes(member_id: int, lot_id: int, r: Receipt, spend_from: int | None) -> tuple[list, list]:
    points = r.total // 50
    previous = b"\0" * 32
    postings = []
    for kind, pts, counter, rule in (("accrual", points - points // 2, "issue:program", "base"),
                                     ("accrual", points // 2, "issue:program", "dairy-x2"),
                                     ("redemption", -5, "redemption:program", None)):
        if kind == "redemption" and spend_from is None:
            continue
        previous = hashlib.sha256(previous + b"%d|%s|%d" % (member_id, kind.encode(), pts)).digest()
        postings.append((member_id, spend_from if kind == "redemption" else lot_id, kind, pts, counter, rule,
                         r.key[2], previous))
    fires = [(member_id, "dairy-x2", r.today, r.key[2])]
    return postings, fires


def spendable(lots) -> int | None:
    return next((lot[0] for lot in lots if lot[3] >= 5), None)


# --- asyncpg -----------------------------------------------------------------------------

async def asyncpg_worker(conn, todo: list[Receipt]) -> None:
    for r in todo:
        async with conn.transaction():
            m = await conn.fetchrow(LOCK, r.card)
            lots = await conn.fetch(LOTS, m[0])
            await conn.fetch(HOLDS, m[0], r.ts)
            await conn.fetchrow(COUNTS, m[0], r.since)
            await conn.fetch(USES, m[0], r.today)
            if await conn.fetchval(CLAIM, *r.key, m[0], r.ts, r.total, r.body) is None:
                continue
            lot = await conn.fetchval(LOT, m[0], r.today + timedelta(days=14), r.today + timedelta(days=365),
                                      r.total // 50)
            spend = spendable(lots)
            postings, fires = writes(m[0], lot, r, spend)
            await conn.executemany(POSTING, postings)
            await conn.executemany(FIRE, fires)
            if spend is not None:
                await conn.execute(DRAW, spend, 5)


async def run_asyncpg(url: str, batches: list[list[Receipt]], done) -> None:
    import asyncpg
    conns = [await asyncpg.connect(dsn_of(url)) for _ in batches]
    try:
        await asyncio.gather(*(asyncpg_worker(c, b) for c, b in zip(conns, batches)))
        done()
    finally:
        for c in conns:
            await c.close()


# --- psycopg 3 -----------------------------------------------------------------------------

def pc(sql: str) -> str:
    """$n placeholders as psycopg's %s (each is used in order, $2 twice in COUNTS)."""
    import re
    return re.sub(r"\$\d+", "%s", sql)


COUNTS_PC = ("SELECT count(*), count(*) FILTER (WHERE ts > %(since)s), "
             "coalesce(sum(total) FILTER (WHERE ts > %(since)s), 0) "
             "FROM receipts WHERE member_id = %(member)s AND status = 'confirmed'")


async def psycopg_async_worker(conn, todo: list[Receipt]) -> None:
    cur = conn.cursor()
    for r in todo:
        async with conn.transaction():
            m = await (await cur.execute(pc(LOCK), (r.card,))).fetchone()
            lots = await (await cur.execute(pc(LOTS), (m[0],))).fetchall()
            await (await cur.execute(pc(HOLDS), (m[0], r.ts))).fetchall()
            await (await cur.execute(COUNTS_PC, {"member": m[0], "since": r.since})).fetchone()
            await (await cur.execute(pc(USES), (m[0], r.today))).fetchall()
            if await (await cur.execute(pc(CLAIM), (*r.key, m[0], r.ts, r.total, r.body))).fetchone() is None:
                continue
            lot = (await (await cur.execute(pc(LOT), (m[0], r.today + timedelta(days=14),
                                                      r.today + timedelta(days=365), r.total // 50))).fetchone())[0]
            spend = spendable(lots)
            postings, fires = writes(m[0], lot, r, spend)
            await cur.executemany(pc(POSTING), postings)
            await cur.executemany(pc(FIRE), fires)
            if spend is not None:
                await cur.execute(pc(DRAW), (spend, 5))


async def run_psycopg_async(url: str, batches: list[list[Receipt]], done) -> None:
    import psycopg
    conns = [await psycopg.AsyncConnection.connect(url, prepare_threshold=0) for _ in batches]
    try:
        await asyncio.gather(*(psycopg_async_worker(c, b) for c, b in zip(conns, batches)))
        done()
    finally:
        for c in conns:
            await c.close()


def psycopg_sync_worker(conn, todo: list[Receipt]) -> None:
    cur = conn.cursor()
    for r in todo:
        with conn.transaction():
            m = cur.execute(pc(LOCK), (r.card,)).fetchone()
            lots = cur.execute(pc(LOTS), (m[0],)).fetchall()
            cur.execute(pc(HOLDS), (m[0], r.ts)).fetchall()
            cur.execute(COUNTS_PC, {"member": m[0], "since": r.since}).fetchone()
            cur.execute(pc(USES), (m[0], r.today)).fetchall()
            if cur.execute(pc(CLAIM), (*r.key, m[0], r.ts, r.total, r.body)).fetchone() is None:
                continue
            lot = cur.execute(pc(LOT), (m[0], r.today + timedelta(days=14), r.today + timedelta(days=365),
                                        r.total // 50)).fetchone()[0]
            spend = spendable(lots)
            postings, fires = writes(m[0], lot, r, spend)
            cur.executemany(pc(POSTING), postings)
            cur.executemany(pc(FIRE), fires)
            if spend is not None:
                cur.execute(pc(DRAW), (spend, 5))


def run_psycopg_threads(url: str, batches: list[list[Receipt]], done) -> None:
    import psycopg
    conns = [psycopg.Connection.connect(url, prepare_threshold=0) for _ in batches]
    try:
        threads = [threading.Thread(target=psycopg_sync_worker, args=(c, b)) for c, b in zip(conns, batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done()
    finally:
        for c in conns:
            c.close()


# --- measuring ---------------------------------------------------------------------------

def dsn_of(url: str) -> str:
    """asyncpg wants the socket folder as host= too, which the url already has."""
    return url


def seed(url: str) -> None:
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        with conn.cursor().copy("COPY members (card_hmac, tags, enrolled_at) FROM STDIN") as copy:
            for n in range(MEMBERS):
                copy.write_row((card(n), "[]", datetime(2025, 1, 1, tzinfo=timezone.utc)))
        with conn.cursor().copy("COPY lots (member_id, available_from, expires_on, remaining) FROM STDIN") as copy:
            for n in range(1, MEMBERS + 1):
                copy.write_row((n, date(2025, 1, 1), date(2027, 12, 31), 100))
        conn.execute("VACUUM ANALYZE")


WAYS = {
    "asyncpg 0.32 (async)": lambda url, b, done: asyncio.run(run_asyncpg(url, b, done)),
    "psycopg 3.3 async": lambda url, b, done: asyncio.run(run_psycopg_async(url, b, done)),
    "psycopg 3.3 sync, a thread per connection": run_psycopg_threads,
}


def measure(way, url: str, cluster: Cluster, receipts: list[Receipt], workers: int) -> tuple[float, float, float]:
    batches = [receipts[i::workers] for i in range(workers)]
    meter, pg = ClusterCpu(cluster), []
    meter.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    way(url, batches, lambda: pg.append(meter.stop()))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    n = len(receipts)
    return n / elapsed, cpu / n * 1e6, pg[0] / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--receipts", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with throwaway_database() as (cluster, url):
        seed(url)
        rnd, numbers = random.Random(7), itertools.count()

        def way_run(way):
            return lambda: measure(way, url, cluster, [Receipt(next(numbers), rnd) for _ in range(args.receipts)],
                                   args.workers)

        results = alternate({name: way_run(way) for name, way in WAYS.items()}, args.rounds,
                            lambda name, r: print(f"  {name}: {r[0]:,.0f} receipts/s, client {r[1]:.0f} µs, "
                                                  f"PostgreSQL {r[2]:.0f} µs", flush=True))
        print(f"\n{args.receipts} receipts x {args.rounds} rounds, {args.workers} connections, "
              f"{MEMBERS:,} members; medians\n")
        print("| driver | receipts/s | client CPU µs/receipt | PostgreSQL CPU µs/receipt |")
        print("| --- | ---: | ---: | ---: |")
        for name, rows in results.items():
            rate, client, pg = medians(rows)
            print(f"| {name} | {rate:,.0f} | {client:.0f} | {pg:.0f} |")


if __name__ == "__main__":
    main()
