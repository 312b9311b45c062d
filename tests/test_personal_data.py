"""Card numbers and phones never reach the disk: not the database, its WAL, the log or an export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from conftest import KEYS, MARKET, _h, connect, database_section
from test_crash_safety import NOW, Server

CARD = "7000000012345"
REFERRER = "7000000067890"
PHONE = "+380 50 123-45-67"
PHONE_DIGITS = "380501234567"
NEW_PHONE = "+380671112233"


def call(server, method, path, role, body=None):
    resp = requests.request(method, server.url(path), json=body, timeout=10,
                            headers={"Authorization": f"Bearer {KEYS[role]}"})
    return resp.status_code, resp.json()


@pytest.mark.sqlite_only(reason="reads the bytes of SQLite's database file and its WAL")
def test_no_card_or_phone_number_on_disk(tmp_path):
    server = Server(tmp_path, privacy={"hmac_key": "a-test-key-for-personal-data"})
    server.start()
    try:
        assert call(server, "POST", "/v1/members", "manager", {"card": REFERRER})[0] == 201
        status, member = call(server, "POST", "/v1/members", "manager",
                              {"card": CARD, "phone": PHONE, "birthday": "1990-01-01", "referred_by": REFERRER})
        assert status == 201, member
        assert member["card"] == CARD and member["card_last4"] == "2345"
        assert member["profile"]["phone_last4"] == "4567"
        status, member = call(server, "PATCH", f"/v1/members/{CARD}", "manager", {"phone": NEW_PHONE})
        assert status == 200 and member["profile"]["phone_last4"] == "2233"
        lines = [{"line_no": 1, "sku": "x", "category": "dairy", "qty": 1, "price": 50000, "amount": 50000}]
        body = {"receipt_id": "P-1", "store_id": "S001", "register_id": "K01", "ts": NOW, "card": CARD,
                "lines": lines, "total": 50000}
        assert call(server, "POST", "/v1/receipts", "register", body)[0] == 201
        assert call(server, "POST", "/v1/receipts", "register", body)[0] == 200       # replay by HMAC
        assert call(server, "POST", "/v1/admin/adjustments", "manager",
                    {"card": CARD, "points": 10, "reason": "sorry", "adjustment_id": "A-1"})[0] == 201
        assert call(server, "PUT", f"/v1/admin/members/{CARD}/tier", "manager",
                    {"tier": "gold", "until": "2026-12-31"})[0] == 200
        status, view = call(server, "GET", f"/v1/members/{CARD}", "register")
        assert status == 200 and view["card"] == CARD and view["member_id"] == member["member_id"]
        assert call(server, "GET", "/v1/members/7000000099999", "register")[0] == 404
        status, statement = call(server, "GET", f"/v1/members/{CARD}/statement", "manager")
        assert status == 200 and statement["card_last4"] == "2345" and statement["postings"]
        export = tmp_path / "statement.json"
        export.write_text(json.dumps(statement))
        files = [server.db, Path(f"{server.db}-wal"), server.log, export]
        assert files[1].exists()
        secrets = [CARD, REFERRER, PHONE, PHONE_DIGITS, NEW_PHONE, NEW_PHONE.lstrip("+")]
        for f in files:
            data = f.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{s} found in {f.name}"
    finally:
        server.kill()


def test_start_up_without_a_key_stops_with_a_clear_message(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": 0}, "database": database_section(tmp_path / "x.db"),
        "rules": {"dir": str(MARKET), "watch": False},
        "auth": {"keys": [{"id": "manager", "sha256": _h("k"), "role": "manager"}]}}))
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_HMAC_KEY"}
    run = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--config", str(config)], env=env,
                         capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert run.returncode == 2
    assert "LOYALTY_HMAC_KEY" in run.stderr and "privacy.hmac_key" in run.stderr
    assert not (tmp_path / "x.db").exists()


def test_the_key_comes_from_the_environment_first():
    from server.config import config_from_dict
    from server.privacy import privacy_from_config
    config = config_from_dict({"privacy": {"hmac_key": "from-the-config-file-1234"}})
    a = privacy_from_config(config, environ={"LOYALTY_HMAC_KEY": "from-the-environment-1234"})
    b = privacy_from_config(config, environ={})
    assert a.card(CARD) != b.card(CARD)
    assert a.card(CARD) == privacy_from_config(config_from_dict({}),
                                               environ={"LOYALTY_HMAC_KEY": "from-the-environment-1234"}).card(CARD)
    assert a.phone("+380 50 123 45 67") == a.phone("380501234567")


@pytest.mark.sqlite_only(reason="upgrades an SQLite file written before the HMAC columns")
async def test_rows_from_before_are_converted_at_start_up(tmp_path):
    """A database written before the HMAC columns: numbers are replaced at the next start."""
    import sqlite3

    from sqlite_utils import Database as UtilsDatabase

    from conftest import test_config
    from server.app import create_app
    from storage.schema import migrations
    path = tmp_path / "loyalty.db"
    conn = sqlite3.connect(path)
    db = UtilsDatabase(conn)
    migrations.apply(db, stop_before="m010_audit_log")
    conn.execute("INSERT INTO members (id, phone, tags, enrolled_at, updated_at) VALUES (1, ?, '[]', 'x', 'x')",
                 (PHONE,))
    conn.execute("INSERT INTO cards (card, member_id, created_at) VALUES (?, 1, 'x')", (CARD,))
    conn.commit()
    conn.close()
    app = create_app(test_config(tmp_path, NOW))
    from aiohttp.test_utils import TestClient, TestServer
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(f"/v1/members/{CARD}", headers={"Authorization": f"Bearer {KEYS['manager']}"})
        view = await resp.json()
        assert resp.status == 200 and view["card_last4"] == "2345" and view["profile"]["phone_last4"] == "4567"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT card_last4 FROM cards").fetchall() == [("2345",)]
    assert conn.execute("SELECT phone FROM members").fetchall() == [(None,)]
    conn.close()
