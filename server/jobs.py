"""Lifecycle jobs: expiry of lots, release of expired holds, birthday events.

Each job is idempotent and safe to stop at any point: work is done in small write
transactions, and every step first checks inside its transaction whether it is still
needed (a lot already expired has nothing left; an event already fired is recorded).
Activation needs no job: a lot is available from its date on, so `?at=` answers and
what jobs post always agree.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import date, datetime, time

from rules import Program
from server.service import fire_events
from storage import accounts, ledger
from storage.db import Database, StorageError
from storage.ledger import PostingRef, iso

log = logging.getLogger("loyalty.jobs")

BATCH_ROWS_MAX = 500


async def run_all(db: Database, program: Program, now: datetime) -> dict[str, int]:
    done = {"expired_lots": 0, "released_holds": 0, "birthday_events": 0}
    for job, key in ((expire_batch, "expired_lots"), (birthday_batch, "birthday_events")):
        while True:
            # Hundreds of rows per call: on the writer thread, not stalling requests on the loop.
            n = await db.write(lambda conn: job(conn, program, now), off_loop=True)
            done[key] += n
            if n < BATCH_ROWS_MAX:
                break
    done["released_holds"] = await db.write(lambda conn: release_holds(conn, now), off_loop=True)
    return done


def expire_batch(conn, program: Program, now: datetime) -> int:
    """Post expiry for lots whose expiry date has come; returns how many lots it looked at."""
    today = now.astimezone(program.timezone).date().isoformat()
    rows = conn.execute(
        "SELECT l.id, l.member_id, l.expires_on, (SELECT SUM(points) FROM postings p WHERE p.lot_id = l.id) "
        "FROM lots l WHERE l.expiry_done = 0 AND l.expires_on IS NOT NULL AND l.expires_on <= ? LIMIT ?",
        (today, BATCH_ROWS_MAX)).fetchall()
    conn.executemany("UPDATE lots SET expiry_done = 1 WHERE id = ?", [(r[0],) for r in rows])
    for lot_id, member_id, expires_on, remaining in rows:
        if remaining <= 0:     # spent in full, or a debt (debts do not expire)
            continue
        # The points are gone from the first moment of the expiry date, local time.
        expired_at = datetime.combine(date.fromisoformat(expires_on), time.min, program.timezone)
        at = PostingRef(effective_at=iso(expired_at), created_at=iso(now), rules_version=program.version,
                        ref=f"expiry:{lot_id}")
        ledger.post(conn, member_id, lot_id, "expiry", -remaining, accounts.EXPIRY, at)
    return len(rows)


def release_holds(conn, now: datetime) -> int:
    return conn.execute("UPDATE holds SET status = 'released', closed_at = expires_at "
                        "WHERE status = 'open' AND expires_at <= ?", (iso(now),)).rowcount


def birthday_batch(conn, program: Program, now: datetime) -> int:
    """Members whose birthday is today (program timezone) get the birthday events once a year."""
    if not program.events_on("birthday"):
        return 0
    today = now.astimezone(program.timezone).date()
    days = [today.strftime("%m-%d")]
    if days[0] == "02-28" and not _leap(today.year):
        days.append("02-29")
    occasion = f"birthday:{today.year}"
    rows = conn.execute(
        f"SELECT id FROM members m WHERE substr(birthday, 6) IN ({','.join('?' * len(days))}) AND NOT EXISTS "
        "(SELECT 1 FROM event_fires e WHERE e.member_id = m.id AND e.occasion = ?) LIMIT ?",
        (*days, occasion, BATCH_ROWS_MAX)).fetchall()
    for (member_id,) in rows:
        fire_events(conn, program, member_id, "birthday", occasion, now)
    return len(rows)


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


async def schedule(db: Database, holder, clock, interval_seconds: float) -> None:
    """Runs the jobs inside the server, every interval, with the server's clock."""
    while True:
        try:
            done = await run_all(db, holder.current, clock.now())
            if any(done.values()):
                log.info("jobs: %s", done)
        except StorageError as e:   # a full disk or a lock: storage logs the cause itself, once
            log.warning("lifecycle jobs skipped (%s: %s); retrying in %s s", e.cause, e, interval_seconds)
        except Exception:      # a failed round is retried at the next interval
            log.exception("lifecycle jobs failed; retrying in %s s", interval_seconds)
        await asyncio.sleep(interval_seconds)
