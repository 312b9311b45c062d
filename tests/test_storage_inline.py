"""storage.db on the event loop's own thread: read_now() and the loop-side group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from storage.db import StorageClosed
from test_storage_writer import insert_receipt, notes, open_db  # noqa: F401 - open_db is a fixture


async def test_read_now_sees_acknowledged_writes_in_the_calling_thread(open_db):
    db = open_db()
    await db.write(insert_receipt("first"))
    seen_in: list[threading.Thread] = []

    def read(conn: sqlite3.Connection) -> list[str]:
        seen_in.append(threading.current_thread())
        return notes(conn)

    assert db.read_now(read) == ["first"]
    assert seen_in == [threading.current_thread()]
    await db.write(insert_receipt("second"))
    assert db.read_now(notes) == ["first", "second"]


async def test_read_now_is_one_snapshot_and_read_only(open_db):
    db = open_db()
    await db.write(insert_receipt("a"))

    def two_reads(conn: sqlite3.Connection) -> tuple[int, int]:
        first = conn.execute("SELECT count(*) FROM receipts").fetchone()[0]
        # A write committed by another connection between the two SELECTs stays invisible.
        other = sqlite3.connect(db.path, isolation_level=None)
        other.execute("INSERT INTO receipts (note) VALUES ('b')")
        other.close()
        return first, conn.execute("SELECT count(*) FROM receipts").fetchone()[0]

    assert db.read_now(two_reads) == (1, 1)
    assert db.read_now(notes) == ["a", "b"]
    with pytest.raises(sqlite3.OperationalError):
        db.read_now(lambda conn: conn.execute("INSERT INTO receipts (note) VALUES ('x')"))
    # A failed read function leaves no transaction behind.
    with pytest.raises(ZeroDivisionError):
        db.read_now(lambda conn: 1 / 0)
    assert db.read_now(notes) == ["a", "b"]


async def test_read_now_refuses_nesting_and_a_closed_database(open_db):
    db = open_db()
    with pytest.raises(RuntimeError, match="nested"):
        db.read_now(lambda conn: db.read_now(notes))
    assert db.read_now(notes) == []
    db.close()
    with pytest.raises(StorageClosed):
        db.read_now(notes)


async def test_read_now_works_without_an_event_loop_too(open_db):
    db = open_db()
    await db.write(insert_receipt("cli"))
    answer = await asyncio.to_thread(db.read_now, notes)
    assert answer == ["cli"]
