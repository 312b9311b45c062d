"""storage.db: migrations, group commit, per-item rollback, back-pressure, shutdown, durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlite_utils.migrations import Migrations

from storage.db import Database, Overloaded, StorageClosed, TransactionLost

pytestmark = pytest.mark.sqlite_only(reason="the SQLite write connection's group commit, queue and "
                                     "checkpoints (storage/db.py)")

REPO_ROOT = Path(__file__).resolve().parents[1]
GATE_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 10.0

# Names of migrations as they run, so a test can tell "recorded" from "ran again".
MIGRATIONS_RUN: list[str] = []


def make_migrations() -> Migrations:
    migrations = Migrations("storage_writer_test")

    @migrations()
    def create_receipts(db):
        MIGRATIONS_RUN.append("create_receipts")
        db.execute("CREATE TABLE receipts (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY,"
            " receipt_id INTEGER NOT NULL REFERENCES receipts(id), points INTEGER NOT NULL)"
        )

    @migrations()
    def add_failure_hooks(db):
        MIGRATIONS_RUN.append("add_failure_hooks")
        # RAISE(ROLLBACK) ends the whole transaction, not just the statement.
        db.execute(
            "CREATE TRIGGER receipts_poison BEFORE INSERT ON receipts WHEN NEW.note = 'poison'"
            " BEGIN SELECT RAISE(ROLLBACK, 'poison receipt'); END"
        )
        # Deferred foreign keys are checked at COMMIT, so a violation makes COMMIT fail.
        db.execute(
            "CREATE TABLE refunds (id INTEGER PRIMARY KEY, receipt_id INTEGER"
            " REFERENCES receipts(id) DEFERRABLE INITIALLY DEFERRED)"
        )

    return migrations


def insert_receipt(note: str):
    def fn(conn: sqlite3.Connection) -> int:
        return conn.execute("INSERT INTO receipts (note) VALUES (?)", (note,)).lastrowid

    return fn


def notes(conn: sqlite3.Connection) -> list[str]:
    return [row["note"] for row in conn.execute("SELECT note FROM receipts ORDER BY id")]


async def wait_until(predicate, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


@pytest.fixture
def open_db(tmp_path):
    opened: list[Database] = []

    def make(**kwargs) -> Database:
        # A parent directory that does not exist yet: open() creates it.
        db = Database(tmp_path / "data" / "loyalty.db", migrations=make_migrations(), **kwargs)
        db.open()
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.close()


class WriterGate:
    """Holds the writer thread inside one write so the next ones queue into one batch.

    The gate blocks, so it runs off the event loop, as any write that blocks must.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def fn(self, conn: sqlite3.Connection) -> None:
        self.entered.set()
        self.release.wait(GATE_TIMEOUT_S)

    async def close_on(self, db: Database) -> asyncio.Task:
        task = asyncio.create_task(db.write(self.fn, off_loop=True))
        await wait_until(self.entered.is_set)
        return task


def test_migrations_apply_once_and_are_recorded(open_db):
    MIGRATIONS_RUN.clear()
    db = open_db()
    assert MIGRATIONS_RUN == ["create_receipts", "add_failure_hooks"]
    db.close()

    db = open_db()
    assert MIGRATIONS_RUN == ["create_receipts", "add_failure_hooks"]
    recorded = db.read_sync(
        lambda conn: [
            (row["migration_set"], row["name"])
            for row in conn.execute("SELECT migration_set, name FROM _sqlite_migrations ORDER BY id")
        ]
    )
    assert recorded == [
        ("storage_writer_test", "create_receipts"),
        ("storage_writer_test", "add_failure_hooks"),
    ]


def test_connection_settings(open_db):
    db = open_db()
    writer = db.write_sync(
        lambda conn: tuple(
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        )
    )
    # synchronous=NORMAL: the COMMIT writes the WAL, the sync thread fdatasyncs it before
    # anyone is answered (tests below).
    # busy_timeout: what is left of the write's 5 s to wait for another program's lock.
    assert writer[:3] == ("wal", 1, 1) and 4_000 < writer[3] <= 5_000
    with pytest.raises(sqlite3.OperationalError):
        db.read_sync(lambda conn: conn.execute("INSERT INTO receipts (note) VALUES ('x')"))


class SyncGate:
    """Holds the sync thread before its fdatasync: commits happen, answers must wait."""

    def __init__(self, db: Database, monkeypatch, fail: BaseException | None = None) -> None:
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0
        real = db._sync_wal

        def gated() -> None:
            self.calls += 1
            self.entered.set()
            self.release.wait(GATE_TIMEOUT_S)
            if fail is not None:
                raise fail
            real()

        monkeypatch.setattr(db, "_sync_wal", gated)


async def test_nobody_is_answered_before_the_wal_is_synced(open_db, monkeypatch):
    db = open_db()
    gate = SyncGate(db, monkeypatch)
    first = asyncio.create_task(db.write(insert_receipt("first")))
    await wait_until(gate.entered.is_set)
    # Committed (the connection moved on: a later batch runs and commits meanwhile) ...
    second = asyncio.create_task(db.write(insert_receipt("second")))
    await wait_until(lambda: "second" in db.read_now(notes))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()      # ... but not yet on disk: no answer
    gate.release.set()
    assert isinstance(await first, int) and isinstance(await second, int)
    assert db.read_now(notes) == ["first", "second"]
    assert gate.calls <= 2                             # the second batch shared a sync or had its own


async def test_a_failed_sync_fails_the_writes_it_covered(open_db, monkeypatch):
    db = open_db()
    gate = SyncGate(db, monkeypatch, fail=OSError(5, "Input/output error"))
    gate.release.set()
    with pytest.raises(OSError, match="Input/output error"):
        await db.write(insert_receipt("lost?"))


async def test_write_is_visible_to_read_and_survives_reopen(open_db):
    db = open_db()
    receipt_id = await db.write(insert_receipt("first"))
    row = await db.read(lambda conn: conn.execute("SELECT * FROM receipts WHERE id = ?", (receipt_id,)).fetchone())
    assert row["note"] == "first"
    db.close()

    db = open_db()
    assert await db.read(notes) == ["first"]


async def test_concurrent_writes_are_grouped_and_each_applied_once(open_db):
    sizes: list[int] = []
    db = open_db(on_commit=lambda batch_size, seconds: sizes.append(batch_size))
    count = 2_000

    ids = await asyncio.gather(*(db.write(insert_receipt(f"r{i}")) for i in range(count)))

    assert len(set(ids)) == count
    assert max(sizes) > 1
    assert max(sizes) <= 256
    assert sum(sizes) == count
    stored = await db.read(notes)
    assert sorted(stored) == sorted(f"r{i}" for i in range(count))


async def test_failing_item_rolls_back_alone(open_db):
    sizes: list[int] = []
    db = open_db(on_commit=lambda batch_size, seconds: sizes.append(batch_size))

    def half_done_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO receipts (note) VALUES ('half')")
        raise ValueError("rule evaluation failed")

    gate = WriterGate()
    held = await gate.close_on(db)
    tasks = [
        asyncio.create_task(db.write(insert_receipt("before"))),
        asyncio.create_task(db.write(half_done_then_fail)),
        asyncio.create_task(db.write(insert_receipt("after"))),
    ]
    await wait_until(lambda: db.queue_depth() == 3)
    gate.release.set()
    results = await asyncio.gather(held, *tasks, return_exceptions=True)

    assert sizes == [1, 3]
    assert isinstance(results[2], ValueError)
    assert isinstance(results[1], int) and isinstance(results[3], int)
    assert await db.read(notes) == ["before", "after"]


async def test_item_that_ends_the_transaction_fails_alone(open_db):
    db = open_db()
    runs: list[str] = []

    def counted(note: str):
        def fn(conn):
            runs.append(note)
            return insert_receipt(note)(conn)

        return fn

    gate = WriterGate()
    held = await gate.close_on(db)
    tasks = [
        asyncio.create_task(db.write(counted("before"))),
        asyncio.create_task(db.write(insert_receipt("poison"))),
        asyncio.create_task(db.write(counted("after"))),
    ]
    await wait_until(lambda: db.queue_depth() == 3)
    gate.release.set()
    _, before, poison, after = await asyncio.gather(held, *tasks, return_exceptions=True)

    assert isinstance(poison, sqlite3.IntegrityError)
    assert isinstance(before, int) and isinstance(after, int)
    # "before" was rolled back with the poisoned transaction and ran again.
    assert runs == ["before", "before", "after"]
    assert await db.read(notes) == ["before", "after"]


async def test_write_function_cannot_control_the_transaction(open_db):
    db = open_db()
    await db.write(insert_receipt("kept"))

    def sneaky_commit(conn):
        conn.execute("INSERT INTO receipts (note) VALUES ('sneaky')")
        conn.execute("COMMIT")

    def swallowed_rollback(conn):
        try:
            conn.execute("INSERT INTO receipts (note) VALUES ('poison')")
        except sqlite3.IntegrityError:
            return "ignored"

    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        await db.write(sneaky_commit)
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        await db.write(lambda conn: conn.execute("RELEASE SAVEPOINT storage_writer_item"))
    with pytest.raises(TransactionLost):
        await db.write(swallowed_rollback)

    def own_savepoints(conn):
        # sqlite-utils nests its atomic() blocks as savepoints: allowed.
        table = db.sqlite_utils(conn)["receipts"]
        table.insert_all([{"note": "bulk1"}, {"note": "bulk2"}])
        return table.count

    assert await db.write(own_savepoints) == 3
    assert await db.read(notes) == ["kept", "bulk1", "bulk2"]


async def test_failed_commit_fails_every_item_of_the_batch(open_db):
    sizes: list[int] = []
    db = open_db(on_commit=lambda batch_size, seconds: sizes.append(batch_size))

    gate = WriterGate()
    held = await gate.close_on(db)
    tasks = [
        asyncio.create_task(db.write(insert_receipt("innocent"))),
        asyncio.create_task(db.write(lambda conn: conn.execute("INSERT INTO refunds (receipt_id) VALUES (999)"))),
    ]
    await wait_until(lambda: db.queue_depth() == 2)
    gate.release.set()
    results = await asyncio.gather(held, *tasks, return_exceptions=True)

    assert all(isinstance(r, sqlite3.IntegrityError) for r in results[1:]), results
    assert sizes == [1]  # only the gate's own batch committed
    assert await db.read(notes) == []
    assert await db.write(insert_receipt("later")) > 0


async def test_full_queue_raises_overloaded(open_db):
    db = open_db(queue_max=2)
    gate = WriterGate()
    held = await gate.close_on(db)
    queued = [asyncio.create_task(db.write(insert_receipt(n))) for n in ("a", "b")]
    await wait_until(lambda: db.queue_depth() == 2)

    with pytest.raises(Overloaded):
        await db.write(insert_receipt("c"))

    gate.release.set()
    await asyncio.gather(held, *queued)
    assert await db.read(notes) == ["a", "b"]


async def test_cancelled_awaiter_does_not_stop_the_writer(open_db):
    db = open_db()
    gate = WriterGate()
    held = await gate.close_on(db)
    abandoned = asyncio.create_task(db.write(insert_receipt("abandoned")))
    await wait_until(lambda: db.queue_depth() == 1)
    abandoned.cancel()
    gate.release.set()
    await held

    assert await db.write(insert_receipt("next")) > 0
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    # The cancelled write still happened; only its answer was dropped.
    assert await db.read(notes) == ["abandoned", "next"]


async def test_close_drains_queued_writes(open_db):
    db = open_db()
    gate = WriterGate()
    held = await gate.close_on(db)
    queued = [asyncio.create_task(db.write(insert_receipt(n))) for n in ("q1", "q2", "q3")]
    await wait_until(lambda: db.queue_depth() == 3)
    gate.release.set()

    db.close()
    db.close()  # idempotent

    assert len(await asyncio.gather(held, *queued)) == 4
    with pytest.raises(StorageClosed):
        await db.write(insert_receipt("too late"))
    with pytest.raises(StorageClosed):
        await db.read(notes)
    assert await open_db().read(notes) == ["q1", "q2", "q3"]


async def test_broken_on_commit_hook_does_not_break_writes(open_db):
    def hook(batch_size, seconds):
        raise RuntimeError("metrics backend down")

    db = open_db(on_commit=hook)
    assert await db.write(insert_receipt("a")) == 1
    assert await db.write(insert_receipt("b")) == 2


def test_sync_api_outside_an_event_loop(open_db):
    db = open_db()
    assert db.write_sync(insert_receipt("cli")) == 1
    assert db.read_sync(notes) == ["cli"]
    with pytest.raises(KeyError):
        db.write_sync(lambda conn: {}["missing"])


async def test_sync_api_refuses_to_block_the_event_loop(open_db):
    db = open_db()
    with pytest.raises(RuntimeError, match="block the event loop"):
        db.write_sync(insert_receipt("x"))


CHILD = """
import asyncio, sys
sys.path.insert(0, {tests_dir!r})
from test_storage_writer import make_migrations
from storage.db import Database

async def main(path):
    db = Database(path, migrations=make_migrations())
    db.open()
    next_id = iter(range(1, 10**9))

    async def worker():
        while True:
            receipt_id = next(next_id)
            await db.write(lambda conn, i=receipt_id: conn.execute(
                "INSERT INTO receipts (id, note) VALUES (?, 'durable')", (i,)))
            # Printed only once the awaited write returned, i.e. after its COMMIT.
            sys.stdout.write(f"{{receipt_id}}\\n")
            sys.stdout.flush()

    await asyncio.gather(*(worker() for _ in range(16)))

asyncio.run(main(sys.argv[1]))
"""


def test_acknowledged_writes_survive_sigkill(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(tests_dir=str(Path(__file__).parent)))
    db_path = tmp_path / "durable.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(child), str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        printed: list[int] = []
        while len(printed) < 500:
            line = proc.stdout.readline()
            assert line, f"child ended early: {proc.stderr.read().decode()}"
            printed.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        rest = proc.stdout.read().decode()
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # A line cut off by the kill has no newline and was never acknowledged in full.
    printed += [int(line) for line in rest.split("\n")[:-1]]

    with Database(db_path, migrations=make_migrations()) as db:
        stored = set(db.read_sync(lambda conn: [row[0] for row in conn.execute("SELECT id FROM receipts")]))
    assert set(printed) <= stored
    assert len(printed) == len(set(printed))
