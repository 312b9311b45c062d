"""Confirming receipts: accrual, activation, exclusions, anonymous receipts, validation."""
from conftest import line, receipt

CARD = "7000000000001"
NOW = "2026-11-24T12:00:05+02:00"


async def test_base_accrual_double_points_and_tobacco_exclusion(make_api):
    api = await make_api(now=NOW)
    status, _ = await api.post("/v1/members", {"card": CARD})
    assert status == 201
    body = receipt("A-1", [line(1, "dairy", 9100, qty=2), line(2, "bakery", 3000), line(3, "tobacco", 10000)],
                   card=CARD)
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 201, res
    acc = res["accrued"]
    assert acc["points"] == 4
    assert acc["available_from"] == "2026-12-08" and acc["expires_on"] == "2027-11-24"
    assert acc["by_rule"] == [{"rule": "base", "points": 2}, {"rule": "dairy-x2", "points": 2}]
    by_line = {x["line_no"]: x["points"] for x in acc["by_line"]}
    assert by_line[1] == 4 and by_line[2] == 0 and by_line.get(3, 0) == 0
    assert res["redeemed"]["points"] == 0
    assert res["balance"] == {"available": 100, "pending": 4, "held": 0}   # 100 from the welcome event
    assert res["replayed"] is False
    assert "4 points will be available from 08.12.2026" in res["messages"]

    status, member = await api.get(f"/v1/members/{CARD}?at=2026-12-08")
    assert status == 200
    assert member["balance"]["available"] == 104 and member["balance"]["pending"] == 0

    status, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == {"available": 100, "pending": 4, "held": 0}
    assert {"date": "2027-11-24", "points": 104} in member["expiring"]


async def test_ledger_postings_carry_rule_and_version(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    body = receipt("A-2", [line(1, "dairy", 9100, qty=2)], card=CARD)
    _, res = await api.post("/v1/receipts", body, as_="register")
    status, st = await api.get(f"/v1/members/{CARD}/statement")
    assert status == 200
    accruals = [p for p in st["postings"] if p["kind"] == "accrual"]
    # The receipt's one lot is one posting; the statement lists it once per rule that earned.
    assert len({p["id"] for p in accruals}) == 1
    assert {p["rule"]: p["points"] for p in accruals} == \
        {item["rule"]: item["points"] for item in res["accrued"]["by_rule"] if item["points"]}
    assert {p["rule"] for p in accruals} == {"base", "dairy-x2"}
    assert all(p["rules_version"] == res["rules_version"] for p in accruals)
    assert all(p["receipt"] == {"store_id": "S001", "register_id": "K01", "receipt_id": "A-2"} for p in accruals)
    assert st["postings"][0]["running_balance"] == 100 + res["accrued"]["points"]
    assert st["postings"][-1]["kind"] == "event" and st["postings"][-1]["running_balance"] == 100


async def test_receipt_without_card_is_stored_and_earns_nothing(make_api):
    api = await make_api(now=NOW)
    body = receipt("ANON-1", [line(1, "dairy", 5000)])
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 201
    assert res["member_id"] is None and res["accrued"]["points"] == 0
    status, again = await api.post("/v1/receipts", body, as_="register")
    assert status == 200 and again["replayed"] is True


async def test_unknown_card_is_refused(make_api):
    api = await make_api(now=NOW)
    status, res = await api.post("/v1/receipts", receipt("U-1", [line(1, "dairy", 5000)], card="999"),
                                 as_="register")
    assert status == 422 and res["error"]["code"] == "unknown_card"


async def test_total_must_match_lines_and_future_ts_refused(make_api):
    api = await make_api(now=NOW)
    body = receipt("V-1", [line(1, "dairy", 5000)])
    body["total"] = 5001
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 422 and res["error"]["details"][0]["path"] == "total"
    body = receipt("V-2", [line(1, "dairy", 5000)], ts="2026-11-24T12:10:00+02:00")
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 422 and res["error"]["details"][0]["path"] == "ts"
    body = receipt("V-3", [line(1, "dairy", 5000, qty=-1)])
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 422 and res["error"]["details"][0]["path"] == "lines[0].qty"


async def test_morning_bonus_on_weekday_hours(make_api):
    api = await make_api(now="2026-11-24T08:30:05+02:00")
    await api.post("/v1/members", {"card": CARD})
    body = receipt("M-1", [line(1, "bakery", 50000)], card=CARD, ts="2026-11-24T08:30:00+02:00")
    status, res = await api.post("/v1/receipts", body, as_="register")
    assert status == 201
    # base 2% of 500.00 = 10, morning 1% = 5
    assert res["accrued"]["by_rule"] == [{"rule": "base", "points": 10}, {"rule": "morning", "points": 5}]


async def test_big_basket_limited_to_once_a_day(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    first = receipt("BB-1", [line(1, "grocery", 100000)], card=CARD)
    second = receipt("BB-2", [line(1, "grocery", 100000)], card=CARD, ts="2026-11-24T12:00:01+02:00")
    _, r1 = await api.post("/v1/receipts", first, as_="register")
    _, r2 = await api.post("/v1/receipts", second, as_="register")
    assert {"rule": "big-basket", "points": 50} in r1["accrued"]["by_rule"]
    assert all(x["rule"] != "big-basket" for x in r2["accrued"]["by_rule"])
    # cancelling the first frees the day's allowance again
    status, _ = await api.post("/v1/receipts/S001/K01/BB-1/cancel", as_="register")
    assert status == 200
    third = receipt("BB-3", [line(1, "grocery", 100000)], card=CARD, ts="2026-11-24T12:00:02+02:00")
    _, r3 = await api.post("/v1/receipts", third, as_="register")
    assert {"rule": "big-basket", "points": 50} in r3["accrued"]["by_rule"]


async def test_fuel_partner_per_litre(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    body = receipt("F-1", [line(1, "fuel", 90000, qty="40.5")], card=CARD, store="F001")
    status, res = await api.post("/v1/receipts", body, as_="fuel")
    assert status == 201, res
    # base 2% of 900.00 = 18, fuel 1 point per litre = 40.5 -> 58.5 floored to 58
    assert res["accrued"]["points"] == 58
    assert res["accrued"]["by_rule"] == [{"rule": "base", "points": 18}, {"rule": "fuel", "points": 40}]


async def test_optional_fields_sent_as_null_count_as_not_sent(make_api):
    api = await make_api(now=NOW)
    status, member = await api.post("/v1/members", {"card": CARD, "phone": None, "tags": None, "referred_by": None})
    assert status == 201 and member["profile"]["tags"] == [], member
    plain = receipt("N-1", [line(1, "dairy", 9100)], card=CARD)
    nulls = dict(plain, channel=None, redeem_points=None, coupons=None,
                 lines=[dict(plain["lines"][0], flags=None, brand=None)])
    status, first = await api.post("/v1/receipts", nulls, as_="register")
    assert status == 201 and first["accrued"]["points"] == 3 and "coupons" not in first, first
    status, again = await api.post("/v1/receipts", plain, as_="register")   # the same receipt
    assert status == 200 and again["replayed"] is True, again


async def test_the_printed_lines_say_point_for_one_point(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    status, res = await api.post("/v1/receipts", receipt("P-1", [line(1, "bakery", 5000)], card=CARD), as_="register")
    assert status == 201 and res["accrued"]["points"] == 1, res
    assert res["messages"] == ["1 point will be available from 08.12.2026", "Balance: 100 points"]
