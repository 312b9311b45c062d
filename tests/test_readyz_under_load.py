"""/readyz answers 503 only for a fault (a storage fault in force, starting, draining), never
because the write queue is deep: a load balancer must not pull a healthy instance for being
busy. It writes nothing itself, so a probe never waits in the queue nor counts as a refused
write later; and a lock another program has released stops being reported without a write.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from server.keys import DATABASE
from storage.db import StorageBusy
from test_storage_writer import WriterGate, insert_receipt, notes, open_db  # noqa: F401 - open_db is a fixture

pytestmark = pytest.mark.sqlite_only(reason="the write turn and busy codes of SQLite's one write connection "
                                     "(storage/db.py)")

NOW = "2026-11-24T12:00:05+02:00"
QUEUED = 500


def count_members(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM members").fetchone()[0]


async def test_readyz_stays_200_while_the_write_turn_is_held_and_the_queue_is_deep(make_api):
    api = await make_api(now=NOW)
    db = api.client.server.app[DATABASE]
    gate = WriterGate()
    held = await gate.close_on(db)                   # a long write holds the write turn
    queued = [asyncio.ensure_future(db.write(count_members)) for _ in range(QUEUED)]
    try:
        await asyncio.sleep(0)
        for _ in range(3):                            # several probes, each past the old 1 s limit
            started = time.monotonic()
            status, body = await api.get("/readyz", as_=None)
            assert status == 200, body
            assert body["write_queue"] >= QUEUED
            assert time.monotonic() - started < 5
            await asyncio.sleep(1.2)
    finally:
        gate.release.set()
    await held
    assert len(await asyncio.gather(*queued)) == QUEUED
    status, text = await api.get("/metrics", as_="monitor")
    for cause in ("full", "busy", "lost"):
        assert f'loyalty_storage_errors_total{{cause="{cause}"}} 0.0' in text
    # The queue drains; a background write (the daily job, the events dispatcher) may still
    # be passing through it for a moment.
    for _ in range(50):
        status, body = await api.get("/readyz", as_=None)
        assert status == 200, body
        if body["write_queue"] == 0:
            break
        await asyncio.sleep(0.1)
    assert body["write_queue"] == 0


async def test_busy_recovery_from_begin_on_the_loop_waits_for_the_lock_instead_of_failing(open_db, monkeypatch):
    """SQLITE_BUSY_RECOVERY (another process recovering the WAL after a crash) is busy too:
    the batch moves to the writer thread and waits there, as for plain SQLITE_BUSY."""
    db = open_db()
    real_begin = db._begin
    refused = []

    def begin(conn: sqlite3.Connection, wait_ms: int) -> None:
        if wait_ms == 0 and not refused:             # the loop's attempt, which never waits
            refused.append(wait_ms)
            err = sqlite3.OperationalError("database is locked")
            err.sqlite_errorcode = sqlite3.SQLITE_BUSY_RECOVERY
            raise err
        real_begin(conn, wait_ms)

    monkeypatch.setattr(db, "_begin", begin)
    assert await asyncio.wait_for(db.write(insert_receipt("waited")), 10) > 0
    assert refused and db.read_now(notes) == ["waited"]


def test_busy_codes_are_told_by_their_primary_code():
    from storage.health import classify, is_busy

    def error(code: int) -> sqlite3.OperationalError:
        err = sqlite3.OperationalError("x")
        err.sqlite_errorcode = code
        return err

    for code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_BUSY_RECOVERY, sqlite3.SQLITE_BUSY_SNAPSHOT,
                 sqlite3.SQLITE_BUSY_TIMEOUT):
        assert is_busy(error(code))
        assert isinstance(classify(error(code), lambda: False), StorageBusy)
    for code in (sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        assert not is_busy(error(code))
    assert not is_busy(OSError("x"))
