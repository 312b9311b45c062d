"""A database written before the compact format (migration m013) upgrades in place and
answers exactly as one that never needed to: replays, returns, balances, audit verify.

The older format is made by turning a fresh database back: hex hashes, a WITHOUT ROWID
receipts table holding each receipt's per-line detail (and no line records, m023), lots
without remaining points, cards as a rowid table, the indexes as they were, no rule_totals
(m016), one accrual posting per rule (m030; the run it is compared with starts from those too)."""
from __future__ import annotations

import re
import sqlite3

import msgspec
from aiohttp.test_utils import TestClient, TestServer
import pytest

from conftest import Api, line, receipt, test_config
from per_rule_postings import to_per_rule_postings
from server.app import create_app
from storage import line_records
from storage.audit import verify
from storage.ledger import unpack

pytestmark = pytest.mark.sqlite_only(reason="upgrades of old SQLite files")

NOW = "2026-11-24T12:00:05+02:00"
RECEIPTS = [
    receipt("R-1", [line(1, "dairy", 60000, qty=3), line(2, "grocery", 70000)], card="1"),  # several rules
    receipt("R-2", [line(1, "grocery", 20000, qty=2)], card="1"),                          # one rule
    receipt("R-3", [line(1, "grocery", 120000)], card="1", redeem=100),
]
RETURNS = [("T-1", "R-1", [{"line_no": 1, "qty": 1}]), ("T-2", "R-2", [{"line_no": 1, "qty": 1}])]
LATER_RETURNS = [("T-3", "R-1", [{"line_no": 1, "qty": 2}, {"line_no": 2, "qty": 1}]),
                 ("T-4", "R-3", [{"line_no": 1, "qty": 1}])]


def _return(rid, rec, lines) -> dict:
    return {"return_id": rid, "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": rec}, "lines": lines}


def old_detail(lines: bytes) -> bytes:
    """A receipt's per-line detail as receipts stored it before m013."""
    return msgspec.json.encode({"lines": {str(no): {
        "qty": str(ln.qty), "amount": ln.amount, "points": ln.points, "pairs": {a.rule: a.points for a in ln.accrued},
        "redeemed": ln.redeemed, "discount": ln.discount} for no, ln in line_records.decode(lines).items()}})


def to_older_format(path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("unpack", 1, unpack)
    conn.create_function("old_detail", 1, old_detail)
    conn.executescript("""
BEGIN;
DROP TRIGGER postings_append_only_update;
UPDATE postings SET hash = lower(hex(hash));
CREATE TRIGGER postings_append_only_update BEFORE UPDATE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only: post a correction instead'); END;
CREATE TABLE receipts_old (
    store_id TEXT NOT NULL, register_id TEXT NOT NULL, receipt_id TEXT NOT NULL, body_sha256 TEXT NOT NULL,
    member_id INTEGER REFERENCES members(id), ts TEXT NOT NULL, local_date TEXT NOT NULL, total INTEGER NOT NULL,
    rules_version TEXT NOT NULL, status TEXT NOT NULL, body BLOB NOT NULL, result BLOB NOT NULL,
    detail BLOB NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (store_id, register_id, receipt_id)) WITHOUT ROWID;
INSERT INTO receipts_old SELECT store_id, register_id, receipt_id, lower(hex(body_sha256)), member_id, ts,
    local_date, total, rules_version, status, unpack(body), unpack(result), old_detail(lines),
    created_at FROM receipts;
DROP TABLE receipts;
ALTER TABLE receipts_old RENAME TO receipts;
CREATE INDEX receipts_member ON receipts(member_id, ts);
CREATE INDEX receipts_member_counts ON receipts(member_id, status, ts, total);
DROP INDEX lots_live;
CREATE INDEX lots_member ON lots(member_id);
ALTER TABLE lots DROP COLUMN remaining;
ALTER TABLE lots ADD COLUMN created_at TEXT NOT NULL DEFAULT '';
DROP INDEX returns_member;
CREATE TABLE cards_old (card TEXT PRIMARY KEY, member_id INTEGER NOT NULL REFERENCES members(id),
    created_at TEXT NOT NULL, card_last4 TEXT);
INSERT INTO cards_old SELECT card, member_id, created_at, card_last4 FROM cards;
DROP TABLE cards;
ALTER TABLE cards_old RENAME TO cards;
CREATE INDEX cards_member ON cards(member_id);
CREATE INDEX cards_unprotected ON cards(card) WHERE card_last4 IS NULL;
DROP TRIGGER postings_rule_totals;
DROP TABLE rule_totals;
DELETE FROM _sqlite_migrations WHERE name IN ('m013_compact_rows', 'm014_returns_member', 'm015_hot_lookups',
                                              'm016_rule_totals', 'm023_line_records', 'm038_takes_in_receipts');
COMMIT;
""")
    conn.close()


def without_times(answers: list) -> bytes:
    # Both runs read a clock that moves on in real time; everything else must be equal.
    return re.sub(rb'"\d{4}-\d\d-\d\dT[0-9:.+Z-]+"', b'"T"', msgspec.json.encode(answers))


async def run(tmp_path, upgrade: bool) -> list:
    answers = []
    for phase in (0, 1):
        app = create_app(test_config(tmp_path, NOW))
        async with TestClient(TestServer(app)) as client:
            api = Api(client)
            if phase == 0:
                await api.post("/v1/members", {"card": "1"})
                for body in RECEIPTS:
                    answers.append(await api.post("/v1/receipts", body, as_="register"))
                for rid, rec, lines in RETURNS:
                    answers.append(await api.post("/v1/returns", _return(rid, rec, lines), as_="register"))
            else:
                for body in RECEIPTS:
                    answers.append(await api.post("/v1/receipts", body, as_="register"))
                for rid, rec, lines in RETURNS + LATER_RETURNS:
                    answers.append(await api.post("/v1/returns", _return(rid, rec, lines), as_="register"))
                answers.append(await api.get("/v1/members/1"))
                answers.append(await api.get("/v1/members/1/statement"))
        # Both start from per-rule accrual postings (before m030), which the older format had.
        if phase == 0:
            to_per_rule_postings(tmp_path / "loyalty.db")
        if phase == 0 and upgrade:
            conn = sqlite3.connect(tmp_path / "loyalty.db")
            assert conn.execute("SELECT COUNT(*) FROM receipts WHERE lines IS NOT NULL").fetchone()[0] == 3
            conn.close()
            to_older_format(tmp_path / "loyalty.db")
    return answers


async def test_older_database_upgrades_and_answers_the_same(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = await run(tmp_path / "a", upgrade=False)
    upgraded = await run(tmp_path / "b", upgrade=True)
    assert [s for s, _ in upgraded] == [201] * 5 + [200] * 5 + [201] * 2 + [200] * 2
    assert without_times(upgraded) == without_times(straight)
    conn = sqlite3.connect(tmp_path / "b" / "loyalty.db")
    assert conn.execute("SELECT DISTINCT typeof(hash) FROM postings").fetchall() == [("blob",)]
    report = verify(conn)
    assert report.ok, report.problems                   # rule_totals among what it checks
    assert report.receipts == 3
    assert conn.execute("SELECT COUNT(*) FROM rule_totals").fetchone()[0] >= 2


async def test_the_log_says_which_migrations_an_upgrade_applied(tmp_path, caplog):
    import logging

    import sqlite_utils

    from storage.schema import migrations
    db = sqlite_utils.Database(tmp_path / "loyalty.db")
    migrations.apply(db, stop_before="m039_stranded_customer_value")      # a database two versions behind
    db.close()
    for upgrade in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loyalty.server"):
            async with TestClient(TestServer(create_app(test_config(tmp_path, now=NOW)))) as client:
                assert (await client.get("/readyz")).status == 200
        upgraded = [r.getMessage() for r in caplog.records if "schema upgraded" in r.getMessage()]
        if upgrade:
            assert len(upgraded) == 1 and upgraded[0].startswith(
                "database schema upgraded: 2 migration(s) applied (m039_stranded_customer_value to "
                "m040_erased_members) in "), upgraded
        else:
            assert upgraded == []                   # a start with nothing to apply says nothing of it


async def test_a_database_a_newer_version_upgraded_is_refused_in_one_line(tmp_path):
    import sqlite_utils

    from server.startup import StartupError
    from storage.schema import migrations
    db = sqlite_utils.Database(tmp_path / "loyalty.db")
    migrations.apply(db)
    db["_sqlite_migrations"].insert({"migration_set": "loyalty", "name": "m999_from_a_newer_version",
                                     "applied_at": "2027-01-01 00:00:00+00:00"})
    db.close()
    server = TestServer(create_app(test_config(tmp_path, now=NOW)))
    with pytest.raises(StartupError) as e:
        await server.start_server()
    await server.close()
    assert str(e.value) == (f"cannot open the database {tmp_path / 'loyalty.db'}: a newer version of the server "
                            "upgraded it (migration(s) m999_from_a_newer_version, which this version does not know); "
                            "start that version again, or restore the backup taken before the upgrade")
