"""`loyalty backup` while the real server serves, and the restore docs/operators.md
describes: the copy serves the same balances, passes `audit verify`, and a copy that fails
its checks never gets the name a restore would use."""
from __future__ import annotations

import asyncio
import re
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from conftest import KEYS
from test_crash_safety import NOW, Server

pytestmark = pytest.mark.sqlite_only(reason="backup and restore of the SQLite file"
                                     " (PostgreSQL's are pg_dump's, docs/postgresql.md)")

ROOT = Path(__file__).resolve().parent.parent
MEMBERS = 6


def loyalty(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def receipt(rid: str, card: str, amount: int) -> dict:
    return {"receipt_id": rid, "store_id": "S001", "register_id": "K01", "ts": NOW, "card": card,
            "lines": [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": amount, "amount": amount}],
            "total": amount}


async def call(session, server: Server, method: str, path: str, body=None, role: str = "register"):
    async with session.request(method, server.url(path), json=body,
                               headers={"Authorization": f"Bearer {KEYS[role]}"}) as resp:
        return resp.status, await resp.json()


async def before_backup(server: Server) -> tuple[dict[str, dict], list[dict]]:
    """Members with receipts, a return and an adjustment; their balances and the receipts."""
    sent = []
    async with aiohttp.ClientSession() as session:
        for i in range(MEMBERS):
            assert (await call(session, server, "POST", "/v1/members", {"card": f"card-{i}"}, "manager"))[0] == 201
            for n in range(3):
                body = receipt(f"before-{i}-{n}", f"card-{i}", 20_000 + 1_000 * n)
                assert (await call(session, server, "POST", "/v1/receipts", body))[0] == 201
                sent.append(body)
        status, _ = await call(session, server, "POST", "/v1/returns", {
            "return_id": "ret-1", "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "before-0-1"},
            "lines": [{"line_no": 1, "qty": 1}]})
        assert status == 201
        status, _ = await call(session, server, "POST", "/v1/admin/adjustments",
                               {"card": "card-1", "points": 250, "reason": "goodwill", "adjustment_id": "adj-1"},
                               "manager")
        assert status == 201
        balances = {}
        for i in range(MEMBERS):
            status, member = await call(session, server, "GET", f"/v1/members/card-{i}")
            assert status == 200
            balances[f"card-{i}"] = member["balance"]
    return balances, sent


async def backup_under_load(server: Server, out: Path) -> tuple[subprocess.CompletedProcess, int]:
    """`loyalty backup` run while new members' receipts keep being confirmed; how many
    were confirmed while it ran."""
    confirmed = 0
    done = asyncio.Event()

    async def keep_confirming(session):
        nonlocal confirmed
        n = 0
        while not done.is_set():
            n += 1
            card = f"during-{n}"
            assert (await call(session, server, "POST", "/v1/members", {"card": card}, "manager"))[0] == 201
            status, answer = await call(session, server, "POST", "/v1/receipts", receipt(f"during-{n}", card, 9_900))
            assert status == 201, answer
            confirmed += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        load = asyncio.create_task(keep_confirming(session))
        await asyncio.sleep(0.3)
        result = await asyncio.to_thread(loyalty, "backup", "--config", str(server.config), "--out", str(out))
        done.set()
        await load
    return result, confirmed


def test_backup_while_serving_restores_and_serves(tmp_path):
    live_dir, restored_dir = tmp_path / "live", tmp_path / "restored"
    live_dir.mkdir()
    restored_dir.mkdir()
    live = Server(live_dir)
    out = tmp_path / "backups" / "loyalty-backup.db"
    out.parent.mkdir()
    try:
        live.start()
        balances, sent = asyncio.run(before_backup(live))
        result, confirmed_during = asyncio.run(backup_under_load(live, out))
    finally:
        live.kill()
    assert result.returncode == 0, result.stderr
    assert re.search(r"copied in [\d.]+s, verified in [\d.]+s: quick_check ok", result.stdout)
    # The copy is one moment: everything confirmed before the backup, some of what came during it.
    copied = int(re.search(r"(\d+) receipts", result.stdout).group(1))
    assert MEMBERS * 3 <= copied <= MEMBERS * 3 + confirmed_during
    assert confirmed_during > 0
    assert not Path(f"{out}.partial").exists()

    # The restore of docs/operators.md: the copy in place of the database, no -wal or -shm of
    # another database beside it.
    restored = Server(restored_dir)
    shutil.copyfile(out, restored.db)
    for leftover in (Path(f"{restored.db}-wal"), Path(f"{restored.db}-shm")):
        assert not leftover.exists()
    try:
        restored.start()
        asyncio.run(same_balances_and_serving(restored, balances, sent))
    finally:
        restored.kill()
    audit = loyalty("audit", "verify", "--config", str(restored.config))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.startswith("ok:")


async def same_balances_and_serving(server: Server, balances: dict[str, dict], sent: list[dict]) -> None:
    async with aiohttp.ClientSession() as session:
        for card, balance in balances.items():
            status, member = await call(session, server, "GET", f"/v1/members/{card}")
            assert status == 200 and member["balance"] == balance, (card, member)
        for body in sent:
            status, answer = await call(session, server, "POST", "/v1/receipts", body)
            assert status == 200 and answer["replayed"] is True, (body["receipt_id"], status, answer)
        status, _ = await call(session, server, "POST", "/v1/receipts", receipt("after-restore", "card-0", 5_000))
        assert status == 201


def test_backup_refuses_an_existing_file_and_leaves_it(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database": {"path": str(tmp_path / "loyalty.db")}}))
    sqlite3.connect(tmp_path / "loyalty.db").close()
    out = tmp_path / "old-backup.db"
    out.write_bytes(b"yesterday's backup")
    result = loyalty("backup", "--config", str(config), "--out", str(out))
    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert out.read_bytes() == b"yesterday's backup"


def test_backup_into_a_missing_folder_says_it_is_missing(tmp_path, capsys, monkeypatch):
    """backup makes no folders; the line says the folder is not there rather than that it
    is something else."""
    from server.cli import main as cli
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database": {"path": str(tmp_path / "loyalty.db")}}))
    sqlite3.connect(tmp_path / "loyalty.db").close()
    monkeypatch.setattr(os, "nice", lambda increment: 0)      # not the test run's own priority
    assert cli(["backup", "--config", str(config), "--out", str(tmp_path / "backups" / "b.db")]) == 2
    assert capsys.readouterr().err == (f"backup failed: {tmp_path / 'backups'} does not exist "
                                       "(backup makes no folders)\n")
    (tmp_path / "backups").write_text("a file")
    assert cli(["backup", "--config", str(config), "--out", str(tmp_path / "backups" / "b.db")]) == 2
    assert capsys.readouterr().err == f"backup failed: {tmp_path / 'backups'} is not a folder\n"


def test_ctrl_c_during_a_backup_leaves_no_file_and_says_so(tmp_path, capsys, monkeypatch):
    from server import backup
    from server.cli import main as cli
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database": {"path": str(tmp_path / "loyalty.db")}}))
    sqlite3.connect(tmp_path / "loyalty.db").close()

    def ctrl_c_half_way(source, partial, progress=None):
        partial.write_bytes(b"the first pages")
        raise KeyboardInterrupt
    monkeypatch.setattr(backup, "copy_database", ctrl_c_half_way)
    monkeypatch.setattr(os, "nice", lambda increment: 0)      # not the test run's own priority
    out = tmp_path / "backup.db"
    assert cli(["backup", "--config", str(config), "--out", str(out)]) == 130
    assert capsys.readouterr().err == "backup interrupted (Ctrl-C): no backup was made (backup.db.partial removed)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "loyalty.db"]


def test_a_copy_failing_audit_is_kept_aside_not_under_the_name(tmp_path):
    """A ledger edited by hand copies faithfully; the copy fails audit, exit 1, and is kept
    as FILE.unverified so no restore picks it up as a good backup."""
    server = Server(tmp_path)
    try:
        server.start()
        asyncio.run(before_backup(server))
    finally:
        server.kill()
    conn = sqlite3.connect(server.db)
    conn.execute("DROP TRIGGER postings_append_only_update")
    conn.execute("UPDATE postings SET points = points + 1 WHERE id = 2")
    conn.commit()
    conn.close()
    out = tmp_path / "backup.db"
    result = loyalty("backup", "--config", str(server.config), "--out", str(out))
    assert result.returncode == 1
    assert "FAIL posting 2" in result.stdout
    assert not out.exists() and Path(f"{out}.unverified").exists()


def test_a_restore_that_leaves_the_wal_there_is_named_by_audit_verify(tmp_path):
    # Step 2 of the restore skipped after an unclean stop: SQLite reads the old WAL as part of
    # the copied file. audit verify, run before serving it, must say so in words that lead back
    # to the restore, not only SQLite's "malformed".
    server = Server(tmp_path, jobs={"enabled": False})
    out = tmp_path / "backup.db"

    async def confirm(prefix: str, n: int) -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                status, body = await call(session, server, "POST", "/v1/receipts",
                                          receipt(f"{prefix}-{i}", f"card-{i % MEMBERS}", 10_000 + i))
                assert status == 201, body

    async def enroll() -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(MEMBERS):
                assert (await call(session, server, "POST", "/v1/members", {"card": f"card-{i}"}, "manager"))[0] == 201

    try:
        server.start()
        asyncio.run(enroll())
        asyncio.run(confirm("a", 10))
        assert loyalty("backup", "--config", str(server.config), "--out", str(out)).returncode == 0
        asyncio.run(confirm("b", 400))          # the database file grows past the backup's pages
        deadline = time.monotonic() + 15        # idle, the server empties its WAL into the file
        while Path(f"{server.db}-wal").stat().st_size > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        asyncio.run(confirm("c", 30))           # what the WAL holds when the server is killed
    finally:
        server.kill()
    assert Path(f"{server.db}-wal").stat().st_size > 0
    shutil.copyfile(out, server.db)             # the copy, its WAL and -shm left in place
    audit = loyalty("audit", "verify", "--config", str(server.config))
    assert audit.returncode == 2 and audit.stderr.count("\n") == 1, audit.stdout + audit.stderr
    assert "database disk image is malformed" in audit.stderr
    assert f"{server.db}-wal (" in audit.stderr and "docs/operators.md, Restore" in audit.stderr
