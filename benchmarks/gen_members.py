"""Members with cards and some history, written straight into the server's SQLite schema.

    PYTHONPATH=. python benchmarks/gen_members.py DB_PATH --members 1000000 [--batch 20000]

The schema comes from storage/schema.py (the server's own migrations); rows look like
what storage/ledger.py writes:
- every member has one card, ``7`` followed by the member id in 12 digits, so a load
  driver can pick any enrolled card from the id alone; ``9...`` cards are never enrolled.
  Cards and phones are stored as the server stores them: keyed HMACs (under BENCH_HMAC_KEY,
  which benchmarks/run.py gives the server) plus the last four digits;
- postings carry their counter account and the hash chain, so `loyalty audit verify`
  passes on a generated database;
- every member got the welcome event: an event_fires row, a lot available at once and
  an ``event`` posting of 100 points;
- most members have 1 to 4 past receipts (within the last 300 days) with an accrual lot
  and posting each (and its split by rule, posting_rules), so balances, tiers and rule usage are read from real rows. They are
  stored in the server's format (the body's SHA-256 as 32 bytes, line records), but the
  body, the answer and the line records are small stand-ins: the answer has the fields
  audit verify reads; body and line records list no lines (a return of one of them is
  refused as a line not on the receipt). A real receipt stores ~0.8 KB of packed body
  and ~1.1 KB of answer; the benchmark reports that growth separately.

Resumable: each batch of members and all their rows is one transaction, so the highest
member id says where a stopped run ends; running again continues from there. Rows depend
only on the seed, the member ids and the batch size, so a resumed run writes what an
uninterrupted one would have. History receipt ids are zero-padded so that every table
and index is appended to in key order, which keeps 14 million members fast to write.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import sqlite3
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import msgspec
from sqlite_utils import Database as UtilsDatabase

from server.privacy import Privacy
from storage.accounts import ISSUE_PROGRAM
from storage import line_records
from storage.ledger import GENESIS_HASH, add_rule_totals, posting_hash
from storage.schema import migrations

BENCH_HMAC_KEY = "bench-only-hmac-key-0123456789"
PRIVACY = Privacy(BENCH_HMAC_KEY.encode())

CARD_PREFIX = "7"
UNKNOWN_PREFIX = "9"
WELCOME_POINTS = 100
GENERATED_VERSION = "sha256:generated-history"
EPOCH = datetime(2026, 11, 23, 0, 0, tzinfo=timezone.utc)  # history is laid out before this day
KYIV = timezone(timedelta(hours=2))
STORES = ("S001", "S002", "F001")
ANSWER = msgspec.json.Encoder()
STAND_IN_BODY = b'{"lines":[]}'
STAND_IN_SHA256 = hashlib.sha256(STAND_IN_BODY).digest()
STAND_IN_LINES = line_records.encode(line_records.build([], [], [], {}))


def card_of(member_id: int) -> str:
    return f"{CARD_PREFIX}{member_id:012d}"


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def open_db(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # No fsync: a killed generator loses at most the open batch (WAL survives a process
    # crash without it) and resumes; only a power cut could need a fresh start. At 14 M
    # members the syncs were what the generator waited for. The server sets FULL itself.
    conn.execute("PRAGMA synchronous=OFF")
    # The cards and phone indexes are keyed by HMACs, so every insert lands on a random page:
    # at 14 M members they outgrow a small cache and each batch rereads them from the OS.
    conn.execute("PRAGMA cache_size=-4194304")  # 4 GiB
    migrations.apply(UtilsDatabase(conn, recursive_triggers=False, execute_plugins=False))
    return conn


def batch_rows(first: int, last: int, first_lot: int, seed: int):
    """All rows for members first..last (inclusive); lot ids start at first_lot."""
    rng = random.Random(seed * 1_000_003 + first)
    members, cards, fires, lots, postings, receipts = [], [], [], [], [], []
    lot_id = first_lot
    for member_id in range(first, last + 1):
        enrolled = EPOCH - timedelta(days=rng.randrange(30, 1500), seconds=rng.randrange(86400))
        at = iso(enrolled)
        day = enrolled.astimezone(KYIV).date()
        has_phone = rng.random() < 0.6
        phone = f"+38050{member_id % 10_000_000:07d}" if has_phone else None
        members.append((member_id, PRIVACY.phone(phone) if phone else None,
                        Privacy.phone_last4(phone) if phone else None,
                        f"{rng.randrange(1950, 2006)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
                        if rng.random() < 0.4 else None, "[]", at, STORES[member_id % 2], at))
        card = card_of(member_id)
        cards.append((PRIVACY.card(card), Privacy.card_last4(card), member_id, at))
        fires.append((member_id, "welcome", "enrolled", at))
        lots.append((lot_id, member_id, day.isoformat(), (day + timedelta(days=365)).isoformat(), WELCOME_POINTS))
        postings.append((member_id, lot_id, "event", WELCOME_POINTS, at, at, "welcome", GENERATED_VERSION,
                         None, None, None, "event:welcome:enrolled"))
        lot_id += 1
        for n in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
            ts = EPOCH - timedelta(days=rng.randrange(15, 300), seconds=rng.randrange(86400))
            local = ts.astimezone(KYIV).date()
            total = rng.randrange(2_000, 300_000)
            points = total * 2 // 10_000
            key = (STORES[n % 2], "K01", f"h{member_id:012d}-{n}")
            stamp = iso(ts)
            receipts.append((*key, STAND_IN_SHA256, member_id, stamp, local.isoformat(), total,
                             GENERATED_VERSION, STAND_IN_BODY, answer_of(points), STAND_IN_LINES, stamp))
            if points:
                lots.append((lot_id, member_id, (local + timedelta(days=14)).isoformat(),
                             (local + timedelta(days=365)).isoformat(), points))
                postings.append((member_id, lot_id, "accrual", points, stamp, stamp, "base", GENERATED_VERSION,
                                 *key, None))
                lot_id += 1
    return members, cards, fires, lots, postings, receipts, lot_id


def answer_of(points: int) -> bytes:
    """A confirm answer (server/answer.py receipt_answer) cut to what the server reads back from it:
    audit verify (points by rule, redeemed points) and a return (points and discount by line,
    none here: the stand-in body has no lines)."""
    return ANSWER.encode({"accrued": {"points": points, "by_rule": [{"rule": "base", "points": points}],
                                      "by_line": []},
                          "redeemed": {"points": 0, "discount": 0, "by_line": []}})


def write_batch(conn: sqlite3.Connection, rows) -> None:
    members, cards, fires, lots, postings, receipts, _ = rows
    conn.execute("BEGIN")
    try:
        conn.executemany("INSERT INTO members (id, phone_hmac, phone_last4, birthday, tags, enrolled_at, "
                         "enrolled_store, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", members)
        conn.executemany("INSERT INTO cards (card, card_last4, member_id, created_at) VALUES (?, ?, ?, ?)", cards)
        conn.executemany("INSERT INTO event_fires (member_id, event_id, occasion, created_at) VALUES (?, ?, ?, ?)",
                         fires)
        conn.executemany("INSERT INTO lots (id, member_id, available_from, expires_on, remaining) "
                         "VALUES (?, ?, ?, ?, ?)", lots)
        written = chained(conn, lots, postings)
        conn.executemany("INSERT INTO postings (id, member_id, lot_id, kind, points, counter_account, "
                         "effective_at, created_at, rule_id, rules_version, store_id, register_id, receipt_id, ref, "
                         "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", written)
        if has_posting_rules(conn):     # m030: an accrual's split by rule (here its one rule)
            split = [(row[0], row[8], row[4]) for row in written if row[3] == "accrual"]
            conn.executemany("INSERT INTO posting_rules (posting_id, rule_id, points) VALUES (?, ?, ?)", split)
            if not has_trigger(conn, "posting_rules_rule_totals"):     # m032: the writer keeps the totals
                by_rule: dict[str, int] = {}
                for _, rule, points in split:
                    by_rule[rule] = by_rule.get(rule, 0) + points
                add_rule_totals(conn, by_rule)
        conn.executemany("INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, "
                         "local_date, total, rules_version, status, body, result, lines, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'confirmed', ?, ?, ?, ?)", receipts)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def has_posting_rules(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'posting_rules'").fetchone() is not None


def has_trigger(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)).fetchone() is not None


def chained(conn: sqlite3.Connection, lots: list, postings: list) -> list:
    """The batch's postings with ids, counter account and hashes continuing the chain."""
    last = conn.execute("SELECT id, hash FROM postings ORDER BY id DESC LIMIT 1").fetchone()
    posting_id, prev = last if last else (0, GENESIS_HASH)
    dates = {lot[0]: (lot[2], lot[3]) for lot in lots}
    out = []
    for member_id, lot_id, kind, points, effective, created, rule, version, store, register, receipt, ref in postings:
        posting_id += 1
        row = (posting_id, member_id, lot_id, *dates[lot_id], kind, points, ISSUE_PROGRAM, effective, created, rule,
               version, store, register, receipt, ref, None, None)
        prev = posting_hash(prev, row)
        out.append((posting_id, member_id, lot_id, kind, points, ISSUE_PROGRAM, effective, created, rule, version,
                    store, register, receipt, ref, prev))
    return out


def progress(done: int, total: int, started: float, resumed_at: int) -> None:
    width = 30
    share = done / total if total else 1.0
    made = done - resumed_at
    elapsed = time.monotonic() - started
    rate = made / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    bar = "#" * int(share * width)
    sys.stderr.write(f"\r[{bar:<{width}}] {done:>12,}/{total:,} members {share:6.1%}  "
                     f"{rate:>9,.0f}/s  eta {eta:6.0f}s")
    sys.stderr.flush()


def generate(path: Path, members: int, batch: int = 20_000, seed: int = 1, quiet: bool = False) -> int:
    """Brings the database to `members` members; returns how many this call added."""
    conn = open_db(path)
    try:
        have = conn.execute("SELECT COALESCE(MAX(id), 0) FROM members").fetchone()[0]
        next_lot = conn.execute("SELECT COALESCE(MAX(id), 0) FROM lots").fetchone()[0] + 1
        started = time.monotonic()
        resumed_at = have
        if have and not quiet:
            sys.stderr.write(f"{path}: {have:,} members already there, continuing\n")
        while have < members:
            last = min(have + batch, members)
            rows = batch_rows(have + 1, last, next_lot, seed)
            write_batch(conn, rows)
            next_lot = rows[-1]
            have = last
            if not quiet:
                progress(have, members, started, resumed_at)
        if not quiet:
            progress(have, members, started, resumed_at)
            sys.stderr.write("\n")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return have - resumed_at
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--members", type=int, required=True)
    parser.add_argument("--batch", type=int, default=20_000, help="members per transaction")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    generate(args.db, args.members, args.batch, args.seed)


if __name__ == "__main__":
    main()
