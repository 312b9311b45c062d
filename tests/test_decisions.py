"""The contract's decisions (rules.md, "Decisions where the text above left a choice"),
each end to end: HTTP in, exact numbers out, the ledger afterwards. Late receipts, the
tier at ts and receipt_number have their own file (test_late_receipts.py)."""
from datetime import datetime

from conftest import connect, line, receipt
from decision_program import NOW, points_of, write_program
from server.keys import CLOCK
from storage.audit import verify

CARD = "7000000000001"
TODAY = "2026-11-24T10:00:00+02:00"
LAUNCH = """  - id: launch
    reward: {percent: 10}
    budget: {points: 30}
"""
BOOST = """  - id: boost
    group: earn
    priority: 5
    reward: {percent: 3}
    budget: {points: 4}
"""
QUESTIONNAIRE = """  - {id: questionnaire, on: profile_completed, reward: {points: 50}}
"""


async def setup(make_api, tmp_path, extra: str = "", events: str = ""):
    program = write_program(tmp_path / "program", extra)
    if events:
        text = (program / "program.yaml").read_text()
        (program / "program.yaml").write_text(text.replace("rules:\n", events + "rules:\n", 1))
    api = await make_api(now=NOW, program_dir=program)
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    return api


async def confirm(api, receipt_id: str, lines: list, ts: str = TODAY, card: str = CARD, **extra) -> dict:
    status, res = await api.post("/v1/receipts", receipt(receipt_id, lines, card=card, ts=ts, **extra),
                                 as_="register")
    assert status == 201, res
    return res


async def give_back(api, return_id: str, receipt_id: str, lines: list) -> dict:
    status, res = await api.post("/v1/returns", {
        "return_id": return_id, "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": receipt_id}, "lines": lines},
        as_="register")
    assert status == 201, res
    return res


def audit_ok(tmp_path) -> None:
    with connect(tmp_path / "loyalty.db") as conn:
        report = verify(conn)
    assert report.ok, report.problems


async def test_the_points_discount_spreads_by_largest_remainder_ties_to_the_lower_line(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    res = await confirm(api, "S-1", [line(n, "grocery", 10000) for n in (3, 1, 2)], redeem=10)
    # 10 points (10.00) over three equal lines: the odd point and kopeck go to line 1.
    assert sorted((x["line_no"], x["points"], x["discount"]) for x in res["redeemed"]["by_line"]) == \
        [(1, 4, 334), (2, 3, 333), (3, 3, 333)]


async def test_returns_in_parts_take_the_floor_and_the_last_takes_the_rest(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    # 3 x 33.33: 10 points paid (10.00); 0.90 at 1 % + 7 (first) + 3 (daily) = 10.9 -> 10 earned.
    res = await confirm(api, "P-1", [line(1, "grocery", 10000, qty=3)], redeem=10)
    assert res["accrued"]["points"] == 10 and res["redeemed"]["points"] == 10
    parts = [await give_back(api, f"PR-{n}", "P-1", [{"line_no": 1, "qty": 1}]) for n in range(3)]
    assert [p["reversed"]["points"] for p in parts] == [3, 3, 4]
    assert [p["refunded"]["points"] for p in parts] == [3, 3, 4]
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == {"available": 100, "pending": 0, "held": 0}
    audit_ok(tmp_path)


async def test_limits_come_back_with_a_cancel_not_with_a_return(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    first = await confirm(api, "L-1", [line(1, "grocery", 10000)])
    assert points_of(first, "daily") == 3
    await give_back(api, "LR-1", "L-1", [{"line_no": 1, "qty": 1}])
    same_day = await confirm(api, "L-2", [line(1, "grocery", 10000)], ts="2026-11-24T11:00:00+02:00")
    assert points_of(same_day, "daily") == 0

    yesterday = await confirm(api, "L-3", [line(1, "grocery", 10000)], ts="2026-11-23T10:00:00+02:00")
    assert points_of(yesterday, "daily") == 3
    assert (await api.post("/v1/receipts/S001/K01/L-3/cancel", as_="register"))[0] == 200
    again = await confirm(api, "L-4", [line(1, "grocery", 10000)], ts="2026-11-23T11:00:00+02:00")
    assert points_of(again, "daily") == 3


async def test_budgets_are_charged_the_attributed_points_and_returns_give_them_back(make_api, tmp_path):
    api = await setup(make_api, tmp_path, extra=LAUNCH)
    first = await confirm(api, "B-1", [line(1, "grocery", 10000), line(2, "grocery", 10000)])
    assert points_of(first, "launch") == 20
    back = await give_back(api, "BR-1", "B-1", [{"line_no": 2, "qty": 1}])
    assert {"rule": "launch", "points": 10} in back["reversed"]["by_rule"]
    # 30 - 20 + 10 left: the crossing receipt gets the remainder, the next one nothing.
    crossing = await confirm(api, "B-2", [line(1, "grocery", 30000)])
    assert points_of(crossing, "launch") == 20
    after = await confirm(api, "B-3", [line(1, "grocery", 30000)])
    assert points_of(after, "launch") == 0 and "launch" not in [x["rule"] for x in after["accrued"]["by_rule"]]
    audit_ok(tmp_path)


async def test_a_spent_budget_leaves_the_group_to_the_next_rule(make_api, tmp_path):
    api = await setup(make_api, tmp_path, extra=BOOST)
    one = await confirm(api, "X-1", [line(1, "grocery", 10000)])
    assert points_of(one, "boost") == 3 and points_of(one, "base") == 0
    two = await confirm(api, "X-2", [line(1, "grocery", 10000)], ts="2026-11-24T10:05:00+02:00")
    assert points_of(two, "boost") == 1 and points_of(two, "base") == 0       # the remainder
    three = await confirm(api, "X-3", [line(1, "grocery", 10000)], ts="2026-11-24T10:10:00+02:00")
    assert points_of(three, "boost") == 0 and points_of(three, "base") == 1


async def test_a_cancelled_receipt_gives_back_its_limits_and_no_longer_counts_and_replays_as_cancelled(
        make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    big = await confirm(api, "C-1", [line(1, "grocery", 150000)], ts="2026-11-20T12:00:00+02:00", redeem=20)
    assert [points_of(big, r) for r in ("base", "first", "daily")] == [14, 7, 3]
    status, cancelled = await api.post("/v1/receipts/S001/K01/C-1/cancel", as_="register")
    assert status == 200 and cancelled["balance"] == {"available": 100, "pending": 0, "held": 0}

    # Not silver (C-1 no longer counts), a first purchase again, the day's limit free again.
    after = await confirm(api, "C-2", [line(1, "grocery", 10000)], ts="2026-11-20T15:00:00+02:00")
    assert after["accrued"]["by_rule"] == [{"rule": "base", "points": 1}, {"rule": "first", "points": 7},
                                           {"rule": "daily", "points": 3}]

    _, statement = await api.get(f"/v1/members/{CARD}/statement")
    status, replay = await api.post("/v1/receipts", receipt("C-1", [line(1, "grocery", 150000)], card=CARD,
                                                            ts="2026-11-20T12:00:00+02:00", redeem=20),
                                    as_="register")
    assert status == 200 and replay["replayed"] is True and replay["cancelled"] is True
    assert replay["accrued"] == big["accrued"] and replay["redeemed"] == big["redeemed"]
    _, member = await api.get(f"/v1/members/{CARD}")
    assert replay["balance"] == member["balance"] == {"available": 100, "pending": 11, "held": 0}
    assert replay["messages"] == ["Receipt cancelled", "Balance: 100 points"]
    _, unchanged = await api.get(f"/v1/members/{CARD}/statement")
    assert unchanged["postings"] == statement["postings"]
    audit_ok(tmp_path)


async def test_event_points_are_available_at_once_and_expire_like_accrued_points(make_api, tmp_path):
    api = await setup(make_api, tmp_path, events=QUESTIONNAIRE)
    status, member = await api.post("/v1/members", {"card": "7000000000002", "phone": "+380501234567",
                                                    "birthday": "1990-05-05"})
    assert status == 201      # phone and birthday at enrollment complete the profile
    assert member["balance"] == {"available": 150, "pending": 0, "held": 0}
    assert member["expiring"] == [{"date": "2026-12-24", "points": 150}]
    _, before = await api.get("/v1/members/7000000000002?at=2026-12-23T23:59:59%2B02:00")
    _, on_the_day = await api.get("/v1/members/7000000000002?at=2026-12-24")
    assert before["balance"]["available"] == 150 and on_the_day["balance"]["available"] == 0


async def test_a_confirm_whose_hold_lapsed_is_computed_as_if_it_had_none(make_api, tmp_path):
    api = await setup(make_api, tmp_path)
    status, _ = await api.post("/v1/admin/adjustments", {"card": CARD, "points": 100, "reason": "goodwill",
                                                         "adjustment_id": "adj-1"})
    assert status == 201
    held = receipt("H-1", [line(1, "grocery", 100000)], card=CARD, ts=NOW, redeem=150)
    status, calc = await api.post("/v1/receipts/calculate", held, as_="register")
    assert status == 200 and calc["hold"]["points"] == 150

    api.client.app[CLOCK].set(datetime.fromisoformat("2026-11-24T12:20:05+02:00"))   # ttl is 15 minutes
    other = await confirm(api, "H-2", [line(1, "grocery", 100000)], ts="2026-11-24T12:20:00+02:00", redeem=100)
    assert other["redeemed"]["points"] == 100
    late = await confirm(api, "H-1", [line(1, "grocery", 100000)], ts=NOW, redeem=150)
    assert late["redeemed"]["points"] == 100 and late["balance"]["available"] == 0 and late["balance"]["held"] == 0
    audit_ok(tmp_path)
