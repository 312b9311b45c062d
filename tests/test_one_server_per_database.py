"""A second `loyalty serve` on the same database file is refused, whatever path names it; the
first keeps serving; after kill -9 of the first the lock file left behind does not block a
restart."""
from __future__ import annotations

import json
import os
import sqlite3
import threading

import pytest
import requests

from conftest import KEYS
from test_crash_safety import Server

pytestmark = pytest.mark.sqlite_only(reason="the lock file beside SQLite's database that allows one server;"
                                     " on PostgreSQL several serve")

RECEIPT = {"receipt_id": "one-1", "store_id": "S001", "register_id": "K01", "ts": "2026-11-24T12:00:00+02:00",
           "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 5000, "amount": 5000}],
           "total": 5000}


def post(server: Server, path: str, body: dict, role: str = "register") -> tuple[int, dict]:
    resp = requests.post(server.url(path), json=body, headers={"Authorization": f"Bearer {KEYS[role]}"},
                         timeout=10)
    return resp.status_code, resp.json()


def refused(server: Server) -> str:
    """Starts the server, which must exit 2 at once; returns what it printed."""
    with pytest.raises(RuntimeError):
        server.start()
    assert server.proc.wait(10) == 2
    return server.log.read_text()


def test_second_server_on_the_same_file_is_refused_and_the_first_serves_on(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Server(tmp_path / "a")
    first.start()
    try:
        # Named through a symlink: still the same file, still refused.
        (tmp_path / "b" / "link").symlink_to(tmp_path / "a")
        linked = tmp_path / "b" / "link" / "loyalty.db"
        second = Server(tmp_path / "b", database={"path": str(linked)})
        out = refused(second)
        assert "Traceback" not in out
        holder = json.loads((tmp_path / "a" / "loyalty.db.serve.lock").read_text())
        assert holder["pid"] == first.proc.pid
        assert (f"not starting: another loyalty server (pid {first.proc.pid}, started {holder['started']}) "
                f"is serving the database {linked} (it holds {first.db}.serve.lock)") in out
        assert "one server per database file" in out
        # Refused before the database was touched: no migration of its own, nothing locked.
        assert "rules sha256" not in out

        status, body = post(first, "/v1/receipts", RECEIPT)
        assert status == 201, body
        assert requests.get(first.url("/readyz"), timeout=10).status_code == 200
    finally:
        first.kill()


def test_restart_after_kill_9_is_not_blocked_by_the_stale_lock_file(tmp_path):
    first = Server(tmp_path)
    first.start()
    assert post(first, "/v1/receipts", RECEIPT)[0] == 201
    first.kill()
    lock = tmp_path / "loyalty.db.serve.lock"
    assert json.loads(lock.read_text())["pid"] == first.proc.pid    # left behind by the killed server

    again = Server(tmp_path)
    again.start()
    try:
        assert json.loads(lock.read_text())["pid"] == again.proc.pid
        status, body = post(again, "/v1/receipts", RECEIPT)
        assert (status, body["replayed"]) == (200, True)
    finally:
        again.kill()
    with sqlite3.connect(tmp_path / "loyalty.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 1


def test_a_server_stopped_cleanly_releases_the_lock(tmp_path):
    first = Server(tmp_path)
    first.start()
    first.proc.terminate()
    assert first.proc.wait(30) == 0
    again = Server(tmp_path)
    again.start()
    try:
        assert requests.get(again.url("/healthz"), timeout=10).status_code == 200
        assert os.path.exists(tmp_path / "loyalty.db.serve.lock")
    finally:
        again.kill()


def test_two_servers_started_at_once_one_serves_the_other_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Server(tmp_path / "a")
    b = Server(tmp_path / "b", database={"path": str(a.db)})
    outcomes: dict[str, str] = {}

    def start(name: str, server: Server) -> None:
        try:
            server.start()
            outcomes[name] = "serving"
        except RuntimeError:
            outcomes[name] = f"exit {server.proc.wait(10)}"

    threads = [threading.Thread(target=start, args=pair) for pair in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(outcomes.values()) == ["exit 2", "serving"], outcomes
        loser = b if outcomes["b"] == "exit 2" else a
        winner = a if loser is b else b
        out = loser.log.read_text()
        assert "one server per database file" in out and "database is locked" not in out
        status, body = post(winner, "/v1/receipts", RECEIPT)
        assert status == 201, body
    finally:
        a.kill()
        b.kill()
