"""After the database's files were deleted or replaced under the server: what the salvage
leaves on disk. Every acknowledged write ends up in a file a restart (even after kill -9)
reads, a WAL that does not belong to the database is moved aside rather than replayed over
it, and a copy that fails on a full disk leaves no partial file behind.

The full-disk test mounts a small tmpfs (root only; skipped elsewhere).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from storage.db import Database, StorageLost
from test_storage_faults import fill, small_disk
from test_storage_writer import insert_receipt, make_migrations, notes

pytestmark = pytest.mark.sqlite_only(reason="salvage of a damaged SQLite file")

WAIT_S = 20.0


async def until(predicate, seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


def salvaged(db: Database) -> bool:
    try:
        db.check_ready()
    except StorageLost as err:
        return "every acknowledged write is" in str(err)
    return False


def foreign_wal(folder: Path) -> Path:
    """The WAL of another database, with committed frames a restart would replay."""
    other = sqlite3.connect(folder / "other.db", isolation_level=None)
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("PRAGMA wal_autocheckpoint=0")
    other.execute("CREATE TABLE stranger (x)")
    other.execute("INSERT INTO stranger VALUES (1)")
    copy = folder / "other.db-wal.copy"
    shutil.copyfile(folder / "other.db-wal", copy)
    other.close()
    return copy


def after_kill_9(db_path: Path, into: Path) -> Path:
    """What a restart after kill -9 opens: the database file and whatever is at its WAL path."""
    into.mkdir()
    shutil.copyfile(db_path, into / db_path.name)
    if os.path.exists(f"{db_path}-wal"):
        shutil.copyfile(f"{db_path}-wal", into / f"{db_path.name}-wal")
    return into / db_path.name


async def test_replaced_wal_is_moved_aside_so_a_restart_keeps_the_salvaged_database(tmp_path):
    path = tmp_path / "loyalty.db"
    db = Database(path, migrations=make_migrations())
    db.open()
    try:
        for n in range(5):
            await db.write(insert_receipt(f"kept-{n}"))
        os.replace(foreign_wal(tmp_path), f"{path}-wal")      # another database's WAL over ours
        with pytest.raises(StorageLost, match="replaced"):
            await db.write(insert_receipt("after"))
        await until(lambda: salvaged(db))
        restarted = after_kill_9(path, tmp_path / "restart")
    finally:
        db.close()
    conn = sqlite3.connect(restarted)
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # Every acknowledged write; the refused one too, perhaps (its retry would be a replay).
        assert notes(conn)[:5] == [f"kept-{n}" for n in range(5)]
    finally:
        conn.close()
    aside = list(tmp_path.glob("loyalty.db-wal.foreign-*"))
    assert len(aside) == 1
    # The other program's data is still there, for whoever put it there.
    assert aside[0].stat().st_size > 0


async def test_replaced_database_file_moves_the_servers_wal_aside(tmp_path):
    path = tmp_path / "loyalty.db"
    db = Database(path, migrations=make_migrations())
    db.open()
    try:
        for n in range(5):
            # Large enough to grow the file: its first page, the schema's, is in the WAL then.
            await db.write(insert_receipt(f"kept-{n}-" + "x" * 20_000))
        stranger = sqlite3.connect(tmp_path / "other.db")
        stranger.execute("PRAGMA journal_mode=WAL")        # a backup of a server's database is
        stranger.execute("CREATE TABLE t (x)")
        stranger.execute("INSERT INTO t VALUES (42)")
        stranger.commit()
        stranger.close()
        os.replace(tmp_path / "other.db", path)                # a restore over the live file
        with pytest.raises(StorageLost, match="replaced"):
            await db.write(insert_receipt("after"))
        await until(lambda: salvaged(db))
        restarted = after_kill_9(path, tmp_path / "restart")
    finally:
        db.close()
    # Our WAL, replayed over the restored file, would have written our pages into it.
    conn = sqlite3.connect(restarted)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        conn.close()
    saved = [p for p in tmp_path.glob("loyalty.db.saved-*")]
    assert len(saved) == 1
    conn = sqlite3.connect(saved[0])
    conn.row_factory = sqlite3.Row
    try:
        assert [note.split("-x")[0] for note in notes(conn)][:5] == [f"kept-{n}" for n in range(5)]
    finally:
        conn.close()


async def test_copy_that_fails_on_a_full_disk_leaves_nothing_and_waits_longer_each_time(tmp_path, caplog):
    caplog.set_level(logging.CRITICAL, logger="storage.db")
    with small_disk(tmp_path / "disk", 8) as disk:
        path = disk / "loyalty.db"
        db = Database(path, migrations=make_migrations(), min_free_bytes=0)
        db.open()
        try:
            for n in range(40):
                await db.write(insert_receipt(f"kept-{n}-" + "x" * 20_000))
            os.unlink(path)                                   # the database file is gone
            fill(disk / "filler")                             # and no room for its copy
            assert isinstance(db.fault(), StorageLost)       # as /readyz would notice it
            failures = lambda: sum("saving the writes of the lost file failed" in r.message  # noqa: E731
                                   for r in caplog.records)
            await until(lambda: failures() >= 1)
            first_s = time.monotonic()
            while time.monotonic() - first_s < 4.5:
                # Never a partial copy on the full disk, whatever moment it is looked at.
                assert not [p.name for p in disk.iterdir() if p.name.startswith("loyalty.db.saved")]
                await asyncio.sleep(0.05)
            # Retried after 1 s, then 2 s (not once per checkpoint round, every second).
            assert 2 <= failures() <= 3, failures()
            (disk / "filler").unlink()
            await until(lambda: salvaged(db), 30)
        finally:
            db.close()
        saved = [p.name for p in disk.iterdir() if p.name.startswith("loyalty.db.saved")]
        assert len(saved) == 1 and not saved[0].endswith(".partial"), saved
        conn = sqlite3.connect(disk / saved[0])
        conn.row_factory = sqlite3.Row
        try:
            assert [n.split("-x")[0] for n in notes(conn)][:40] == [f"kept-{n}" for n in range(40)]
        finally:
            conn.close()


async def test_closing_right_after_the_loss_still_saves_the_copy(tmp_path):
    path = tmp_path / "loyalty.db"
    db = Database(path, migrations=make_migrations())
    db.open()
    try:
        await db.write(insert_receipt("kept"))
        os.unlink(path)
        with pytest.raises(StorageLost):
            await db.write(insert_receipt("after"))
    finally:
        db.close()                                # the checkpoint thread's last act is the copy
    saved = list(tmp_path.glob("loyalty.db.saved-*"))
    assert len(saved) == 1
    conn = sqlite3.connect(saved[0])
    conn.row_factory = sqlite3.Row
    try:
        assert notes(conn)[:1] == ["kept"]
    finally:
        conn.close()
