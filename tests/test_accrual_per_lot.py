"""A receipt's accrual is one posting per lot, split by rule beside it (posting_rules, m030):
the statement still says what each rule earned, budgets, returns, cancels, the campaign
report and audit verify count rules from the split; a database whose receipts posted one
accrual per rule upgrades and keeps verifying, returning and cancelling."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from aiohttp.test_utils import TestClient, TestServer

from conftest import MARKET, Api, connect, line, receipt, tamper, test_config
from server.app import create_app
from storage.audit import verify

NOW = "2026-11-24T12:00:05+02:00"
FIXTURES = Path(__file__).parent / "fixtures"
# Dairy earns base, dairy-x2 and big-basket on one lot.
SEVERAL = receipt("R-1", [line(1, "dairy", 60000, qty=3), line(2, "grocery", 70000)], card="1")


def accruals(path) -> list[tuple]:
    conn = connect(path)
    try:
        return conn.execute("SELECT p.id, p.lot_id, p.points, p.rule_id, "
                            "(SELECT COUNT(*) FROM posting_rules WHERE posting_id = p.id) "
                            "FROM postings p WHERE kind = 'accrual' ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_several_rules_on_one_lot_post_once_and_the_statement_lists_each_rule(make_api, tmp_path):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    status, answer = await api.post("/v1/receipts", SEVERAL, as_="register")
    assert status == 201
    earned = {item["rule"]: item["points"] for item in answer["accrued"]["by_rule"] if item["points"]}
    assert len(earned) == 3
    [(posting_id, lot, points, rule, splits)] = accruals(tmp_path / "loyalty.db")
    assert points == answer["accrued"]["points"] and rule is None and splits == len(earned)
    status, statement = await api.get("/v1/members/1/statement")
    assert status == 200
    entries = [p for p in statement["postings"] if p["kind"] == "accrual"]
    assert {p["rule"]: p["points"] for p in entries} == earned and len(entries) == 3
    assert {p["id"] for p in entries} == {posting_id}
    # newest first: each entry's running balance is the next one's plus its points
    for newer, older in zip(entries, entries[1:]):
        assert newer["running_balance"] == older["running_balance"] + newer["points"]
    assert entries[0]["running_balance"] == statement["postings"][0]["running_balance"]
    assert all("by_rule" not in p for p in statement["postings"])
    report = verify(connect(tmp_path / "loyalty.db"))
    assert report.ok, report.problems


async def test_a_return_and_a_cancel_take_back_by_rule_and_budgets_count_it(make_api, tmp_path):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    _, answer = await api.post("/v1/receipts", SEVERAL, as_="register")
    back = {"return_id": "T-1", "store_id": "S001", "register_id": "K01",
            "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "R-1"},
            "lines": [{"line_no": 1, "qty": 1}]}
    status, returned = await api.post("/v1/returns", back, as_="register")
    assert status == 201 and returned["reversed"]["points"] > 0
    status, _ = await api.post("/v1/receipts/S001/K01/R-1/cancel", None, as_="register")
    assert status == 200
    conn = connect(tmp_path / "loyalty.db")
    totals = dict(conn.execute("SELECT rule_id, points FROM rule_totals"))
    assert set(totals) >= {item["rule"] for item in answer["accrued"]["by_rule"] if item["points"]}
    assert all(points == 0 for points in totals.values())      # earned, reversed, cancelled: nothing left
    reversals = conn.execute("SELECT rule_id, SUM(points) FROM postings WHERE kind = 'reversal' GROUP BY rule_id")
    assert {rule: -points for rule, points in reversals} == \
        {item["rule"]: item["points"] for item in answer["accrued"]["by_rule"] if item["points"]}
    report = verify(conn)
    assert report.ok, report.problems
    _, member = await api.get("/v1/members/1")
    assert member["balance"] == {"available": 100, "pending": 0, "held": 0}   # the welcome points


async def test_audit_names_an_accrual_whose_split_was_changed(make_api, tmp_path):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    await api.post("/v1/receipts", SEVERAL, as_="register")
    [(posting_id, *_)] = accruals(tmp_path / "loyalty.db")
    conn = connect(tmp_path / "loyalty.db")
    tamper(conn, "posting_rules", "UPDATE posting_rules SET points = points + 5 WHERE posting_id = ? "
           "AND rule_id = 'base'", (posting_id,))
    report = verify(conn)
    assert not report.ok
    assert report.problems[0].startswith(f"posting {posting_id}: accrual of ")


@pytest.mark.sqlite_only(reason="upgrades an SQLite file written before m030")
async def test_per_rule_postings_upgrade_to_their_split_and_keep_their_totals(tmp_path):
    """tests/fixtures/line_records_before.sql posted one accrual per rule (as every database
    before m030 did): each becomes its own split, the totals stay, and a cancel of a receipt
    several rules earned on takes back what each rule has left."""
    conn = sqlite3.connect(tmp_path / "loyalty.db")
    conn.executescript((FIXTURES / "line_records_before.sql").read_text())
    per_rule = conn.execute("SELECT id, rule_id, points FROM postings WHERE kind = 'accrual' ORDER BY id").fetchall()
    totals = dict(conn.execute("SELECT rule_id, points FROM rule_totals"))
    conn.close()
    assert len({rule for _, rule, _ in per_rule}) >= 3
    async with TestClient(TestServer(create_app(test_config(tmp_path, NOW)))) as client:
        api = Api(client)
        for receipt_id in ("R-1", "R-6"):          # three rules each; R-1 partly returned already
            status, cancel = await api.post(f"/v1/receipts/S001/K01/{receipt_id}/cancel", None, as_="register")
            assert status == 200 and cancel["status"] == "cancelled"
        status, answer = await api.post("/v1/receipts", receipt("R-9", SEVERAL["lines"], card="2"), as_="register")
        assert status == 201
        status, statement = await api.get("/v1/members/1/statement")
    conn = sqlite3.connect(tmp_path / "loyalty.db")
    assert conn.execute("SELECT posting_id, rule_id, points FROM posting_rules WHERE posting_id <= ? "
                        "ORDER BY posting_id", (per_rule[-1][0],)).fetchall() == per_rule
    old = [p for p in statement["postings"] if p["kind"] == "accrual"]
    assert old and all(p["rule"] for p in old)
    cancelled = dict(conn.execute("SELECT rule_id, -SUM(points) FROM postings WHERE kind = 'reversal' "
                                  "AND ref = 'cancel' GROUP BY rule_id"))
    assert cancelled == {"base": 22 + 3, "dairy-x2": 8 + 2, "big-basket": 43, "morning": 2}
    earned = {item["rule"]: item["points"] for item in answer["accrued"]["by_rule"] if item["points"]}
    expected = {rule: totals.get(rule, 0) - cancelled.get(rule, 0) + earned.get(rule, 0)
                for rule in totals.keys() | earned.keys()}
    assert dict(conn.execute("SELECT rule_id, points FROM rule_totals")) == expected
    assert conn.execute("SELECT COUNT(*) FROM postings WHERE kind = 'accrual' AND receipt_id = 'R-9'").fetchone() == (1,)
    report = verify(conn)
    assert report.ok, report.problems



FLASH = "rules:\n  - {id: flash, reward: {points: 7}, expires_in_days: 30}\n"


async def test_the_answer_gives_the_earliest_date_the_receipts_points_expire(make_api, tmp_path):
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "flash.yaml").write_text(FLASH)     # 7 points in a lot of their own, a month
    api = await make_api(now=NOW, program_dir=program)
    await api.post("/v1/members", {"card": "1"})
    sale = receipt("R-F", [line(1, "grocery", 10000)], card="1")
    status, calculated = await api.post("/v1/receipts/calculate", sale, as_="register")
    assert status == 200
    status, confirmed = await api.post("/v1/receipts", sale, as_="register")
    assert status == 201
    for answer in (calculated, confirmed):
        assert answer["accrued"]["points"] == 9      # 2 of base (a year), 7 of flash (30 days)
        assert answer["accrued"]["expires_on"] == "2026-12-24"
    _, member = await api.get("/v1/members/1")
    assert {"date": "2026-12-24", "points": 7} in member["expiring"]
    assert {"date": "2027-11-24", "points": 102} in member["expiring"]   # base's and the welcome points


async def test_points_of_the_programs_expiry_alone_answer_its_date(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    status, answer = await api.post("/v1/receipts", receipt("R-B", [line(1, "grocery", 10000)], card="1"),
                                    as_="register")
    assert status == 201 and answer["accrued"]["points"] == 2
    assert answer["accrued"]["expires_on"] == "2027-11-24"
