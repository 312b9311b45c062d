"""A server started while another process holds the database's write lock waits for it
(saying once for whom) instead of dying in its migrations with 'database is locked', then
serves; after database.start_wait_seconds it gives up with one line."""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
import requests

from conftest import KEYS
from test_crash_safety import NOW, Server

pytestmark = pytest.mark.sqlite_only(reason="the wait for SQLite's write lock held by another process at start")

RECEIPT = {"receipt_id": "w-1", "store_id": "S001", "register_id": "K01", "ts": NOW,
           "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 5000, "amount": 5000}],
           "total": 5000}


def hold_write_lock(db, journal_mode: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def wait_for_log(server: Server, text: str, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        log = server.log.read_text() if server.log.exists() else ""
        if text in log:
            return log
        assert server.proc is None or server.proc.poll() is None, log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged:\n{log}")


# A fresh file (rollback journal) and one a server has already made WAL: SQLite locks each differently.
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_start_waits_for_a_held_write_lock_then_serves(tmp_path, journal_mode):
    server = Server(tmp_path)
    holder = hold_write_lock(server.db, journal_mode)
    starting = threading.Thread(target=server.start)       # returns once the port answers
    starting.start()
    try:
        log = wait_for_log(server, "waiting up to 60s")
        assert f"the database {server.db} is locked by pid {os.getpid()} (" in log
        time.sleep(1.5)                                     # still waiting, not crashed
        assert server.proc.poll() is None
        assert "serving on" not in server.log.read_text()
        holder.execute("ROLLBACK")
        holder.close()
        starting.join(60)
        assert not starting.is_alive()
        resp = requests.post(server.url("/v1/receipts"), json=RECEIPT,
                             headers={"Authorization": f"Bearer {KEYS['register']}"}, timeout=10)
        assert resp.status_code == 201, resp.text
        log = server.log.read_text()
        assert log.count("is locked by") == 1 and "Traceback" not in log
    finally:
        holder.close()
        starting.join(60)
        server.kill()


def test_start_gives_up_after_start_wait_seconds_with_one_line(tmp_path):
    server = Server(tmp_path, database={"start_wait_seconds": 1})
    holder = hold_write_lock(server.db, "wal")
    try:
        with pytest.raises(RuntimeError):
            server.start()
        assert server.proc.wait(30) == 2
    finally:
        holder.close()
    log = server.log.read_text()
    assert "Traceback" not in log
    last = log.splitlines()[-1]
    assert last.startswith(f"not starting: the database {server.db} is still locked by pid {os.getpid()} (")
    assert last.endswith(") after database.start_wait_seconds")
