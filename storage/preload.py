"""Reads what the receipt path looks up into the write connection's page cache.

Every receipt is read and written on the one write connection (storage.db), whose page
cache, unlike a reader's, survives commits. Sized to the member base
(`database.cache_mib`), it keeps the receipt path off the disk entirely, and it is
process memory: a system that reclaims idle page cache (DAMON, memory pressure) cannot
take it. Read once at start, it is warm before the first register's receipt.

Each step reads one range of members (or of cards) in key order, as a write-queue item
run on the writer thread: short enough that receipts queued meanwhile wait milliseconds,
not the whole preload.
"""
from __future__ import annotations

import logging
import sqlite3
import time

from storage.db import Database

log = logging.getLogger(__name__)

MEMBERS_PER_STEP = 20_000
CARDS_PER_STEP = 20_000
PROGRESS_LOG_INTERVAL_S = 30.0

# b-trees keyed by member id that a receipt reads or writes (the member's row, lots with
# points left, receipt counts for the tier, postings of the member, rule-limit usage),
# each read over one range of member ids. Counting through the named index reads its
# leaf pages and nothing else.
_MEMBER_RANGES = (
    "SELECT SUM(length(tags)) FROM members WHERE id BETWEEN ? AND ?",
    "SELECT COUNT(*) FROM lots INDEXED BY lots_live WHERE member_id BETWEEN ? AND ? AND remaining != 0",
    "SELECT COUNT(*) FROM receipts INDEXED BY receipts_member_counts WHERE member_id BETWEEN ? AND ?",
    "SELECT COUNT(*) FROM postings INDEXED BY postings_member WHERE member_id BETWEEN ? AND ?",
    "SELECT COUNT(*) FROM rule_fires INDEXED BY rule_fires_member WHERE member_id BETWEEN ? AND ?",
)


def member_step(conn: sqlite3.Connection, first: int, last: int) -> None:
    for sql in _MEMBER_RANGES:
        conn.execute(sql, (first, last)).fetchone()


def card_step(conn: sqlite3.Connection, after: str, count: int) -> str | None:
    """Reads `count` cards in key order after `after`; the last one read, None past the end."""
    row = conn.execute("SELECT MAX(card), COUNT(*) FROM (SELECT card FROM cards WHERE card > ? ORDER BY card "
                       "LIMIT ?)", (after, count)).fetchone()
    return row[0] if row[1] else None


async def preload(db: Database) -> float:
    """Reads every member's hot rows once through the write connection; returns the seconds taken."""
    started = time.monotonic()
    logged = started
    last_id = await db.write(lambda c: c.execute("SELECT COALESCE(MAX(id), 0) FROM members").fetchone()[0],
                             off_loop=True)
    for first in range(1, last_id + 1, MEMBERS_PER_STEP):
        last = first + MEMBERS_PER_STEP - 1
        await db.write(lambda c, first=first, last=last: member_step(c, first, last), off_loop=True)
        if time.monotonic() - logged > PROGRESS_LOG_INTERVAL_S:
            logged = time.monotonic()
            log.info("preloading the cache: members %d of %d", min(last, last_id), last_id)
    card = ""
    while card is not None:
        card = await db.write(lambda c, after=card: card_step(c, after, CARDS_PER_STEP), off_loop=True)
    return time.monotonic() - started
