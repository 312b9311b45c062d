"""`loyalty migrate sqlite-to-postgres`: a SQLite installation made through the API (members,
receipts, one paid with points, a return, a cancel, a coupon, an adjustment, a merge) copied into an
empty PostgreSQL database, whose balances, rule totals and rows are then SQLite's, its
member chains and anchors verifying. A target that is not empty, a serving server, a
SQLite ledger edited by hand and a copy that does not verify are refused, the target left
as it was.

Each test gets a fresh database of a throwaway cluster (tests/pg_cluster.py) and skips,
saying why, without PostgreSQL.
"""
from __future__ import annotations

import asyncio
import sqlite3

import pytest
import sqlite_utils
from conftest import Api, serve_program

from server.cli import main
from server.startup import take_serve_lock
from storage.pg import copy as pg_copy
from storage.pg.audit import verify as pg_verify
from storage.pg.connection import connect
from storage.schema import migrations

NOW = "2026-12-10T12:00:00+02:00"
PRIVACY = {"hmac_key": "the-key-of-the-migration-tests"}
PROGRAM = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
coupons:
  - {id: winter, uses_per_code: 1, valid: {from: "2026-12-01", to: "2026-12-31"}}
events:
  - {id: welcome, on: enrolled, reward: {points: 100}}
rules:
  - id: base
    reward: {percent: 2}
  - id: coats-x2
    scope: {categories: [coats]}
    reward: {percent: 2}
  - id: winter-coupon
    when: {coupon: winter}
    reward: {points: 100}
"""
# Every table the copy writes, compared row for row by count (the chain and total tables
# are PostgreSQL's own, checked by audit verify).
BALANCES = "SELECT member_id, SUM(points) FROM postings GROUP BY member_id ORDER BY member_id"
NO_TABLES = "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'"
RULE_TOTALS = "SELECT rule_id, SUM(points) FROM rule_totals GROUP BY rule_id HAVING SUM(points) <> 0 ORDER BY rule_id"


def sale(receipt_id: str, card: str, amount: int, codes: tuple[str, ...] = (), redeem: int = 0) -> dict:
    body = {"receipt_id": receipt_id, "store_id": "S001", "register_id": "K1", "ts": NOW, "card": card,
            "lines": [{"line_no": 1, "sku": "coat", "category": "coats", "qty": 1, "price": amount, "amount": amount},
                      {"line_no": 2, "sku": "hat", "category": "hats", "qty": 1, "price": 5_000, "amount": 5_000}],
            "total": amount + 5_000}
    if codes:
        body["coupons"] = list(codes)
    if redeem:
        body["redeem_points"] = redeem
    return body


async def a_shop(aiohttp_client, tmp_path) -> None:
    """The installation to move, made through the API, then stopped."""
    api: Api = await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, PRIVACY)
    ids = {}
    for card in ("c1", "c2", "c3", "c4"):
        status, member = await api.post("/v1/members", {"card": card})
        assert status == 201, member
        ids[card] = member["member_id"]
    status, body = await api.post("/v1/admin/coupons/winter/codes", {"count": 1})
    assert status == 201, body
    answers = []
    for receipt in (sale("r1", "c1", 20_000, codes=(body["codes"][0],)), sale("r2", "c2", 30_000),
                    sale("r3", "c1", 10_000, redeem=50), sale("r4", "c3", 40_000)):
        status, answer = await api.post("/v1/receipts", receipt, as_="register")
        assert status == 201, answer
        answers.append(answer)
    assert [c["status"] for c in answers[0]["coupons"]] == ["applied"]
    status, returned = await api.post("/v1/returns", {
        "return_id": "x1", "store_id": "S001", "register_id": "K1",
        "receipt": {"store_id": "S001", "register_id": "K1", "receipt_id": "r2"}, "lines": [{"line_no": 1, "qty": 1}]},
        as_="register")
    assert status == 201 and returned["reversed"]["points"] > 0, returned
    assert (await api.post("/v1/receipts/S001/K1/r4/cancel", as_="register"))[0] == 200
    status, adjusted = await api.post("/v1/admin/adjustments", {"card": "c2", "adjustment_id": "goodwill-1",
                                                                 "points": 25, "reason": "a late delivery"})
    assert status == 201, adjusted
    # Into a member enrolled later: the copied row names a member after it.
    status, merged = await api.post("/v1/admin/members/merge", {
        "merge_id": "mg-1", "from_member_id": ids["c1"], "into_member_id": ids["c4"], "reason": "two cards"})
    assert status == 201 and merged["points_moved"] > 0, merged
    await api.client.close()


async def moved(tmp_path, url: str, *extra: str) -> int:
    return await asyncio.to_thread(main, ["migrate", "sqlite-to-postgres", "--from", str(tmp_path / "loyalty.db"),
                                          "--to", url, *extra])


def pg_rows(url: str, sql: str) -> list[tuple]:
    conn = connect(url)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def lite_rows(tmp_path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "loyalty.db") as conn:
        return conn.execute(sql).fetchall()


def counts(rows) -> dict[str, int]:
    return {t: rows(f"SELECT COUNT(*) FROM {t}")[0][0] for t in COPIED}


# Tables the shop above writes rows to, compared by count (the chain and total tables are
# PostgreSQL's own, checked by its audit).
COPIED = ("members", "cards", "lots", "postings", "posting_rules", "receipts", "returns", "return_lines",
          "adjustments", "coupon_codes", "coupon_uses", "event_fires", "rule_fires", "events", "program_versions",
          "program_loads", "audit_log", "privacy_keys", "member_merges", "retired_cards")


async def test_an_installation_made_through_the_api_moves_with_its_balances(aiohttp_client, tmp_path, pg_url,
                                                                             capsys):
    await a_shop(aiohttp_client, tmp_path)
    assert await moved(tmp_path, pg_url) == 0
    out = capsys.readouterr()
    liability = lite_rows(tmp_path, "SELECT SUM(points) FROM postings")[0][0]
    assert liability > 0
    assert f"SQLite {tmp_path / 'loyalty.db'}: ok:" in out.out and "PostgreSQL test" in out.out
    assert out.out.count(f"outstanding liability: {liability} points") == 2, out.out
    assert "postings: " in out.err and "rows copied" in out.err

    assert pg_rows(pg_url, BALANCES) == lite_rows(tmp_path, BALANCES)
    assert pg_rows(pg_url, RULE_TOTALS) == lite_rows(tmp_path, RULE_TOTALS)
    assert pg_rows(pg_url, "SELECT id, remaining FROM lots ORDER BY id") == lite_rows(
        tmp_path, "SELECT id, remaining FROM lots ORDER BY id")
    assert counts(lambda sql: pg_rows(pg_url, sql)) == counts(lambda sql: lite_rows(tmp_path, sql))
    facts = "SELECT receipt_id, member_facts FROM receipts WHERE member_facts IS NOT NULL ORDER BY receipt_id"
    assert pg_rows(pg_url, facts) == lite_rows(tmp_path, facts) != []
    taken = "SELECT receipt_id, takes FROM receipts WHERE takes IS NOT NULL ORDER BY receipt_id"   # the code's use
    assert pg_rows(pg_url, taken) == lite_rows(tmp_path, taken) != []
    # The planner has statistics at once, not after autovacuum's first pass.
    analyzed = "SELECT COUNT(DISTINCT tablename) FROM pg_stats WHERE tablename IN ('members', 'postings', 'lots')"
    assert pg_rows(pg_url, analyzed) == [(3,)]
    assert "statistics: " in out.err
    names = "SELECT adjustment_id, key_name FROM adjustments"
    assert pg_rows(pg_url, names) == lite_rows(tmp_path, names)
    conn = connect(pg_url)
    try:
        report = pg_verify(conn)
        assert report.ok, report.problems
        assert report.liability == liability
        # Ids go on after the copied ones: a member enrolled on PostgreSQL is the next.
        highest = conn.execute("SELECT MAX(id) FROM members").fetchone()[0]
        new = conn.execute("INSERT INTO members (enrolled_at, updated_at) VALUES ('t', 't') RETURNING id").fetchone()
        assert new[0] == highest + 1
    finally:
        conn.close()


async def test_events_a_webhook_was_still_owed_are_owed_on_postgresql(aiohttp_client, tmp_path, pg_url, capsys):
    """SQLite's webhook cursors become PostgreSQL's fan-out queue: whatever the furthest
    behind of them had not passed is queued, nothing before it."""
    await a_shop(aiohttp_client, tmp_path)
    with sqlite3.connect(tmp_path / "loyalty.db") as conn:
        conn.execute("INSERT INTO event_fanout (webhook_id, after_id) VALUES ('crm', 5), ('warehouse', 3)")
    assert await moved(tmp_path, pg_url) == 0
    owed = lite_rows(tmp_path, "SELECT id FROM events WHERE id > 3 ORDER BY id")
    assert owed and owed[0] == (4,)
    assert pg_rows(pg_url, "SELECT event_id FROM event_fanout_pending ORDER BY event_id") == owed


async def test_a_target_that_is_not_empty_is_refused(aiohttp_client, tmp_path, pg_url, capsys):
    await a_shop(aiohttp_client, tmp_path)
    assert await moved(tmp_path, pg_url) == 0
    before = counts(lambda sql: pg_rows(pg_url, sql))
    assert await moved(tmp_path, pg_url) == 2
    assert "the target database is not empty" in capsys.readouterr().err
    assert counts(lambda sql: pg_rows(pg_url, sql)) == before


async def test_a_serving_server_is_refused(aiohttp_client, tmp_path, pg_url, capsys):
    await a_shop(aiohttp_client, tmp_path)
    with take_serve_lock(tmp_path / "loyalty.db"):
        assert await moved(tmp_path, pg_url) == 2
    assert "another loyalty server" in capsys.readouterr().err
    assert pg_rows(pg_url, NO_TABLES) == [(0,)]


async def test_a_sqlite_ledger_edited_by_hand_is_not_copied(aiohttp_client, tmp_path, pg_url, capsys):
    """New member chains would vouch for the edited row: the copy stops at SQLite's audit."""
    await a_shop(aiohttp_client, tmp_path)
    with sqlite3.connect(tmp_path / "loyalty.db") as conn:
        conn.execute("DROP TRIGGER postings_append_only_update")
        conn.execute("UPDATE postings SET points = points + 1000 WHERE id = (SELECT MIN(id) FROM postings)")
    assert await moved(tmp_path, pg_url) == 1
    out = capsys.readouterr().out
    assert "FAIL posting 1: hash does not match" in out and "not copying" in out
    assert pg_rows(pg_url, NO_TABLES) == [(0,)]


def test_a_sqlite_database_an_older_version_wrote_is_refused(tmp_path, pg_url, capsys):
    """Its shape is not this version's: the server migrates it at start, the copy does not."""
    db = sqlite_utils.Database(tmp_path / "loyalty.db")
    migrations.apply(db, stop_before="m031_fingerprints_without_cards")
    db.close()
    assert main(["migrate", "sqlite-to-postgres", "--from", str(tmp_path / "loyalty.db"), "--to", pg_url]) == 2
    err = capsys.readouterr().err
    assert "the two schemas differ (" in err
    assert "index coupon_codes_card on coupon_codes (card) partial: only on PostgreSQL" in err
    assert "open the SQLite database with this version's server once" in err


async def test_a_copy_that_does_not_verify_is_not_committed(aiohttp_client, tmp_path, pg_url, capsys, monkeypatch):
    await a_shop(aiohttp_client, tmp_path)
    monkeypatch.setattr(pg_copy, "_sum_rule_totals", lambda pg: None)     # a copy that forgets the totals
    assert await moved(tmp_path, pg_url) == 1
    out = capsys.readouterr().out
    assert "FAIL rule base: rule_totals says it issued 0 points" in out
    assert "nothing was committed" in out
    assert pg_rows(pg_url, "SELECT COUNT(*) FROM members") == [(0,)]
    # The target is still empty, so the copy may simply be run again.
    monkeypatch.undo()
    assert await moved(tmp_path, pg_url) == 0


@pytest.mark.parametrize("where", ["source", "target", "no server"])
async def test_a_database_that_cannot_be_reached_is_one_line(tmp_path, pg_url, capsys, where):
    source = tmp_path / "missing.db" if where == "source" else tmp_path / "loyalty.db"
    if where != "source":
        sqlite3.connect(source).close()
    url = {"source": pg_url, "target": pg_url.replace("/test", "/no_such_database_"),
           # libpq's answer when nothing listens has a hint on a second line
           "no server": f"postgresql://loyalty@/loyalty?host={tmp_path / 'no-socket'}&port=5432"}[where]
    status = await asyncio.to_thread(main, ["migrate", "sqlite-to-postgres", "--from", str(source), "--to", url])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("not copying: ") and err.count("\n") == 1, err
