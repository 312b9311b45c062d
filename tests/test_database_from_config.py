"""One way to build the database from config.yaml's `database` section, for the server and
for commands; a command run beside a serving server leaves the checkpoints to the server.
And the start-up wait looks up who holds the lock only to say so."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from server import startup
from server.config import config_from_dict
from storage.db import Database
from test_storage_writer import insert_receipt, make_migrations, notes

pytestmark = pytest.mark.sqlite_only(reason="storage.db.Database's settings and SQLite's write-lock wait at start")

MIB = 1024 * 1024


def section(**values):
    return config_from_dict({"database": values}).database


def checkpoint_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sqlite-checkpoint-")]


def test_the_config_sets_the_limits_a_command_would_have_ignored(tmp_path):
    db = Database.from_config(section(busy_wait_seconds=0.5, wal_checkpoint_mib=3, min_free_mib=7, cache_mib=9),
                              tmp_path / "loyalty.db", migrations=make_migrations())
    db.open()
    try:
        assert db._busy_timeout_ms == 500
        assert db._wal_checkpoint_bytes == 3 * MIB and db._min_free_bytes == 7 * MIB
        size_limit = db.write_sync(lambda conn: conn.execute("PRAGMA journal_size_limit").fetchone()[0])
        assert size_limit == 3 * MIB
    finally:
        db.close()


async def test_a_command_beside_the_server_runs_no_checkpoints(tmp_path):
    path = tmp_path / "loyalty.db"
    server = Database.from_config(section(), path, migrations=make_migrations())
    server.open()
    try:
        before = len(checkpoint_threads())
        command = Database.from_config(section(), path, migrations=make_migrations(), checkpoints=False)
        command.open()
        try:
            assert len(checkpoint_threads()) == before       # only the server's
            for n in range(50):
                await command.write(insert_receipt(f"job-{n}"))
            assert len(await server.read(notes)) == 50
        finally:
            command.close()
        # The server's WAL is still its own, intact and in use.
        await server.write(insert_receipt("served"))
        assert (await server.read(notes))[-1] == "served"
    finally:
        server.close()


def test_alone_a_command_keeps_sqlites_own_checkpoint(tmp_path):
    command = Database.from_config(section(), tmp_path / "loyalty.db", migrations=make_migrations(),
                                   checkpoints=False)
    command.open()
    try:
        assert command._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 0
    finally:
        command.close()


async def test_start_up_wait_looks_up_the_lock_holder_once(tmp_path, monkeypatch):
    path = tmp_path / "loyalty.db"
    sqlite3.connect(path).close()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    lookups, told = [], []
    real = startup.lock_holder
    monkeypatch.setattr(startup, "lock_holder", lambda db: lookups.append(db) or real(db))
    monkeypatch.setattr(startup, "START_WAIT_POLL_SECONDS", 0.05)
    releaser = threading.Timer(1.0, lambda: holder.execute("ROLLBACK"))
    releaser.start()
    try:
        await startup.wait_for_write_lock(path, time.monotonic() + 30, told.append)
    finally:
        releaser.join()
        holder.close()
    assert len(told) == 1                                     # "another process": this one, unseen
    assert len(lookups) == 1                                  # not one per poll (about 20 of them)


async def test_start_up_wait_gives_up_naming_the_holder(tmp_path):
    path = tmp_path / "loyalty.db"
    sqlite3.connect(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(startup.StartupError, match="is still locked by"):
            await asyncio.wait_for(startup.wait_for_write_lock(path, time.monotonic() + 0.3, lambda h: None), 30)
    finally:
        holder.close()
