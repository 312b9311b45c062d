"""Lifecycle jobs: expiry of lots, release of expired holds, birthday events, RFM scores and
the `rfm` and `when` segments (once a local day, server/rfm.py), and the points.expiring, points.expired and birthday
events of the outbox (storage/events.py).

Each job is idempotent and safe to stop at any point: work is done in small write
transactions, and every step first checks inside its transaction whether it is still
needed (a lot already expired has nothing left; an event already fired is recorded).
Activation needs no job: a lot is available from its date on, so `?at=` answers and
what jobs post always agree.

`preview_all` runs the same jobs, batch by batch, each batch in a transaction that is
rolled back after reading what it posted: nothing is committed (a server beside it keeps
its page cache), and the write lock is held no longer than by a real run's batch. Each
lot's expiry and each member's events touch only that lot or member, so batches
previewed one by one, each undone, add up to what the real run would post.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Callable, NamedTuple

from rules import Program
from server import rfm
from storage import accounts, events, ledger
from storage.apply import fire_events
from storage.db import Database, StorageError
from storage.ledger import PostingRef, iso, member_public_id
from storage.sql import is_postgresql

log = logging.getLogger("loyalty.jobs")

BATCH_ROWS_MAX = 500
PREVIEW_LINES_MAX = 20      # per job: enough to recognise what it does, short enough to read

# Keyset cursors: each batch starts after the last row of the one before, so a batch
# whose writes were undone (a preview) is not looked at again.
LOTS_START = ("", 0)        # (expires_on, lot id)
MEMBERS_START = 0           # member id
EXPIRING_DAYS_BEFORE = 7    # events.expiring_days_before's default


class Batch(NamedTuple):
    rows: int               # rows looked at; fewer than BATCH_ROWS_MAX: the job is done
    after: object           # the cursor for the next batch


class Interrupted(Exception):
    """Stopped between two batches (`loyalty jobs run` and Ctrl-C): what was done until then."""

    def __init__(self, done: dict[str, int]):
        super().__init__(done)
        self.done = done


async def run_all(db: Database, program: Program, now: datetime,
                  expiring_days: int = EXPIRING_DAYS_BEFORE,
                  stop: Callable[[], bool] = lambda: False, rescore: bool = False) -> dict[str, int]:
    """Interrupted when stop() holds after a batch: the batches before it stay committed.
    rescore: recompute the RFM scores and segments even if today's run was done (`loyalty
    jobs run`, which a person asks for); the server's own look does them once a local day."""
    done = {"expired_lots": 0, "released_holds": 0, "birthday_events": 0, "expiring_lots": 0}
    for job, key, start in jobs(expiring_days):
        after = start
        while True:
            # Hundreds of rows per call: on the writer thread, not stalling requests on the loop.
            batch = await db.write(lambda conn: job(conn, program, now, after), off_loop=True)
            done[key] += batch.rows
            after = batch.after
            if stop():
                raise Interrupted(done)
            if batch.rows < BATCH_ROWS_MAX:
                break
    done["released_holds"] = len(await db.write(lambda conn: release_holds(conn, now), off_loop=True))
    if db.backend == "postgresql":      # the anchors over the members' chains (storage/pg/anchors.py)
        from storage.pg import anchors
        done["anchored_heads"] = await db.write(lambda conn: anchors.write_anchors(conn, now))
    window_days = rfm.settings_of(program)
    if window_days is not None:     # once a local day unless rescore; reads on a reader, writes in batches
        scored = await rfm.run(db, window_days, program.timezone, now, force=rescore, program=program)
        done["rfm_members_scored"] = scored.scored if scored else 0
        # What the run renewed, so a person running it sees the segments were decided again.
        done["segments_decided"] = len(rfm.computed_segments(program)) if scored else 0
        done["segment_memberships_begun"] = scored.opened if scored else 0
        done["segment_memberships_ended"] = scored.closed if scored else 0
    return done


def expire_batch(conn, program: Program, now: datetime, after: tuple[str, int] = LOTS_START) -> Batch:
    """Post expiry for lots whose expiry date has come; counts the lots it looked at."""
    today = now.astimezone(program.timezone).date().isoformat()
    rows = conn.execute(
        "SELECT l.id, l.member_id, l.expires_on, l.remaining FROM lots l WHERE l.expiry_done = 0 "
        "AND l.expires_on IS NOT NULL AND l.expires_on <= ? AND (l.expires_on, l.id) > (?, ?) "
        "ORDER BY l.expires_on, l.id LIMIT ?",
        (today, *after, BATCH_ROWS_MAX)).fetchall()
    conn.executemany("UPDATE lots SET expiry_done = 1 WHERE id = ?", [(r[0],) for r in rows])
    # All at once, in the order of their ids, as every writer of several members takes them:
    # one by one in the lots' order, a batch and a merge each held a member the other waited for.
    locked = ledger.lock_members(conn, [r[1] for r in rows])
    for lot_id, member_id, expires_on, remaining in rows:
        if locked:
            # Several writers (PostgreSQL): a receipt may have spent from it since it was read.
            remaining = conn.execute("SELECT remaining FROM lots WHERE id = ?", (lot_id,)).fetchone()[0]
        if remaining <= 0:     # spent in full, or a debt (debts do not expire)
            continue
        # The points are gone from the first moment of the expiry date, local time.
        expired_at = datetime.combine(date.fromisoformat(expires_on), time.min, program.timezone)
        at = PostingRef(effective_at=iso(expired_at), created_at=iso(now), rules_version=program.version,
                        ref=f"expiry:{lot_id}")
        ledger.post(conn, member_id, lot_id, "expiry", -remaining, accounts.EXPIRY, at)
        events.emit(conn, "points.expired", member_id, {"lot_id": lot_id, "points": remaining,
                                                        "expires_on": expires_on}, expired_at,
                    once_key=f"expired:{lot_id}")
    return Batch(len(rows), (rows[-1][2], rows[-1][0]) if rows else after)


def release_holds(conn, now: datetime) -> list[tuple]:
    """Releases the open holds that have expired: (member, points, store, register, receipt, expires_at) each."""
    return conn.execute("UPDATE holds SET status = 'released', closed_at = expires_at "
                        "WHERE status = 'open' AND expires_at <= ? "
                        "RETURNING member_id, points, store_id, register_id, receipt_id, expires_at",
                        (iso(now),)).fetchall()


def birthday_batch(conn, program: Program, now: datetime, after: int = MEMBERS_START) -> Batch:
    """Members whose birthday is today (program timezone) get the birthday events once a year;
    a member merged into another is left out: no card reaches its points any more."""
    if not program.events_on("birthday"):
        return Batch(0, after)
    today = now.astimezone(program.timezone).date()
    days = [today.strftime("%m-%d")]
    if days[0] == "02-28" and not _leap(today.year):
        days.append("02-29")
    occasion = f"birthday:{today.year}"
    born = (f"substr(birthday, 6) IN ({','.join('?' * len(days))}) AND m.merged_into IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM event_fires e WHERE e.member_id = m.id AND e.occasion = ?)")
    rows = conn.execute(f"SELECT id FROM members m WHERE {born} AND m.id > ? ORDER BY m.id LIMIT ?",
                        (*days, occasion, after, BATCH_ROWS_MAX)).fetchall()
    due = [member_id for (member_id,) in rows]
    if ledger.lock_members(conn, due):
        # Read before the locks (PostgreSQL): a member merged meanwhile would be credited
        # where no card reaches its points, one erased meanwhile has no birthday any more.
        marks = ", ".join("?" * len(due))
        due = [r[0] for r in conn.execute(f"SELECT id FROM members m WHERE {born} AND m.id IN ({marks}) "
                                          "ORDER BY m.id", (*days, occasion, *due))]
    for member_id in due:
        fire_events(conn, program, member_id, "birthday", occasion, now)
        events.emit(conn, "birthday", member_id, {"date": today.isoformat()}, now,
                    once_key=f"birthday:{today.year}:{member_id}")
    return Batch(len(rows), rows[-1][0] if rows else after)


def expiring_batch(conn, program: Program, now: datetime, after: tuple[str, int] = LOTS_START,
                   days: int = EXPIRING_DAYS_BEFORE) -> Batch:
    """points.expiring for lots with points left that expire within `days` days, once per lot
    (the event's once_key); counts the lots it announced."""
    today = now.astimezone(program.timezone).date()
    rows = conn.execute(
        "SELECT l.id, l.member_id, l.expires_on, l.remaining FROM lots l WHERE l.expiry_done = 0 "
        "AND l.remaining > 0 AND l.expires_on > ? AND l.expires_on <= ? AND (l.expires_on, l.id) > (?, ?) "
        "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.once_key = 'expiring:' || l.id) "
        "ORDER BY l.expires_on, l.id LIMIT ?",
        (today.isoformat(), (today + timedelta(days=days)).isoformat(), *after, BATCH_ROWS_MAX)).fetchall()
    due = rows
    if ledger.lock_members(conn, [r[1] for r in rows]):
        # Read before the locks (PostgreSQL): a receipt may have spent from a lot since, or a
        # merge moved it; and an erasure that committed meanwhile would find no event of this
        # batch to scrub, which would then name the member erased (its card, its CRM fields).
        marks = ", ".join("?" * len(rows))
        left = dict(conn.execute(f"SELECT id, remaining FROM lots WHERE id IN ({marks}) AND expiry_done = 0",
                                 [r[0] for r in rows]).fetchall())
        due = [(lot_id, member_id, expires_on, left[lot_id]) for lot_id, member_id, expires_on, _ in rows
               if left.get(lot_id, 0) > 0]
    for lot_id, member_id, expires_on, remaining in due:
        events.emit(conn, "points.expiring", member_id, {"lot_id": lot_id, "points": remaining,
                                                         "expires_on": expires_on}, now,
                    once_key=f"expiring:{lot_id}")
    return Batch(len(rows), (rows[-1][2], rows[-1][0]) if rows else after)


JOBS = ((expire_batch, "expired_lots", LOTS_START), (birthday_batch, "birthday_events", MEMBERS_START))


def jobs(expiring_days: int) -> tuple:
    """JOBS and the points.expiring announcements, `expiring_days` ahead."""
    def expiring(conn, program, now, after):
        return expiring_batch(conn, program, now, after, expiring_days)
    return JOBS + ((expiring, "expiring_lots", LOTS_START),)


@dataclass
class Preview:
    """What one job would do: counts and totals of all of it, the first lines of it."""
    job: str                # as run_all names it: expired_lots, birthday_events, released_holds
    rows: int = 0           # what run_all would count
    postings: int = 0
    points: int = 0         # sum of the postings; for holds, the points they release
    lines: list[str] = field(default_factory=list)
    lines_left_out: int = 0

    def add(self, line: str) -> None:
        if len(self.lines) < PREVIEW_LINES_MAX:
            self.lines.append(line)
        else:
            self.lines_left_out += 1


def preview_all(conn, program: Program, now: datetime, expiring_days: int = EXPIRING_DAYS_BEFORE) -> list[Preview]:
    """What run_all would do as of `now`, on a connection of its own (open_for_preview)."""
    previews = []
    for job, key, start in jobs(expiring_days):
        preview, after = Preview(key), start
        while True:
            batch, posted = _undone(conn, lambda: job(conn, program, now, after))
            preview.rows += batch.rows
            _add_postings(preview, posted)
            after = batch.after
            if batch.rows < BATCH_ROWS_MAX:
                break
        previews.append(preview)
    released, _ = _undone(conn, lambda: release_holds(conn, now))
    previews.append(_holds_preview(released))
    return previews


def open_for_preview(path, busy_wait_seconds: float):
    """A connection to an existing database for preview_all."""
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, timeout=busy_wait_seconds)
    conn.execute("PRAGMA foreign_keys=ON")
    # Pages changed by a batch stay in memory until it is rolled back, never in the WAL.
    conn.execute("PRAGMA cache_spill=OFF")
    return conn


def _undone(conn, work: Callable[[], object]) -> tuple[object, list[tuple]]:
    """work()'s result and the postings it made, read before all it wrote is rolled back."""
    # IMMEDIATE: the write lock from the start, so a commit by the server cannot come between
    # this transaction's first read and its first write. PostgreSQL: one snapshot throughout,
    # so what the servers commit meanwhile is not read as this batch's postings.
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if is_postgresql(conn) else "BEGIN IMMEDIATE")
    try:
        last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM postings").fetchone()[0]
        result = work()
        posted = conn.execute(
            "SELECT p.member_id, p.lot_id, p.kind, p.points, p.rule_id, l.expires_on FROM postings p "
            "JOIN lots l ON l.id = p.lot_id WHERE p.id > ? ORDER BY p.id", (last,)).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return result, posted


def _add_postings(preview: Preview, posted: list[tuple]) -> None:
    for member_id, lot_id, kind, points, rule_id, expires_on in posted:
        preview.postings += 1
        preview.points += points
        rule = f", {rule_id}" if rule_id else ""
        expiry = f" (lot expires_on {expires_on})" if expires_on else ""
        preview.add(f"{member_public_id(member_id)} lot {lot_id}: {kind} {points:+d} points{rule}{expiry}")


def _holds_preview(released: list[tuple]) -> Preview:
    preview = Preview("released_holds", rows=len(released))
    for member_id, points, store_id, register_id, receipt_id, expires_at in released:
        preview.points += points
        preview.add(f"{member_public_id(member_id)} hold {store_id}/{register_id}/{receipt_id}: "
                    f"{points} points (expired {expires_at})")
    return preview


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


async def schedule(db: Database, holder, clock, interval_seconds: float,
                   expiring_days: int = EXPIRING_DAYS_BEFORE) -> None:
    """Runs the jobs inside the server, every interval, with the server's clock; in one
    server at a time where several share a database (db.runs_jobs)."""
    while True:
        try:
            if not await asyncio.to_thread(db.runs_jobs):
                await asyncio.sleep(interval_seconds)
                continue
            done = await run_all(db, holder.current, clock.now(), expiring_days)
            if any(done.values()):
                log.info("jobs: %s", done)
        except StorageError as e:   # a full disk or a lock: storage logs the cause itself, once
            log.warning("lifecycle jobs skipped (%s: %s); retrying in %s s", e.cause, e, interval_seconds)
        except Exception:      # a failed round is retried at the next interval
            log.exception("lifecycle jobs failed; retrying in %s s", interval_seconds)
        await asyncio.sleep(interval_seconds)
