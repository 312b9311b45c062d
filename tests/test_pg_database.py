"""The PostgreSQL backend's Database (storage/pg/database.py): a write is committed before its
caller hears of it, a failing one leaves nothing, and while PostgreSQL is down (a restart, a
failover) writes fail with 503 storage_unavailable until it is back, when they work again
without restarting the server."""
from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from server.errors import error_answer
from storage.db import Grouped, Ready
from storage.health import StorageUnavailable
from storage.pg.database import RECONNECT_GAP_S

BACK_WITHIN_S = 30      # generous: the machine is shared


def put(conn, value: str) -> int:
    return conn.execute("INSERT INTO event_fires (member_id, event_id, occasion, created_at) "
                        "VALUES (1, ?, 'x', 'now')", (value,)).rowcount


def names(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT event_id FROM event_fires ORDER BY event_id")]


async def test_a_write_is_committed_and_a_failing_one_leaves_nothing(pg_database):
    assert await pg_database.write(lambda conn: put(conn, "a")) == 1

    def fails(conn):
        put(conn, "b")
        raise ValueError("refused after writing")
    with pytest.raises(ValueError):
        await pg_database.write(fails)
    assert await pg_database.read(names) == ["a"]
    assert pg_database.read_sync(names) == ["a"]
    assert await pg_database.write_grouped(Grouped(lambda conn, group: Ready("known"), lambda conn, plans: [])) == "known"


async def test_while_postgresql_is_down_writes_answer_storage_unavailable_then_work_again(pg_database, pg_cluster):
    await pg_database.write(lambda conn: put(conn, "before"))
    pg_cluster.stop_server()
    try:
        with pytest.raises(StorageUnavailable) as refused:
            await pg_database.write(lambda conn: put(conn, "while down"))
        status, body, headers = error_answer(refused.value, "POST", "confirm")
        assert status == 503 and headers == {"Retry-After": "1"}
        assert msgspec.json.decode(body)["error"]["code"] == "storage_unavailable"
    finally:
        pg_cluster.start_server()
    deadline = time.monotonic() + BACK_WITHIN_S
    while True:
        try:
            await pg_database.write(lambda conn: put(conn, "after"))
            break
        except StorageUnavailable:
            assert time.monotonic() < deadline, "writes did not work again after PostgreSQL came back"
            await asyncio.sleep(RECONNECT_GAP_S / 4)
    assert await pg_database.read(names) == ["after", "before"]
