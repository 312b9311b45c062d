"""A receipt's member facts are written in its own row (receipts.member_facts, m036), not as a
row of receipt_member_facts keyed by the receipt, which put every receipt at its register's
place in that key order: a page of its own in each COMMIT. A SQLite database from before
upgrades with every record moved into its receipt's row; PostgreSQL keeps the table for the
receipts confirmed before p013, which readers and the erasure of personal data still find."""
import sqlite3

import pytest

from backend import POSTGRESQL, connect
from conftest import line, receipt
from server.keys import DATABASE
from storage import member_facts

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"
KEYS = [("S001", "K01", "F1"), ("S001", "K01", "F2")]


async def shop(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD, "birthday": "1990-05-17", "tags": ["vip"]}))[0] == 201
    for _, _, receipt_id in KEYS:
        status, _ = await api.post("/v1/receipts", receipt(receipt_id, [line(1, "dairy", 9100)], card=CARD),
                                   as_="register")
        assert status == 201
    return api


async def records(api) -> list:
    return await api.client.server.app[DATABASE].read(
        lambda conn: [member_facts.read(conn, key) for key in KEYS])


@pytest.mark.sqlite_only(reason="SQLite's upgrade of its file; PostgreSQL keeps the table (test below)")
async def test_an_older_database_upgrades_with_each_record_in_its_receipts_row(make_api, tmp_path):
    api = await shop(make_api)
    before = await records(api)
    assert [(r.member_id, r.receipt_number, r.tags) for r in before] == [("m_1", 1, ["vip"]), ("m_1", 2, ["vip"])]
    await api.client.close()
    conn = sqlite3.connect(tmp_path / "loyalty.db", isolation_level=None)
    conn.executescript("""
        BEGIN;
        CREATE TABLE receipt_member_facts (store_id TEXT NOT NULL, register_id TEXT NOT NULL,
            receipt_id TEXT NOT NULL, facts BLOB NOT NULL, PRIMARY KEY (store_id, register_id, receipt_id))
            WITHOUT ROWID;
        INSERT INTO receipt_member_facts SELECT store_id, register_id, receipt_id, member_facts FROM receipts
            WHERE member_facts IS NOT NULL;
        ALTER TABLE receipts DROP COLUMN member_facts;
        DELETE FROM _sqlite_migrations WHERE name = 'm036_member_facts_in_receipts';
        COMMIT;
    """)
    conn.close()

    api = await make_api(now=NOW)                       # m036 runs at start
    assert await records(api) == before
    conn = sqlite3.connect(tmp_path / "loyalty.db")
    try:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'receipt_member_facts'").fetchall() == []
        assert conn.execute("SELECT COUNT(member_facts) FROM receipts").fetchone()[0] == 2
    finally:
        conn.close()
    await api.client.close()


async def test_facts_kept_from_before_the_column_are_read_and_erased_on_postgresql(make_api, tmp_path):
    if not POSTGRESQL:
        pytest.skip("receipt_member_facts stays on PostgreSQL only (make test-postgresql)")
    api = await shop(make_api)
    before = await records(api)
    conn = connect(tmp_path / "loyalty.db")
    try:        # the first receipt as one confirmed before p013: its record in the table
        conn.execute("INSERT INTO receipt_member_facts (store_id, register_id, receipt_id, facts) "
                     "SELECT store_id, register_id, receipt_id, member_facts FROM receipts WHERE receipt_id = 'F1'")
        conn.execute("UPDATE receipts SET member_facts = NULL WHERE receipt_id = 'F1'")
        conn.commit()
    finally:
        conn.close()
    assert await records(api) == before
    assert (await api.post("/v1/admin/members/m_1/erase", {"reason": "customer asked"}))[0] == 200
    after = await records(api)
    assert [(r.birthday, r.tags, r.receipt_number) for r in after] == [(None, [], 1), (None, [], 2)]
    conn = connect(tmp_path / "loyalty.db")
    try:
        kept = conn.execute("SELECT facts FROM receipt_member_facts WHERE receipt_id = 'F1'").fetchone()[0]
        assert member_facts.decode(bytes(kept)).tags == []
    finally:
        conn.close()
    await api.client.close()
