"""Failover on PostgreSQL: a primary with a synchronous streaming standby, the server's
storage on a URL naming both hosts with target_session_attrs=read-write. Under a steady
stream of writes the primary is killed (SIGKILL, nothing flushed) and the standby promoted
with pg_ctl promote. Meanwhile writes fail with 503 storage_unavailable; afterwards they
work again on the promoted standby without restarting anything, and every write that was
acknowledged before the kill is there."""
from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from storage.health import StorageUnavailable
from storage.pg.database import RECONNECT_GAP_S, PgDatabase

WRITERS = 4
# Acknowledged writes wanted before the kill and after the promotion: enough to be sure the
# stream was flowing on both sides.
ACKS_BEFORE = 40
ACKS_AFTER = 40
# Generous: the machine is shared, a promotion takes a second or two.
DEADLINE_S = 90


def put(key: str):
    def write(conn):
        # A retry of a write whose COMMIT's answer was lost finds it there: idempotent, as a
        # receipt's key is.
        conn.execute("INSERT INTO event_fires (member_id, event_id, occasion, created_at) "
                     "VALUES (1, ?, 'failover', 'now') ON CONFLICT DO NOTHING", (key,))
    return write


def stored(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT event_id FROM event_fires WHERE occasion = 'failover'")}


async def test_no_acknowledged_write_is_lost_when_the_standby_is_promoted(pg_pair):
    db = PgDatabase(pg_pair.url(), connections=WRITERS)
    db.open()
    acked: list[str] = []
    refused = 0
    names = itertools.count()
    phase = {"killed": False}
    acked_after = 0

    async def writer() -> None:
        nonlocal refused, acked_after
        key = f"w{next(names)}"
        while not stop.is_set():
            try:
                await db.write(put(key))
            except StorageUnavailable:
                refused += 1
                await asyncio.sleep(RECONNECT_GAP_S / 4)
                continue        # the same key again: it may have been committed
            acked.append(key)
            if phase["killed"]:
                acked_after += 1
            key = f"w{next(names)}"

    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer()) for _ in range(WRITERS)]
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(acked) < ACKS_BEFORE:
            assert time.monotonic() < deadline, f"only {len(acked)} writes before the kill"
            await asyncio.sleep(0.05)
        pg_pair.primary.kill()
        phase["killed"] = True
        acked_before_kill = list(acked)
        await asyncio.sleep(1)
        await asyncio.to_thread(pg_pair.promote)
        while acked_after < ACKS_AFTER:
            assert time.monotonic() < deadline, (
                f"writes did not resume on the promoted standby ({acked_after} after the kill)")
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    try:
        there = await db.read(stored)
    finally:
        db.close()
    assert refused > 0, "no write was refused while there was no primary"
    lost = [k for k in acked_before_kill if k not in there]
    assert not lost, f"{len(lost)} acknowledged writes lost at failover: {lost[:5]}"
    assert set(acked) <= there
