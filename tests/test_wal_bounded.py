"""Under steady confirms the WAL file stays bounded; a long reader lets it grow, and once the
reader ends it shrinks again; /metrics shows its size, the checkpoints and the oldest reader.
Under light load the WAL starts again by itself, without the write turn's RESTART.

`make test` runs a short form with a small database.wal_checkpoint_mib; `make faulttest`
(FAULT_LONG=1) runs four clients for 30 s at the default size and holds the WAL under 64 MiB.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import time
from pathlib import Path

import pytest

import storage.db as storage_db
from storage.db import Database
from test_crash_safety import Server
from test_storage_faults import confirm, enroll, get, metric, receipt, session_for_tests
from test_storage_writer import insert_receipt, make_migrations

pytestmark = pytest.mark.sqlite_only(reason="the size of SQLite's WAL file")

LONG = bool(os.environ.get("FAULT_LONG"))
MIB = 1024 * 1024


def wal_size(db: Path) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except FileNotFoundError:
        return 0


async def load(server: Server, seconds: float, clients: int, counter) -> tuple[int, int]:
    """Confirms from `clients` concurrent registers for `seconds`; (receipts confirmed, largest WAL seen)."""
    stop = time.monotonic() + seconds
    confirmed = 0
    largest = 0

    async def client(session):
        nonlocal confirmed
        while time.monotonic() < stop:
            status, body, _ = await confirm(session, server, receipt(next(counter), prefix="wal"))
            assert status == 201, body
            confirmed += 1

    async def watch():
        nonlocal largest
        while time.monotonic() < stop:
            largest = max(largest, wal_size(server.db))
            await asyncio.sleep(0.02)

    async with session_for_tests() as session:
        await asyncio.gather(watch(), *(client(session) for _ in range(clients)))
    return confirmed, largest


async def until_wal_under(server: Server, bound: int, seconds: float, counter) -> float:
    """Light load goes on (one client) until the WAL file is under bound; how long it took."""
    started = time.monotonic()
    async with session_for_tests() as session:
        while wal_size(server.db) >= bound:
            assert time.monotonic() - started < seconds, f"WAL still {wal_size(server.db)} bytes"
            status, body, _ = await confirm(session, server, receipt(next(counter), prefix="wal"))
            assert status == 201, body
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def bounded_then_long_reader(server: Server, checkpoint_mib: int) -> None:
    counter = itertools.count()
    async with session_for_tests() as session:
        await enroll(session, server)
    # Generous for a noisy machine; without the write connection's restart it passed 40 MiB in 8 s.
    bound = 8 * checkpoint_mib * MIB
    confirmed, largest = await load(server, 8, 4, counter)
    assert confirmed > 100, confirmed
    assert largest < bound, f"WAL reached {largest} bytes under load (bound {bound})"

    reader = sqlite3.connect(server.db, isolation_level=None)
    try:
        reader.execute("BEGIN")                          # an export or a backup, holding its snapshot
        reader.execute("SELECT COUNT(*) FROM receipts").fetchone()
        await load(server, 4, 4, counter)
        assert wal_size(server.db) > checkpoint_mib * MIB    # nothing could be restarted meanwhile
        async with session_for_tests() as session:
            _, text = await get(session, server, "/metrics")
        assert metric(text, 'loyalty_wal_checkpoints_total{mode="restart",result="busy"}') >= 1
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    await until_wal_under(server, bound, 30, counter)

    async with session_for_tests() as session:
        _, text = await get(session, server, "/metrics")
    assert metric(text, "loyalty_wal_bytes") < bound
    assert metric(text, 'loyalty_wal_checkpoints_total{mode="restart",result="done"}') >= 1
    assert metric(text, 'loyalty_wal_checkpoints_total{mode="passive",result="partial"}') >= 1
    assert metric(text, 'loyalty_wal_checkpoint_seconds_count{mode="restart"}') >= 1
    assert metric(text, "loyalty_oldest_reader_seconds") < 5


def test_wal_stays_bounded_under_load_and_shrinks_after_a_long_reader(tmp_path):
    server = Server(tmp_path, database={"wal_checkpoint_mib": 1}, jobs={"enabled": False})
    server.start()
    try:
        asyncio.run(bounded_then_long_reader(server, 1))
    finally:
        server.kill()


async def idle_shrinks(server: Server) -> None:
    counter = itertools.count()
    async with session_for_tests() as session:
        await enroll(session, server)
    await load(server, 2, 2, counter)
    assert wal_size(server.db) > 0
    deadline = time.monotonic() + 15
    while wal_size(server.db) > 0:                    # nothing is written: it gives the file back
        assert time.monotonic() < deadline, wal_size(server.db)
        await asyncio.sleep(0.1)
    # The checkpoint is counted once it has returned, a moment after the file shrank.
    truncations = 'loyalty_wal_checkpoints_total{mode="truncate",result="done"}'
    async with session_for_tests() as session:
        while truncations not in (text := (await get(session, server, "/metrics"))[1]):
            assert time.monotonic() < deadline, "no truncate checkpoint counted"
            await asyncio.sleep(0.1)
    assert metric(text, truncations) >= 1


def test_idle_server_truncates_its_wal(tmp_path):
    server = Server(tmp_path, jobs={"enabled": False})
    server.start()
    try:
        asyncio.run(idle_shrinks(server))
    finally:
        server.kill()


async def long_steady_load(server: Server) -> tuple[int, int]:
    counter = itertools.count()
    async with session_for_tests() as session:
        await enroll(session, server)
    return await load(server, 30, 4, counter)


@pytest.mark.skipif(not LONG, reason="30 s of load: make faulttest (FAULT_LONG=1)")
def test_wal_stays_under_64_mib_for_30_seconds_of_four_clients(tmp_path):
    server = Server(tmp_path, jobs={"enabled": False})
    server.start()
    try:
        confirmed, largest = asyncio.run(long_steady_load(server))
    finally:
        server.kill()
    print(f"\n{confirmed} receipts in 30 s, largest WAL {largest / MIB:.1f} MiB")
    assert largest < 64 * MIB, largest


def wal_generation(db: Path) -> int:
    """The WAL header's checkpoint sequence: one more each time the WAL starts from its beginning."""
    with open(f"{db}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


async def light_writes(db: Database, seconds: float, largest: list[int]) -> int:
    """A write every few ms, a page or two of WAL each (about 1 MiB a second); returns how many."""
    stop, count = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        await db.write(insert_receipt("x" * 3000))
        count += 1
        largest[0] = max(largest[0], wal_size(db.path))
        await asyncio.sleep(0.006)
    return count


def test_light_load_starts_the_wal_again_without_making_writes_wait(tmp_path):
    # 1 MiB of WAL is under a second of these writes: copied once a second, the WAL reached
    # it, and the write turn's RESTART held the next writes meanwhile.
    checkpoints: list[tuple[str, str]] = []
    db = Database(tmp_path / "loyalty.db", migrations=make_migrations(), wal_checkpoint_bytes=MIB,
                  on_checkpoint=lambda mode, result, _: checkpoints.append((mode, result)))
    db.open()
    largest = [0]
    try:
        asyncio.run(light_writes(db, 0.2, largest))
        first = wal_generation(db.path)
        written = asyncio.run(light_writes(db, 4, largest))
        started_again = wal_generation(db.path) - first
    finally:
        db.close()
    restarts = sum(1 for mode, _ in checkpoints if mode == "restart")
    assert written > 300, written
    assert started_again >= 3, (started_again, restarts)
    assert restarts <= started_again // 4, (started_again, restarts)
    assert largest[0] <= 2 * MIB, largest[0]


@pytest.mark.skipif(getattr(storage_db, "_SYNC_FILE_RANGE", True) is None, reason="no sync_file_range in this C library")
def test_the_checkpoint_thread_writes_the_database_out_a_slice_at_a_time_then_syncs_it(tmp_path, monkeypatch):
    # One fdatasync of a copy's pages sent them to the disk at once; a WAL fdatasync, which
    # receipts wait for, queued behind all of them.
    calls: list[tuple[str, int, int, int]] = []
    real_range, real_fdatasync = storage_db._SYNC_FILE_RANGE, os.fdatasync

    sizes: list[int] = []

    def recorded_range(fd, offset, length, flags):
        calls.append(("range", fd, offset, length))
        if offset == 0:
            sizes.append(os.fstat(fd).st_size)        # the file as the slices began
        return real_range(fd, offset, length, flags)

    def recorded_fdatasync(fd):
        calls.append(("fdatasync", fd, 0, 0))
        return real_fdatasync(fd)

    monkeypatch.setattr(storage_db, "_SYNC_FILE_RANGE", recorded_range)
    monkeypatch.setattr(storage_db.os, "fdatasync", recorded_fdatasync)
    db = Database(tmp_path / "loyalty.db", migrations=make_migrations(), wal_checkpoint_bytes=64 * MIB)
    db.open()
    try:
        database_fd = db._db_fd

        def synced_after_slices() -> int | None:
            """Where in `calls` the database's first fdatasync after its slices is."""
            seen_range = False
            for at, (kind, fd, *_) in enumerate(list(calls)):
                if fd == database_fd and kind == "range":
                    seen_range = True
                elif fd == database_fd and kind == "fdatasync" and seen_range:
                    return at
            return None

        for _ in range(40):
            asyncio.run(light_writes(db, 0.5, [0]))
            if synced_after_slices() is not None:
                break
        synced = synced_after_slices()
        assert synced is not None, calls[:10]
        ranges = [(offset, length) for kind, fd, offset, length in calls[:synced] if kind == "range" and fd == database_fd]
        # from the start of the file, each slice where the last ended, to the file's end
        assert ranges[0][0] == 0, ranges[:3]
        assert all(b[0] == a[0] + a[1] for a, b in zip(ranges, ranges[1:])), ranges[:5]
        assert ranges[-1][0] < sizes[0] <= ranges[-1][0] + ranges[-1][1], (ranges[-1], sizes[0])
    finally:
        db.close()


def test_a_large_database_file_is_written_out_in_a_bounded_number_of_slices(tmp_path, monkeypatch):
    # A slice is a system call even where nothing is dirty: a file of tens of GB in 256 KiB
    # slices would spend tens of ms of CPU on every flush.
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(storage_db, "_SYNC_FILE_RANGE", lambda fd, offset, length, flags: calls.append((offset, length)) or 0)
    big = tmp_path / "big.db"
    with open(big, "wb") as f:
        f.truncate(5 * 1024 ** 3 + 7)      # sparse: nothing written
    fd = os.open(big, os.O_RDONLY)
    try:
        storage_db._write_out_in_slices(fd)
    finally:
        os.close(fd)
    assert len(calls) <= storage_db.DATABASE_WRITE_OUT_SLICES_MAX
    assert calls[0][0] == 0 and all(b[0] == a[0] + a[1] for a, b in zip(calls, calls[1:]))
    assert calls[-1][0] + calls[-1][1] >= 5 * 1024 ** 3 + 7
