"""A warehouse pulling events (GET /v1/admin/events?after=) from a server on PostgreSQL,
where several writers take event ids in one order and commit in another: an event that
commits after a later-numbered one is still handed out, on a later page; no page hands
out an id at or below a `next_after` already answered; a rolled-back id blocks nothing;
a pull waiting for the writers in flight holds up no receipt for long, and a warehouse
catching up below the id settled before holds up none.

The interleavings are made certain, not hoped for: one connection holds its event's
transaction open while another commits a later one and the pull is made. Each test gets an
empty database of a throwaway cluster (tests/pg_cluster.py) and skips, saying why, without
PostgreSQL.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import msgspec
import pytest
from conftest import Api, test_config
from test_crash_safety import NOW

from server.app import create_app
from server.config import DatabaseConfig
from storage import events
from storage.pg.connection import connect
from storage.pg.schema import EVENTS_WRITERS_LOCK_KEY, migrate

WITHIN_S = 30               # generous: the machine is shared
WRITERS = 4
TRANSACTIONS_EACH = 30


@pytest.fixture
async def api(aiohttp_client, tmp_path, pg_url):
    config = msgspec.structs.replace(test_config(tmp_path, NOW), database=DatabaseConfig(url=pg_url))
    return Api(await aiohttp_client(create_app(config)))


@pytest.fixture
def conns(pg_url):
    opened = []

    def open_one():
        opened.append(connect(pg_url))
        return opened[-1]
    yield open_one
    for conn in opened:
        conn.close()


def birthday(conn, day: str) -> int:
    return events.emit(conn, "birthday", 1, {"date": day}, NOW)


async def pull(api: Api, after: int, limit: int = 100) -> tuple[list[int], int]:
    status, page = await api.get(f"/v1/admin/events?after={after}&limit={limit}")
    assert status == 200, page
    return [e["id"] for e in page["events"]], page["next_after"]


async def test_an_event_committed_after_a_later_one_is_pulled_on_a_later_page(api, conns):
    first = conns().transaction(lambda c: birthday(c, "2026-11-23"))
    assert await pull(api, 0) == ([first], first)
    slow, quick = conns(), conns()
    slow.execute("BEGIN")
    lower = birthday(slow, "2026-11-24")                        # numbered first, committed last
    higher = quick.transaction(lambda c: birthday(c, "2026-11-25"))
    assert first < lower < higher
    # The committed `higher` is not handed out while `lower` may still commit below it.
    assert await pull(api, 0) == ([first], first)
    assert await pull(api, first) == ([], first)
    slow.execute("COMMIT")
    assert await pull(api, first) == ([lower, higher], higher)
    assert await pull(api, higher) == ([], higher)


async def test_a_rolled_back_event_leaves_no_hole_that_stops_the_pull(api, conns):
    conn = conns()
    conn.execute("BEGIN")
    gone = birthday(conn, "2026-11-24")
    conn.execute("ROLLBACK")
    kept = conn.transaction(lambda c: birthday(c, "2026-11-25"))
    assert gone < kept
    assert await pull(api, 0) == ([kept], kept)
    assert await pull(api, kept) == ([], kept)


def test_a_writer_takes_its_event_id_only_after_a_pull_lets_go(conns):
    """The trigger's lock comes before the row's id: an id taken before it would be a
    writer the pull cannot see, free to commit below the id the pull settles."""
    pulling, writer = conns(), conns()
    migrate(pulling)
    pulling.execute("BEGIN")
    pulling.execute("SELECT pg_advisory_xact_lock(?)", (EVENTS_WRITERS_LOCK_KEY,))
    written: list[int] = []
    thread = threading.Thread(target=lambda: written.append(writer.transaction(lambda c: birthday(c, "2026-11-24"))))
    thread.start()
    try:
        time.sleep(0.5)
        assert thread.is_alive() and written == []
        newest = pulling.execute("SELECT pg_sequence_last_value(pg_get_serial_sequence('events', 'id'))").fetchone()[0]
        assert newest is None                                   # no id handed out while the pull holds the lock
    finally:
        pulling.execute("COMMIT")
        thread.join(WITHIN_S)
    assert not thread.is_alive() and written == [1]


async def test_a_pull_waits_for_a_long_transaction_only_briefly_and_so_does_a_receipt(api, conns):
    """A transaction writing events stays open (an import, say): the pull answers what was
    settled before it, and an event written meanwhile commits without waiting for either."""
    first = conns().transaction(lambda c: birthday(c, "2026-11-23"))
    assert await pull(api, 0) == ([first], first)
    slow, meanwhile = conns(), conns()
    slow.execute("BEGIN")
    lower = birthday(slow, "2026-11-24")
    started = time.monotonic()
    page, written = await asyncio.gather(
        pull(api, 0), asyncio.to_thread(meanwhile.transaction, lambda c: birthday(c, "2026-11-25")))
    assert time.monotonic() - started < WITHIN_S
    assert page == ([first], first)
    slow.execute("COMMIT")
    assert await pull(api, first) == (sorted([lower, written]), max(lower, written))


async def test_a_warehouse_catching_up_below_the_settled_id_makes_no_writer_wait(api, conns, monkeypatch):
    """Only a page that reaches the id settled last settles anew (the moment every writer
    of events waits for): the pages below it are read as they are."""
    conn = conns()
    written = [conn.transaction(lambda c: birthday(c, "2026-11-24")) for _ in range(10)]
    assert await pull(api, 0, limit=100) == (written, written[-1])
    settling = []
    settled_now = events.settled_now
    monkeypatch.setattr(events, "settled_now", lambda c: settling.append(1) or settled_now(c))
    after, handed = 0, []
    for _ in range(3):
        ids, after = await pull(api, after, limit=3)
        handed += ids
    assert handed == written[:9] and settling == []
    assert await pull(api, after, limit=3) == (written[9:], written[9])
    assert settling == [1]


def write_events(conn, committed: list[int], seed: int) -> None:
    """Transactions that take an event id, wait a moment and commit, or roll back (one in five)."""
    rng = random.Random(seed)
    for _ in range(TRANSACTIONS_EACH):
        conn.execute("BEGIN")
        event_id = birthday(conn, "2026-11-24")
        time.sleep(rng.uniform(0, 0.02))
        if rng.random() < 0.2:
            conn.execute("ROLLBACK")
        else:
            conn.execute("COMMIT")
            committed.append(event_id)


async def test_pulling_while_writers_commit_out_of_order_hands_out_every_event_once_in_order(api, conns):
    committed: list[int] = []
    writers = [threading.Thread(target=write_events, args=(conns(), committed, seed)) for seed in range(WRITERS)]
    for w in writers:
        w.start()
    handed: list[int] = []
    after, deadline = 0, time.monotonic() + WITHIN_S

    async def one_page() -> list[int]:
        nonlocal after
        ids, next_after = await pull(api, after, limit=7)
        assert all(i > after for i in ids) and ids == sorted(ids) and next_after == (ids[-1] if ids else after)
        handed.extend(ids)
        after = next_after
        return ids

    try:
        while any(w.is_alive() for w in writers):
            assert time.monotonic() < deadline, "the writers did not finish within the time allowed"
            await one_page()
            await asyncio.sleep(0.005)
    finally:
        for w in writers:
            w.join(WITHIN_S)
    while await one_page():
        pass
    assert len(committed) > WRITERS * TRANSACTIONS_EACH // 2
    assert handed == sorted(committed)
