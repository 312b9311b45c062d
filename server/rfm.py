"""The daily RFM job: reads on a reader connection, writes its scores in batches.

Reading and scoring never hold the write lock; each write batch is one short transaction
on the writer thread (off the event loop), so receipts are committed between batches.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, tzinfo
from typing import NamedTuple

from storage import segments
from storage.db import Database

log = logging.getLogger("loyalty.jobs")


class RfmRun(NamedTuple):
    run_id: int
    scored: int
    seconds: float
    read_seconds: float         # reading and scoring; the rest is writing and deleting the old run


def settings_of(program) -> int | None:
    """The RFM window in days when the program defines segments (their RFM ranges read the
    scores, and a member's answer shows them), else None: nothing to score."""
    return program.segment_window_days if program.segments else None


async def run(db: Database, window_days: int, tz: tzinfo, now: datetime, *, force: bool = False) -> RfmRun | None:
    """Scores every member with a receipt in the window; None when today's run was done already."""
    started = time.monotonic()
    today = now.astimezone(tz).date()
    if not force and not await db.read(lambda conn: segments.due(conn, today)):
        return None
    # Scored on the reader thread too: sorting a million values on the loop would stall requests.
    scores = await db.read(lambda conn: segments.score_all(segments.window_facts(conn, today, window_days, tz), today))
    read_seconds = time.monotonic() - started
    run_id = await db.write(lambda conn: segments.start_run(conn, today, window_days, now), off_loop=True)
    step = segments.WRITE_BATCH_ROWS
    for i in range(0, len(scores), step):
        batch = scores[i:i + step]
        await db.write(lambda conn: segments.write_scores(conn, run_id, batch), off_loop=True)
    await db.write(lambda conn: segments.finish_run(conn, run_id, len(scores), now), off_loop=True)
    while await db.write(lambda conn: segments.delete_older_batch(conn, run_id), off_loop=True):
        pass
    done = RfmRun(run_id, len(scores), time.monotonic() - started, read_seconds)
    log.info("rfm: run %s scored %s members in %.1f s (%.1f s reading)", done.run_id, done.scored, done.seconds,
             done.read_seconds)
    return done
