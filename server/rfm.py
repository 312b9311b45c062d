"""The daily segment job: RFM scores, then who is in each `rfm` and `when` segment.

Reading, scoring and evaluating the segments run on a reader connection and never hold the
write lock; each write batch is one short transaction on the writer thread (off the event
loop), so receipts are committed between batches. A run writes the scores and only the
membership that changed (storage/segments.py spans) under its run id and is marked finished
last: receipts read the newest finished run's scores and segments, never a half-written one.
"""
from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from datetime import date, datetime, tzinfo
from typing import NamedTuple

import msgspec

from rules.conditions import constants
from rules.segments import member_fact
from server.member_state import tier_since, tiers_at
from storage import member_care, segments
from storage.db import Database
from storage.ledger import iso

log = logging.getLogger("loyalty.jobs")


class RfmRun(NamedTuple):
    run_id: int
    scored: int
    seconds: float
    read_seconds: float         # reading, scoring and evaluating; the rest is writing and deleting the old run
    opened: int = 0             # memberships begun by this run
    closed: int = 0             # and ended


def settings_of(program) -> int | None:
    """The RFM window in days when the program defines segments (their RFM ranges read the
    scores, and a member's answer shows them), else None: nothing to score."""
    return program.segment_window_days if program.segments else None


def computed_segments(program) -> list:
    """The program's segments the job decides (`rfm` and `when`), in definition order."""
    return [s for s in program.segments.values() if s.kind in ("rfm", "when")]


def definitions_sha256(window_days: int, computed: list) -> str:
    """What a run's membership depends on besides the members' facts: a program that changes
    it gets a new run the same day, so a changed segment does not wait for tomorrow."""
    text = repr([window_days] + [(s.id, s.kind, sorted(s.rfm.items()), repr(s.condition), sorted(s.tag_fields.items()))
                                 for s in computed])
    return hashlib.sha256(text.encode()).hexdigest()


async def run(db: Database, window_days: int, tz: tzinfo, now: datetime, *, force: bool = False,
              program=None) -> RfmRun | None:
    """Scores every member with a receipt in the window and, given the program, decides its
    computed segments for every member; None when today's run was done already."""
    started = time.monotonic()
    today = now.astimezone(tz).date()
    computed = computed_segments(program) if program is not None else None
    digest = definitions_sha256(window_days, computed) if computed is not None else None
    if not force and not await db.read(lambda conn: segments.due(conn, today, digest)):
        return None

    def read(conn):
        heirs = member_care.heirs(conn)
        tiers = None
        if computed and reads(computed, "tier"):
            facts, tiers = segments.window_and_tier_facts(conn, today, window_days, tz, tier_since(program, now))
        else:
            facts = segments.window_facts(conn, today, window_days, tz)
        # A merge leaves the receipts on the member merged away; the customer is the member
        # its points went to, scored once with them. Tiers stay per member, as at the till.
        facts, monetary = segments.customers(facts, heirs)
        scores = segments.score_all(facts, today, monetary)
        if computed is None:
            return scores, segments.Changes([], [])
        members = membership(conn, program, computed, facts, scores, now, tiers, heirs)
        return scores, segments.changes(members, segments.open_spans(conn))
    # On a reader thread: sorting and evaluating a million members on the loop would stall requests.
    scores, changes = await db.read(read)
    read_seconds = time.monotonic() - started
    run_id = await db.write(lambda conn: segments.start_run(conn, today, window_days, now, digest), off_loop=True)
    await _write_batches(db, run_id, now, scores, changes)
    await db.write(lambda conn: segments.finish_run(conn, run_id, len(scores), now), off_loop=True)
    while await db.write(lambda conn: segments.delete_older_batch(conn, run_id), off_loop=True):
        pass
    done = RfmRun(run_id, len(scores), time.monotonic() - started, read_seconds, len(changes.opened),
                  len(changes.closed))
    log.info("rfm: run %s scored %s members, %s segment memberships begun and %s ended, in %.1f s (%.1f s reading)",
             done.run_id, done.scored, done.opened, done.closed, done.seconds, done.read_seconds)
    return done


async def _write_batches(db: Database, run_id: int, now: datetime, scores: list, changes: segments.Changes) -> None:
    step = segments.WRITE_BATCH_ROWS
    for i in range(0, len(scores), step):
        batch = scores[i:i + step]
        await db.write(lambda conn: segments.write_scores(conn, run_id, batch), off_loop=True)
    for i in range(0, max(len(changes.opened), len(changes.closed)), step):
        part = segments.Changes(changes.opened[i:i + step], changes.closed[i:i + step])
        await db.write(lambda conn: segments.write_changes(conn, run_id, now, part), off_loop=True)


# ------------------------------------------------------------------ membership

def reads(computed: list, field: str) -> bool:
    """Whether a `when` segment among them compares that member fact."""
    compared: dict[str, set] = {}
    for s in computed:
        if s.condition is not None:
            constants(s.condition, compared)
    return field in compared


def membership(conn: sqlite3.Connection, program, computed: list, facts: list[segments.Facts],
               scores: list[segments.Score], now: datetime,
               tier_metrics: dict[int, tuple[int, int]] | None = None,
               heirs: dict[int, int] | None = None) -> dict[str, set[int]]:
    """segment id -> its members at `now`, for each computed segment, from the facts and
    scores by customer (segments.customers). tier_metrics: what segments.tier_metrics
    answers for the tier at `now`, when already read; heirs: member_care.heirs, when read.
    A member merged away is in none (its customer is its heir), nor is an erased one: no
    card reaches either, and a segment counts customers the program can still reach; an
    erased member's receipts still count in everyone else's scores."""
    heirs = member_care.heirs(conn) if heirs is None else heirs
    erased = segments.erased_members(conn)
    out: dict[str, set[int]] = {s.id: set() for s in computed}
    by_rfm = [(s, out[s.id]) for s in computed if s.kind == "rfm"]
    if by_rfm:
        for score in scores:
            if score.member_id in erased:
                continue
            triple = (score.r, score.f, score.m)
            for s, inside in by_rfm:
                if s.holds_rfm(triple):
                    inside.add(score.member_id)
    by_when = [(s, out[s.id]) for s in computed if s.kind == "when"]
    if by_when:
        gone = erased.union(heirs)
        for member_id, base, tags in when_facts(conn, program, [s for s, _ in by_when], facts, now, tier_metrics,
                                                heirs, gone):
            for s, inside in by_when:
                if s.holds_fact(base, tags):
                    inside.add(member_id)
    return out


def when_facts(conn: sqlite3.Connection, program, by_when: list, facts: list[segments.Facts], now: datetime,
               tier_metrics: dict[int, tuple[int, int]] | None = None, heirs: dict[int, int] | None = None,
               gone: set[int] | frozenset[int] = frozenset()):
    """(member id, member_fact, tags) of every member at `now` but those in `gone`, over the
    program's window, as a `when` segment reads them; the facts no segment reads are left at
    their defaults. The purchase facts are the customer's (facts by customer, and the last
    purchase before the window of any member merged into it: heirs); tier, tags and
    enrolment stay the member's own, as a receipt at the till reads them."""
    tz, today = program.timezone, now.astimezone(program.timezone).date()
    window = {f.member_id: f for f in facts}
    members = segments.member_records(conn)
    tiers = tiers_at(conn, program, members, now, metrics=tier_metrics) if reads(by_when, "tier") else {}
    older = {}
    if reads(by_when, "days_since_last_purchase"):
        older = segments.latest_by_customer(
            segments.last_purchases(conn, iso(segments.window_start(today, program.segment_window_days, tz))),
            heirs or {})
    local_day = segments.local_days(tz)
    with_tags = any(s.tag_fields for s in by_when)
    no_tags: frozenset[str] = frozenset()
    for m in members:
        if m.member_id in gone:
            continue
        f = window.get(m.member_id)
        last = f.last_date if f else (local_day(older[m.member_id]) if m.member_id in older else None)
        yield m.member_id, member_fact(
            tiers.get(m.member_id, ""), _days(today, last), f.receipts if f else 0, f.spend if f else 0,
            _days(today, local_day(m.enrolled_at))), \
            frozenset(msgspec.json.decode(m.tags)) if with_tags and m.tags != "[]" else no_tags


def _days(today: date, day: date | None) -> int | None:
    return None if day is None else (today - day).days
