"""Campaign budgets hold under concurrent receipts and across restarts (the issued points
are kept in rule_totals, also in a database upgraded to it); a referral pays the
referrer once."""
import asyncio
import shutil
import sqlite3

import pytest

from conftest import MARKET, connect, line, receipt
from per_rule_postings import to_per_rule_postings
from storage.audit import verify

NOW = "2026-11-24T12:00:05+02:00"
EXTRA = """
rules:
  - id: launch
    reward: {points: 30}
    budget: {points: 50}
events:
  - {id: referral, on: referred_first_purchase, reward: {points: 500}}
"""


async def api_with_extra(make_api, tmp_path):
    program = tmp_path / "program"
    if not program.exists():
        shutil.copytree(MARKET, program)
        (program / "extra.yaml").write_text(EXTRA)
    return await make_api(now=NOW, program_dir=program)


def launch_points(result) -> int:
    return sum(x["points"] for x in result["accrued"]["by_rule"] if x["rule"] == "launch")


async def test_budget_is_never_exceeded_by_concurrent_receipts(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    for i in range(6):
        await api.post("/v1/members", {"card": f"c{i}"})
    bodies = [receipt(f"B-{i}", [line(1, "bakery", 1000)], card=f"c{i}") for i in range(6)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert all(s == 201 for s, _ in answers)
    given = sorted(launch_points(r) for _, r in answers)
    assert sum(given) == 50 and given[-2:] == [20, 30]     # the crossing receipt gets the remainder

    # A cancel gives its points back to the budget.
    full = next(r for _, r in answers if launch_points(r) == 30)
    ref = full["receipt"]
    status, _ = await api.post(f"/v1/receipts/{ref['store_id']}/{ref['register_id']}/{ref['receipt_id']}/cancel",
                               as_="register")
    assert status == 200
    _, again = await api.post("/v1/receipts", receipt("B-again", [line(1, "bakery", 1000)], card="c0",
                                                      ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert launch_points(again) == 30


async def test_budget_survives_a_restart(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "c"})
    await api.post("/v1/receipts", receipt("R-1", [line(1, "bakery", 1000)], card="c"), as_="register")
    await api.client.close()
    api2 = await api_with_extra(make_api, tmp_path)      # same database, new process state
    _, r = await api2.post("/v1/receipts", receipt("R-2", [line(1, "bakery", 1000)], card="c",
                                                   ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert launch_points(r) == 20


async def buy(api, receipt_id: str, card: str, second: int = 0):
    body = receipt(receipt_id, [line(1, "bakery", 1000)], card=card, ts=f"2026-11-24T12:00:{second:02d}+02:00")
    return await api.post("/v1/receipts", body, as_="register")


async def cancel(api, receipt_id: str):
    return await api.post(f"/v1/receipts/S001/K01/{receipt_id}/cancel", as_="register")


async def use_up_budget_then_cancel_one(make_api, tmp_path):
    """30 + 20 points of the 50-point launch budget, then the 30 given back: 20 issued."""
    api = await api_with_extra(make_api, tmp_path)
    for card in ("c0", "c1", "c2", "c3"):
        await api.post("/v1/members", {"card": card})
    answers = [await buy(api, "R-0", "c0"), await buy(api, "R-1", "c1")]
    assert [launch_points(r) for _, r in answers] == [30, 20]
    status, _ = await cancel(api, "R-0")
    assert status == 200
    await api.client.close()


def launch_total(tmp_path) -> int:
    conn = connect(tmp_path / "loyalty.db")
    try:
        kept = conn.execute("SELECT SUM(points) FROM rule_totals WHERE rule_id = 'launch'").fetchone()[0]
        assert verify(conn).ok
        return kept
    finally:
        conn.close()


async def test_budget_totals_survive_a_restart_and_the_cap_holds(make_api, tmp_path):
    await use_up_budget_then_cancel_one(make_api, tmp_path)
    assert launch_total(tmp_path) == 20
    api = await api_with_extra(make_api, tmp_path)       # same database, new process state
    status, r = await buy(api, "R-2", "c2", second=1)
    assert status == 201 and launch_points(r) == 30      # what the cancel gave back, no more
    status, r = await buy(api, "R-3", "c3", second=1)
    assert status == 201 and launch_points(r) == 0                # the budget is spent
    _, member = await api.get("/v1/members/c3")
    assert member["balance"]["pending"] + member["balance"]["available"] == 100   # the welcome points only
    await api.client.close()
    assert launch_total(tmp_path) == 50


def to_before_rule_totals(path) -> None:
    """The database as a server without m016 left it: postings only, one accrual per rule."""
    to_per_rule_postings(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
BEGIN;
DROP TRIGGER postings_rule_totals;
DROP TABLE rule_totals;
DELETE FROM _sqlite_migrations WHERE name = 'm016_rule_totals';
COMMIT;
""")
    conn.close()


@pytest.mark.sqlite_only(reason="upgrades an SQLite file written before m016")
async def test_budget_totals_of_an_upgraded_database_count_accruals_and_reversals(make_api, tmp_path):
    await use_up_budget_then_cancel_one(make_api, tmp_path)
    to_before_rule_totals(tmp_path / "loyalty.db")
    api = await api_with_extra(make_api, tmp_path)       # upgrades: rule_totals filled from postings
    status, r = await buy(api, "R-2", "c2", second=1)
    assert status == 201 and launch_points(r) == 30
    status, r = await buy(api, "R-3", "c3", second=1)
    assert status == 201 and launch_points(r) == 0
    await api.client.close()
    assert launch_total(tmp_path) == 50


async def test_referrer_earns_once_on_the_first_purchase(make_api, tmp_path):
    api = await api_with_extra(make_api, tmp_path)
    await api.post("/v1/members", {"card": "referrer"})
    status, _ = await api.post("/v1/members", {"card": "friend", "referred_by": "referrer"})
    assert status == 201
    status, err = await api.post("/v1/members", {"card": "x", "referred_by": "nobody"})
    assert status == 422 and err["error"]["code"] == "unknown_card"
    for n in range(2):
        await api.post("/v1/receipts", receipt(f"F-{n}", [line(1, "bakery", 1000)], card="friend",
                                               ts=f"2026-11-24T12:00:0{n}+02:00"), as_="register")
    _, m = await api.get("/v1/members/referrer")
    assert m["balance"]["available"] == 100 + 500
