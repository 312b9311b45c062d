"""Backtests with the member facts recorded with each receipt: a segment, a personal offer,
a coupon and a control group cost what they really cost, in `rules diff`, the console's
backtest and the explanation of a stored receipt.

One member, in the list segment `staff`, holding a 500-point offer of `comeback`, sends a
coupon of `xmas` on the first of two receipts and is in the control group of
`fruit-bonus` (holdout 0.5; m_1's draw is below it). A receipt confirmed before member
facts were recorded is replayed as a returning first-tier member and counted.

The old program per 500.00 receipt of fruit: base 1 % = 5, staff-bonus 50, comeback 300
(the offer's 500 less what earlier receipts took), xmas-coupon 200 with a usable code,
fruit-bonus 2 % = 10 held back from the control group. The new one gives staff-bonus 80,
comeback 400, xmas-coupon 250 and fruit-bonus without a control group.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from contextlib import closing

import pytest
from conftest import receipt
from test_console import Console, run_backtest
from test_rules_tools import write_config

from rules import holdout_member
from server.cli import main
from server.keys import DATABASE
from storage import member_facts

NOW = "2026-11-24T12:00:05+02:00"
CARD = "7000000000001"
SETTINGS = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}, {id: silver, from: 100000}]}
stores: [{id: S001}]
segments:
  define:
    - {id: staff, list: true}
coupons:
  - {id: xmas, uses_per_code: 1}
"""
RULES = """\
rules:
  - id: base
    reward: {percent: 1}
  - id: staff-bonus
    when: {segment: staff}
    reward: {points: 50}
  - id: comeback
    personal: true
    reward: {points: 300}
  - id: xmas-coupon
    when: {coupon: xmas}
    reward: {points: 200}
  - id: fruit-bonus
    scope: {categories: [fruit]}
    reward: {percent: 2}
    holdout: 0.5
"""
NEW_RULES = (RULES.replace("{points: 50}", "{points: 80}").replace("{points: 300}", "{points: 400}")
             .replace("{points: 200}", "{points: 250}").replace("    holdout: 0.5\n", ""))
OLD = {"base": 15, "staff-bonus": 100, "comeback": 500, "xmas-coupon": 200, "fruit-bonus": 0}
# R1: 5 + 80 + 400 + 250 + 10; R2: 5 + 80 + 100 (the offer's 500 less R1's 400) + 10; R0: 5.
NEW = {"base": 15, "staff-bonus": 160, "comeback": 500, "xmas-coupon": 250, "fruit-bonus": 20}


def fruit(receipt_id: str, day: str, **extra) -> dict:
    line = {"line_no": 1, "sku": "apples", "category": "fruit", "qty": 1, "price": 50000, "amount": 50000}
    return receipt(receipt_id, [line], card=CARD, ts=f"2026-11-{day}T12:00:00+02:00", **extra)


def by_rule(answer: dict) -> dict[str, int]:
    return {item["rule"]: item["points"] for item in answer["accrued"]["by_rule"]}


@pytest.fixture
async def history(make_api, tmp_path):
    """(api, program folder): R0 confirmed before the member joined anything (its record
    removed, as for a receipt confirmed before records were kept), then R1 with the code
    and R2 without, as the server answered them."""
    assert holdout_member("shop", "fruit-bonus", "m_1", 0.5)
    program = tmp_path / "program"
    program.mkdir()
    (program / "program.yaml").write_text(SETTINGS)
    (program / "rules.yaml").write_text(RULES)
    api = await make_api(now=NOW, program_dir=program)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    bread = receipt("R0", [{"line_no": 1, "sku": "loaf", "category": "bread", "qty": 1, "price": 50000,
                            "amount": 50000}], card=CARD, ts="2026-11-21T12:00:00+02:00")
    status, answer = await api.post("/v1/receipts", bread, as_="register")
    assert status == 201 and by_rule(answer) == {"base": 5}
    assert (await api.put("/v1/admin/segments/staff/members", {"cards": [CARD]}))[0] == 200
    offer = {"offer_id": "o-1", "rule": "comeback", "cards": [CARD], "from": "2026-11-01", "to": "2026-11-30",
             "points": 500}
    assert (await api.post("/v1/admin/offers", offer))[0] == 201
    status, codes = await api.post("/v1/admin/coupons/xmas/codes", {"count": 1})
    assert status == 201
    status, first = await api.post("/v1/receipts", fruit("R1", "22", coupons=codes["codes"]), as_="register")
    assert status == 201 and first["coupons"][0]["status"] == "applied"
    assert by_rule(first) == {"base": 5, "staff-bonus": 50, "comeback": 300, "xmas-coupon": 200}
    status, second = await api.post("/v1/receipts", fruit("R2", "23"), as_="register")
    assert status == 201 and by_rule(second) == {"base": 5, "staff-bonus": 50, "comeback": 200}
    db = api.client.server.app[DATABASE]
    await db.write(lambda conn: conn.execute("UPDATE receipts SET member_facts = NULL WHERE receipt_id = 'R0'"))
    return api, program


async def test_a_confirmed_receipt_records_the_member_as_the_rules_saw_them(history):
    api, _ = history
    db = api.client.server.app[DATABASE]
    first, second = await db.read(lambda conn: [member_facts.read(conn, ("S001", "K01", r)) for r in ("R1", "R2")])
    assert (first.member_id, first.tier.id, first.receipt_number, first.segments) == ("m_1", "base", 2, ["staff"])
    assert (first.tier.spend, first.tier.receipts, first.tier.window_days) == (50000, 1, 365)
    assert first.offers == [member_facts.OfferFact("comeback", 500, 300)]
    assert first.coupons == [member_facts.CouponFact("xmas", "usable")]
    assert first.held_out == [member_facts.HeldOut("fruit-bonus", 10)]
    assert second.offers == [member_facts.OfferFact("comeback", 200, 200)] and second.coupons == []
    raw = await db.read(lambda conn: conn.execute("SELECT member_facts FROM receipts WHERE member_facts IS NOT NULL").fetchall())
    assert not any(b"xmas-" in row[0].lower() for row in raw)     # codes are never kept


async def test_rules_diff_costs_segment_offer_coupon_and_holdout_rules_with_the_recorded_facts(
        history, tmp_path, capsys):
    _, program = history
    config = write_config(tmp_path, program)
    out = tmp_path / "receipts.jsonl"
    assert main(["export", "receipts", "--config", str(config), "--out", str(out)]) == 0
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "program.yaml").write_text(SETTINGS)
    (changed / "rules.yaml").write_text(NEW_RULES)
    capsys.readouterr()
    assert main(["rules", "diff", str(program), str(changed), "--receipts", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {row["rule"]: row["old"] for row in report["rules"]} == OLD      # what the server gave
    assert {row["rule"]: row["new"] for row in report["rules"]} == NEW
    assert (report["old_total"], report["new_total"]) == (815, 945)
    assert (report["receipts"], report["anonymous"], report["without_member_facts"]) == (3, 0, 1)
    assert main(["rules", "diff", str(program), str(changed), "--receipts", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 receipt(s) without recorded member facts" in text and text.splitlines()[-1].split() == \
        ["total", "815", "945", "+130"]


async def test_the_console_backtest_uses_the_recorded_facts(history):
    api, program = history
    console = Console(api.client)
    await console.sign_in()
    text = (program / "rules.yaml").read_text()
    _, page = await run_backtest(console, NEW_RULES, hashlib.sha256(text.encode()).hexdigest(), file="rules.yaml")
    cells = {rule: re.findall(r"<td>([^<]*)</td>", row)
             for rule, row in re.findall(r'<tr id="diff-([^"]+)">(.*?)</tr>', page, re.S)}
    assert {rule: int(c[0]) for rule, c in cells.items()} == OLD
    assert {rule: int(c[1]) for rule, c in cells.items()} == NEW
    # Cost: points x 1.00 UAH; the offer's cost stays 500 points, the coupon's grows by 50.
    assert cells["comeback"][3:6] == ["500.00 UAH", "500.00 UAH", "0.00 UAH"]
    assert cells["xmas-coupon"][3:6] == ["200.00 UAH", "250.00 UAH", "50.00 UAH"]
    assert cells["fruit-bonus"][3:6] == ["0.00 UAH", "20.00 UAH", "20.00 UAH"]
    assert "130.00 UAH" in page
    found = re.search(r'<span id="backtest-without-facts">\s*(\d+) receipt', page)
    assert found and found.group(1) == "1"


async def test_explain_a_stored_receipt_with_its_facts_and_a_pasted_one_with_the_member_now(history):
    api, _ = history
    console = Console(api.client)
    await console.sign_in()
    status, _, page = await console.post("/console/explain", {"stored": "S001/K01/R2"})
    assert status == 200 and 'data-source="recorded"' in page
    outcomes = dict(re.findall(r'<tr id="why-([^"]+)" class="([^"]+)">', page))
    assert outcomes["staff-bonus"] == "applied" and outcomes["comeback"] == "applied"
    assert outcomes["xmas-coupon"] == "not-applicable" and outcomes["fruit-bonus"] == "not-applicable"
    assert "comeback (200 points left)" in page and "holdout: the member is in the control group" in page
    assert "Total: 255 point(s)" in page
    status, _, page = await console.post("/console/explain", {"stored": "S001/K01/R1"})
    assert "Total: 555 point(s)" in page and "coupons of xmas" in page
    # Pasted with a new code: the member as now (no offer points left), the code judged but not used.
    status, codes = await api.post("/v1/admin/coupons/xmas/codes", {"count": 1})
    assert status == 201
    db = api.client.server.app[DATABASE]
    uses = "SELECT COALESCE(SUM(uses), 0) FROM coupon_codes"
    assert (await db.read(lambda conn: conn.execute(uses).fetchone()))[0] == 1
    pasted = fruit("P1", "24", coupons=codes["codes"])
    status, _, page = await console.post("/console/explain", {"receipt": json.dumps(pasted)})
    assert status == 200 and 'data-source="now"' in page and "The member as they are now" in page
    outcomes = dict(re.findall(r'<tr id="why-([^"]+)" class="([^"]+)">', page))
    assert outcomes["staff-bonus"] == "applied" and outcomes["xmas-coupon"] == "applied"
    assert outcomes["comeback"] == "not-applicable" and "comeback (0 points left)" in page and "receipt #4" in page
    assert (await db.read(lambda conn: conn.execute(uses).fetchone()))[0] == 1
    status, answer = await api.post("/v1/receipts", pasted, as_="register")
    assert status == 201 and answer["coupons"][0]["status"] == "applied"


async def test_erasure_takes_birthday_and_tags_out_of_the_recorded_facts(make_api, tmp_path):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/members", {"card": CARD, "birthday": "1990-05-17", "tags": ["vip"]}))[0] == 201
    line = {"line_no": 1, "sku": "milk", "category": "dairy", "qty": 1, "price": 9100, "amount": 9100}
    assert (await api.post("/v1/receipts", receipt("E1", [line], card=CARD), as_="register"))[0] == 201
    db = api.client.server.app[DATABASE]
    read = lambda conn: member_facts.read(conn, ("S001", "K01", "E1"))  # noqa: E731
    before = await db.read(read)
    assert (str(before.birthday), before.tags) == ("1990-05-17", ["vip"])
    assert (await api.post("/v1/admin/members/m_1/erase", {"reason": "customer asked"}))[0] == 200
    after = await db.read(read)
    assert (after.birthday, after.tags, after.member_id, after.tier) == (None, [], "m_1", before.tier)


def test_a_record_of_an_unknown_version_is_refused():
    record = member_facts.encode(member_facts.ReceiptMemberFacts(
        2, "m_1", member_facts.TierFacts("base", None, 365, 0, 0), [], None, None, 1, [], [], [], []))
    with pytest.raises(member_facts.UnknownVersion, match="version 2"):
        member_facts.decode(record)
    with closing(sqlite3.connect(":memory:")) as conn:
        assert member_facts.source(conn) == ("NULL", "")     # a database not upgraded has no records


async def test_rules_explain_of_a_receipt_file_uses_the_member_as_they_are_now(history, tmp_path, capsys):
    _, program = history
    config = write_config(tmp_path, program)
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(fruit("P2", "24")))
    capsys.readouterr()
    assert main(["rules", "explain", "--config", str(config), str(path)]) == 0
    captured = capsys.readouterr()
    assert "the member as they are now" in captured.err
    assert "segments [staff], offers [comeback (0 left)]" in captured.out
    assert re.search(r"staff-bonus +applied: 50 point", captured.out)
    assert re.search(r"comeback +not applicable: personal: the member's offer has no points left", captured.out)
