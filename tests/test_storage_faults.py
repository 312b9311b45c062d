"""A full disk, another program's write lock, a deleted WAL: the real server answers 503 with
the cause, says so in /readyz and /metrics, logs it once, recovers by itself where it can,
and never acknowledges a receipt it could lose.

The full-disk test mounts a small tmpfs (root only; skipped elsewhere).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import KEYS
from test_crash_safety import NOW, Server

pytestmark = pytest.mark.sqlite_only(reason="faults of SQLite's file: its disk full, the file replaced or locked")

CARDS = 4
HEADERS = {"Authorization": f"Bearer {KEYS['register']}"}
MANAGER = {"Authorization": f"Bearer {KEYS['manager']}"}


def receipt(n: int, prefix: str = "sf") -> dict:
    amount = 1000 + n % 5000
    return {"receipt_id": f"{prefix}-{n}", "store_id": "S001", "register_id": "K01", "ts": NOW,
            "card": f"card-{n % CARDS}",
            "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": amount, "amount": amount}],
            "total": amount}


async def confirm(session: aiohttp.ClientSession, server: Server, body: dict) -> tuple[int, dict, dict]:
    async with session.post(server.url("/v1/receipts"), json=body, headers=HEADERS) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def get(session: aiohttp.ClientSession, server: Server, path: str) -> tuple[int, str]:
    async with session.get(server.url(path), headers=MANAGER) as resp:
        return resp.status, await resp.text()


async def enroll(session: aiohttp.ClientSession, server: Server) -> None:
    for i in range(CARDS):
        async with session.post(server.url("/v1/members"), json={"card": f"card-{i}"}, headers=MANAGER) as resp:
            assert resp.status in (201, 409), await resp.text()


def stored_receipts(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT receipt_id FROM receipts")}
    finally:
        conn.close()


def metric(text: str, name: str) -> float:
    """The value of one sample line of /metrics, e.g. 'loyalty_storage_fault{cause="busy"}'."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def session_for_tests() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


# -- another program holds the write lock ----------------------------------------------------

async def busy_then_released(server: Server) -> None:
    async with session_for_tests() as session:
        await enroll(session, server)
        assert (await confirm(session, server, receipt(0)))[0] == 201
        other = sqlite3.connect(server.db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")        # the write lock, as `sqlite3 loyalty.db` would hold it
            started = time.monotonic()
            answers = await asyncio.gather(*(confirm(session, server, receipt(n)) for n in range(1, 9)))
            waited = time.monotonic() - started
            for status, body, headers in answers:
                assert status == 503 and body["error"]["code"] == "storage_busy", body
                assert int(headers["Retry-After"]) > 0
                assert "nothing was written" in body["error"]["message"]
            assert waited < 8, waited                # busy_wait_seconds is 1 here
            started = time.monotonic()
            status, text = await get(session, server, "/readyz")
            assert status == 503 and '"storage_busy"' in text, text
            assert time.monotonic() - started < 4
            status, text = await get(session, server, "/metrics")
            assert metric(text, 'loyalty_storage_errors_total{cause="busy"}') >= 8
            assert metric(text, 'loyalty_storage_fault{cause="busy"}') == 1
            assert metric(text, "loyalty_ready") == 0        # what /readyz said
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Released: ready again before any write has taken the lock (a probe writes nothing).
        status, text = await get(session, server, "/readyz")
        assert status == 200, text
        status, text = await get(session, server, "/metrics")
        assert metric(text, 'loyalty_storage_fault{cause="busy"}') == 0
        assert metric(text, "loyalty_ready") == 1
        # The same receipts go through now, without a restart.
        for n in range(1, 9):
            status, body, _ = await confirm(session, server, receipt(n))
            assert status == 201, body
        status, text = await get(session, server, "/readyz")
        assert status == 200, text


def test_write_lock_held_by_another_program_answers_503_storage_busy_then_recovers(tmp_path):
    server = Server(tmp_path, database={"busy_wait_seconds": 1})
    server.start()
    try:
        asyncio.run(busy_then_released(server))
    finally:
        server.kill()
    assert stored_receipts(server.db) == {f"sf-{n}" for n in range(9)}
    log = server.log.read_text()
    assert log.count("write lock held by another program (") == 1, log[-3000:]
    assert "is over after" in log
    assert "Traceback" not in log


# -- the WAL deleted under the running server -------------------------------------------------

async def confirm_around_wal_deletion(server: Server) -> tuple[set[str], list[int]]:
    acknowledged: set[str] = set()
    after: list[int] = []
    async with session_for_tests() as session:
        await enroll(session, server)
        for n in range(40):
            status, body, _ = await confirm(session, server, receipt(n))
            assert status == 201, body
            acknowledged.add(body["receipt"]["receipt_id"])
        os.unlink(f"{server.db}-wal")
        for n in range(40, 50):
            status, body, headers = await confirm(session, server, receipt(n))
            after.append(status)
            if status == 201:                       # only before the server could have known
                acknowledged.add(body["receipt"]["receipt_id"])
            else:
                assert status == 503 and body["error"]["code"] == "storage_lost", body
                assert "Retry-After" in headers
        # Until it says every acknowledged write is in the database file (it copies the
        # deleted WAL's frames there as soon as it notices).
        deadline = time.monotonic() + 15
        while True:
            status, text = await get(session, server, "/readyz")
            assert status == 503 and '"storage_lost"' in text, text
            if "every acknowledged write is in the database file" in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert "every acknowledged write is in the database file" in text, text
        status, text = await get(session, server, "/metrics")
        assert metric(text, 'loyalty_storage_fault{cause="lost"}') == 1
    return acknowledged, after


def test_deleted_wal_stops_acknowledgements_and_loses_nothing_acknowledged(tmp_path):
    server = Server(tmp_path, jobs={"enabled": False})
    server.start()
    try:
        acknowledged, after = asyncio.run(confirm_around_wal_deletion(server))
    finally:
        server.kill()                               # kill -9: nothing but the files on disk survives
    assert after[0] == 503 and set(after) == {503}, after
    log = server.log.read_text()
    assert log.count("wal was deleted; writes and reads are refused") == 1, log[-3000:]
    server.start()
    try:
        assert acknowledged <= stored_receipts(server.db)
        async def confirm_one() -> int:
            async with session_for_tests() as session:
                return (await confirm(session, server, receipt(99)))[0]
        assert asyncio.run(confirm_one()) == 201   # a restart serves again, on a new WAL
    finally:
        server.kill()
    assert acknowledged | {"sf-99"} <= stored_receipts(server.db)


# -- the disk fills up --------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(folder: Path, size_mib: int):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}M", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(path: Path) -> None:
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
    with open(path, "ab", buffering=0) as f:    # the last few bytes too
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")


async def confirm_until_full_then_free(server: Server, filler: Path) -> set[str]:
    acknowledged: set[str] = set()
    async with session_for_tests() as session:
        await enroll(session, server)
        for n in range(20):
            status, body, _ = await confirm(session, server, receipt(n))
            assert status == 201, body
            acknowledged.add(body["receipt"]["receipt_id"])
        fill(filler)
        # Nothing written yet, nothing failed: /readyz still sees the disk under its minimum.
        status, text = await get(session, server, "/readyz")
        assert status == 503 and '"storage_full"' in text, text
        refused = 0
        for n in range(20, 2000):
            status, body, headers = await confirm(session, server, receipt(n))
            if status == 201:
                acknowledged.add(body["receipt"]["receipt_id"])
                continue
            assert status == 503 and body["error"]["code"] == "storage_full", body
            assert int(headers["Retry-After"]) > 0 and "nothing was written" in body["error"]["message"]
            refused += 1
            if refused == 50:
                break
        assert refused == 50, "the disk never filled up"
        status, text = await get(session, server, "/readyz")
        assert status == 503 and '"storage_full"' in text, text
        status, text = await get(session, server, "/metrics")
        assert metric(text, 'loyalty_storage_errors_total{cause="full"}') >= 50
        assert metric(text, 'loyalty_storage_fault{cause="full"}') == 1
        filler.unlink()
        for n in range(2000, 2020):                 # space is back: no restart needed
            status, body, _ = await confirm(session, server, receipt(n))
            assert status == 201, body
            acknowledged.add(body["receipt"]["receipt_id"])
        status, text = await get(session, server, "/readyz")
        assert status == 200, text
    return acknowledged


def test_full_disk_answers_503_storage_full_and_recovers_when_space_is_freed(tmp_path):
    with small_disk(tmp_path / "disk", 24) as disk:
        server = Server(tmp_path, database={"path": str(disk / "loyalty.db"), "min_free_mib": 4,
                                            "wal_checkpoint_mib": 1}, jobs={"enabled": False})
        server.db = disk / "loyalty.db"
        server.start()
        try:
            acknowledged = asyncio.run(confirm_until_full_then_free(server, disk / "filler"))
        finally:
            server.kill()
        missing = acknowledged - stored_receipts(server.db)
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
    log = server.log.read_text()
    assert log.count("disk full (") == 1, log[-3000:]
    assert "Traceback" not in log and "internal_error" not in log


async def test_replaced_database_file_refuses_writes_and_saves_the_servers_copy(tmp_path):
    from storage.db import Database, StorageLost
    from test_storage_writer import insert_receipt, make_migrations, notes

    db = Database(tmp_path / "loyalty.db", migrations=make_migrations())
    db.open()
    try:
        for n in range(5):
            await db.write(insert_receipt(f"kept-{n}"))
        stranger = sqlite3.connect(tmp_path / "other.db")
        stranger.execute("CREATE TABLE t (x)")
        stranger.close()
        os.replace(tmp_path / "other.db", tmp_path / "loyalty.db")   # a restore over the live file
        with pytest.raises(StorageLost, match="replaced"):
            await db.write(insert_receipt("after"))
        with pytest.raises(StorageLost):
            db.read_now(notes)
        assert isinstance(db.fault(), StorageLost)
    finally:
        db.close()
    saved = list(tmp_path.glob("loyalty.db.saved-*"))
    assert len(saved) == 1
    conn = sqlite3.connect(saved[0])
    conn.row_factory = sqlite3.Row
    # Every acknowledged write; the refused one too, perhaps (its retry would be a replay).
    assert notes(conn)[:5] == [f"kept-{n}" for n in range(5)]
    conn.close()


def test_a_lasting_fault_is_logged_once_not_by_every_poll(tmp_path):
    # A restore copied over the live file: the server stops until restarted. Its log must still
    # show the storage's lines that say what to do, not a traceback every poll while it waits.
    server = Server(tmp_path, jobs={"enabled": False}, rules={"poll_interval_ms": 50},
                    events={"poll_interval_seconds": 0.05})
    server.start()
    try:
        async def replace_and_wait() -> None:
            async with session_for_tests() as session:
                await enroll(session, server)
                stranger = sqlite3.connect(tmp_path / "other.db")
                stranger.execute("CREATE TABLE t (x)")
                stranger.close()
                os.replace(tmp_path / "other.db", server.db)
                status, text = await get(session, server, "/readyz")
                assert status == 503 and '"storage_lost"' in text, text
                await asyncio.sleep(3)              # some sixty polls of the program, fifteen of the events
        asyncio.run(replace_and_wait())
    finally:
        server.kill()
    log = server.log.read_text()
    assert log.count("could not look for a newer recorded program") == 1, log[-3000:]
    assert log.count("event delivery paused") == 1, log[-3000:]
    assert log.count("Traceback") <= 2, log[-3000:]       # the program's poll and the keys', once each
