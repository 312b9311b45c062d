"""storage.db on the event loop's own thread: read_now() and the loop-side group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from storage.db import StorageClosed
from test_storage_writer import insert_receipt, notes, open_db  # noqa: F401 - open_db is a fixture

pytestmark = pytest.mark.sqlite_only(reason="storage/db.py's inline writes on SQLite's one write connection")


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


def where(note: str, threads: dict[str, threading.Thread]):
    def fn(conn: sqlite3.Connection) -> int:
        threads[note] = threading.current_thread()
        return insert_receipt(note)(conn)

    return fn


async def test_write_functions_run_on_the_loop_unless_marked_off_loop(open_db):
    db = open_db()
    threads: dict[str, threading.Thread] = {}
    await asyncio.gather(
        db.write(where("loop1", threads)),
        db.write(where("job", threads), off_loop=True),
        db.write(where("loop2", threads)),
    )
    here = threading.current_thread()
    assert threads["loop1"] is here and threads["loop2"] is here
    assert threads["job"] is not here
    # Queue order is commit order, whichever thread ran the function.
    assert await db.read(notes) == ["loop1", "job", "loop2"]


async def test_writes_from_the_loop_and_from_a_thread_mix(open_db):
    sizes: list[int] = []
    db = open_db(on_commit=lambda batch_size, seconds: sizes.append(batch_size))

    def from_thread() -> list[int]:
        return [db.write_sync(insert_receipt(f"t{i}")) for i in range(50)]

    async def from_loop() -> list[int]:
        return [await db.write(insert_receipt(f"l{i}")) for i in range(50)]

    by_thread, by_loop, *grouped = await asyncio.gather(
        asyncio.to_thread(from_thread), from_loop(), *(db.write(insert_receipt(f"g{i}")) for i in range(100)))
    ids = by_thread + by_loop + grouped
    assert len(set(ids)) == 200
    assert sum(sizes) == 200 and max(sizes) > 1
    assert len(await db.read(notes)) == 200


async def test_write_lock_held_by_another_process_does_not_stall_the_loop(open_db):
    db = open_db()
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO receipts (note) VALUES ('other')")
    try:
        waiting = asyncio.create_task(db.write(insert_receipt("ours")))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.005)
            ticks += 1
        # The loop kept running while the write waited for the lock.
        assert ticks == 20 and not waiting.done()
        other.execute("COMMIT")
    finally:
        other.close()
    assert await asyncio.wait_for(waiting, 10) > 0
    assert await db.read(notes) == ["other", "ours"]
    # Later writes run on the loop again.
    threads: dict[str, threading.Thread] = {}
    await db.write(where("after", threads))
    assert threads["after"] is threading.current_thread()


async def test_close_on_the_loop_commits_writes_whose_turn_had_not_come(open_db):
    db = open_db()
    queued = [asyncio.ensure_future(db.write(insert_receipt(f"q{i}"))) for i in range(3)]
    await asyncio.sleep(0)  # the writes are queued; their batch is scheduled on this loop
    db.close()  # blocks this loop: the writer thread must commit them itself
    assert len(await asyncio.gather(*queued)) == 3
    assert await open_db().read(notes) == ["q0", "q1", "q2"]
