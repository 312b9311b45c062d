"""The events' fan-out to webhooks on PostgreSQL, where several writers commit events out of
id order: an event whose transaction commits after a later-numbered one was already sent is
still delivered, signed, to the receiver; an event rolled back leaves nothing to fan out; the
events a webhook's cursor had not passed before the upgrade to the queue are still owed.

The interleaving is made certain, not hoped for: one connection holds its event's
transaction open while another commits a later one and the dispatcher sends it. Each test
gets an empty database of a throwaway cluster (tests/pg_cluster.py) and skips, saying why,
without PostgreSQL.
"""
from __future__ import annotations

import asyncio
import time
from datetime import datetime

import aiohttp
import msgspec
import pytest

from conftest import test_config
from server.config import EventsConfig, WebhookConfig
from server.metrics import Metrics
from server.webhooks import Dispatcher
from storage import events
from storage.pg import schema as pg_schema
from storage.pg.connection import connect
from storage.pg.database import PgDatabase
from storage.pg.schema import MIGRATIONS, migrate
from test_webhooks import SECRET, Receiver, check_signed

NOW = datetime.fromisoformat("2026-11-24T12:00:05+02:00")
ROUNDS_WITHIN_S = 30        # generous: the machine is shared


class Clock:
    def now(self) -> datetime:
        return NOW


@pytest.fixture
async def receiver():
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def dispatcher(db: PgDatabase, receiver: Receiver | None, tmp_path) -> Dispatcher:
    config = test_config(tmp_path, "2026-11-24T12:00:05+02:00")
    hooks = [] if receiver is None else [msgspec.convert(
        {"id": "crm", "url": receiver.url, "secret": SECRET, "events": ["birthday"]}, WebhookConfig)]
    fast = EventsConfig(retry_initial_seconds=0.05, retry_max_seconds=0.3, poll_interval_seconds=0.02,
                        timeout_seconds=5)
    return Dispatcher(db, msgspec.structs.replace(config, webhooks=hooks, events=fast), Metrics(), Clock())


async def rounds_until(d: Dispatcher, done) -> None:
    """Dispatcher rounds, as the serving process runs them, until done() holds."""
    deadline = time.monotonic() + ROUNDS_WITHIN_S
    async with aiohttp.ClientSession() as session:
        gate = asyncio.Semaphore(4)
        while not done():
            assert time.monotonic() < deadline, "not delivered within the time allowed"
            await d.round(session, gate)
            await asyncio.sleep(0.02)


def birthday(conn, day: str) -> int:
    return events.emit(conn, "birthday", 1, {"date": day}, NOW)


def queued(url: str) -> list[int]:
    conn = connect(url)
    try:
        return [r[0] for r in conn.execute("SELECT event_id FROM event_fanout_pending ORDER BY event_id")]
    finally:
        conn.close()


async def test_an_event_committed_after_a_later_one_was_sent_is_still_delivered(pg_database, receiver, pg_url,
                                                                                 tmp_path):
    d = dispatcher(pg_database, receiver, tmp_path)
    await d.start()
    slow, quick = connect(pg_url), connect(pg_url)
    try:
        slow.execute("BEGIN")
        lower = birthday(slow, "2026-11-24")                    # numbered first, committed last
        higher = quick.transaction(lambda c: birthday(c, "2026-11-25"))
        assert lower < higher
        await rounds_until(d, lambda: [e["id"] for e in receiver.delivered] == [higher])
        assert queued(pg_url) == []                            # the open transaction's row is not seen yet
        slow.execute("COMMIT")
        await rounds_until(d, lambda: len(receiver.delivered) == 2)
    finally:
        slow.close()
        quick.close()
    assert [(e["id"], e["data"]["date"]) for e in receiver.delivered] == [(higher, "2026-11-25"),
                                                                          (lower, "2026-11-24")]
    check_signed(receiver)
    assert queued(pg_url) == []
    assert await pg_database.read(lambda c: c.execute("SELECT COUNT(*) FROM event_deliveries").fetchone()[0]) == 0


async def test_a_rolled_back_event_leaves_nothing_to_fan_out(pg_database, receiver, pg_url, tmp_path):
    d = dispatcher(pg_database, receiver, tmp_path)
    await d.start()
    conn = connect(pg_url)
    try:
        conn.execute("BEGIN")
        birthday(conn, "2026-11-24")
        conn.execute("ROLLBACK")
        kept = conn.transaction(lambda c: birthday(c, "2026-11-25"))
    finally:
        conn.close()
    assert queued(pg_url) == [kept]
    await rounds_until(d, lambda: len(receiver.delivered) == 1)
    assert [e["id"] for e in receiver.delivered] == [kept]
    assert queued(pg_url) == []


async def test_with_no_webhook_the_queue_is_emptied_so_events_can_go(pg_database, pg_url, tmp_path):
    """An installation without webhooks must not keep a queue row per event for ever."""
    d = dispatcher(pg_database, None, tmp_path)
    await d.start()
    await pg_database.write(lambda c: [birthday(c, "2026-11-24"), birthday(c, "2026-11-25")])
    await rounds_until(d, lambda: queued(pg_url) == [])


async def test_an_upgraded_database_still_owes_what_a_cursor_had_not_passed(pg_url, receiver, tmp_path,
                                                                            monkeypatch):
    """Events written before the queue existed, after the webhook's cursor, are fanned out
    by the queue; those the cursor had passed are not sent again."""
    conn = connect(pg_url)
    try:
        monkeypatch.setattr(pg_schema, "MIGRATIONS", [m for m in MIGRATIONS if m.name != "p009_event_fanout_queue"])
        migrate(conn)
        sent = conn.transaction(lambda c: birthday(c, "2026-11-23"))
        conn.execute("INSERT INTO event_fanout (webhook_id, after_id) VALUES ('crm', ?)", (sent,))
        owed = conn.transaction(lambda c: birthday(c, "2026-11-24"))
        monkeypatch.setattr(pg_schema, "MIGRATIONS", MIGRATIONS)
        assert migrate(conn) == ["p009_event_fanout_queue"]
    finally:
        conn.close()
    assert queued(pg_url) == [owed]
    db = PgDatabase(pg_url, connections=2)
    db.open()
    try:
        await rounds_until(dispatcher(db, receiver, tmp_path), lambda: len(receiver.delivered) == 1)
    finally:
        db.close()
    assert [e["id"] for e in receiver.delivered] == [owed]
