"""Enrollment, profiles, tiers and statements."""
from conftest import line, receipt

NOW = "2026-11-24T12:00:05+02:00"


async def test_enroll_twice_is_409_and_welcome_fires_once(make_api):
    api = await make_api(now=NOW)
    status, m = await api.post("/v1/members", {"card": "111", "tags": ["student"]})
    assert status == 201 and m["balance"]["available"] == 100 and m["member_id"].startswith("m_")
    status, err = await api.post("/v1/members", {"card": "111"})
    assert status == 409 and err["error"]["code"] == "card_already_enrolled"
    _, m2 = await api.get("/v1/members/111")
    assert m2["balance"]["available"] == 100


async def test_register_enrolls_only_at_its_store(make_api):
    api = await make_api(now=NOW)
    status, _ = await api.post("/v1/members", {"card": "222", "store_id": "S002"}, as_="register")
    assert status == 403
    status, _ = await api.post("/v1/members", {"card": "222", "store_id": "S001"}, as_="register")
    assert status == 201
    status, m = await api.get("/v1/members/222", as_="register")
    assert status == 200 and m["card"] == "222"


async def test_register_enrolls_at_its_only_store_without_naming_it(make_api):
    api = await make_api(now=NOW)
    status, m = await api.post("/v1/members", {"card": "223"}, as_="register")
    assert status == 201 and m["card"] == "223" and m["balance"]["available"] == 100
    status, err = await api.post("/v1/members", {"card": "223"}, as_="register")
    assert status == 409 and err["error"]["code"] == "card_already_enrolled"


async def test_manual_tier_shown_and_expires(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "333"})
    _, m = await api.get("/v1/members/333")
    assert m["tier"]["id"] == "base" and m["tier"]["next"] == "silver" and m["tier"]["to_next"] == 500000
    status, m = await api.put("/v1/admin/members/333/tier", {"tier": "gold", "until": "2026-12-31"})
    assert status == 200 and m["tier"]["id"] == "gold" and m["tier"]["manual"] is True
    _, later = await api.get("/v1/members/333?at=2027-01-01")
    assert later["tier"]["id"] == "base"
    status, err = await api.put("/v1/admin/members/333/tier", {"tier": "platinum", "until": "2026-12-31"})
    assert status == 422


async def test_a_manual_tier_ends_early_with_an_until_before_today(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "334"})
    status, m = await api.put("/v1/admin/members/334/tier", {"tier": "gold", "until": "2026-12-31"})
    assert status == 200 and m["tier"]["id"] == "gold" and m["tier"]["manual"] is True
    # No other call takes a manual tier away: an `until` already past ends it now.
    status, m = await api.put("/v1/admin/members/334/tier", {"tier": "gold", "until": "2026-01-01"})
    assert status == 200 and m["tier"]["id"] == "base" and not m["tier"].get("manual"), m["tier"]
    _, again = await api.get("/v1/members/334")
    assert again["tier"]["id"] == "base"


async def test_spend_moves_the_member_up_a_tier(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "444"})
    await api.post("/v1/receipts", receipt("T-1", [line(1, "electronics", 600000)], card="444"), as_="register")
    _, m = await api.get("/v1/members/444")
    assert m["tier"]["id"] == "silver" and m["tier"]["next"] == "gold" and m["tier"]["to_next"] == 1400000
    _, r = await api.post("/v1/receipts", receipt("T-2", [line(1, "electronics", 10000)], card="444",
                                                  ts="2026-11-24T12:00:01+02:00"), as_="register")
    assert r["accrued"]["by_rule"][0]["rule"] == "base-silver"


async def test_patch_profile(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "555"})
    status, m = await api.patch("/v1/members/555", {"phone": "+380501234567", "birthday": "1990-05-01"})
    assert status == 200 and m["profile"]["birthday"] == "1990-05-01"
    status, err = await api.patch("/v1/members/nobody", {"phone": "+380501234567"})
    assert status == 422 and err["error"]["code"] == "unknown_card"


async def test_a_birthday_before_1900_or_after_today_is_refused_naming_the_field(make_api):
    # Just past midnight in Kyiv, the day before in UTC: "today" is the program's local day.
    api = await make_api(now="2026-11-25T00:30:00+02:00")
    for birthday in ("0001-01-01", "1899-12-31", "9999-12-31", "2026-11-26"):
        status, err = await api.post("/v1/members", {"card": "600", "birthday": birthday})
        assert status == 422 and err["error"]["code"] == "validation_error", (birthday, err)
        assert err["error"]["details"] == [{"path": "birthday", "message": f"must be a day from 1900-01-01 to "
                                                                          f"today (2026-11-25), got {birthday}"}]
    assert (await api.get("/v1/members/600"))[0] == 404
    status, m = await api.post("/v1/members", {"card": "600", "birthday": "1900-01-01"})
    assert status == 201 and m["profile"]["birthday"] == "1900-01-01"
    for birthday in ("0001-01-01", "2026-11-26"):
        status, err = await api.patch("/v1/members/600", {"birthday": birthday})
        assert status == 422 and err["error"]["details"][0]["path"] == "birthday", err
    status, m = await api.patch("/v1/members/600", {"birthday": "2026-11-25"})    # born today
    assert status == 200 and m["profile"]["birthday"] == "2026-11-25"
    assert (await api.get("/v1/members/600"))[1]["profile"]["birthday"] == "2026-11-25"


async def test_statement_window_and_running_balance(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "666"})
    await api.post("/v1/admin/adjustments", {"card": "666", "points": 50, "reason": "r", "adjustment_id": "a1"})
    status, st = await api.get("/v1/members/666/statement?from=2026-11-24&to=2026-11-24")
    assert status == 200
    assert [p["kind"] for p in st["postings"]] == ["adjustment", "event"]
    assert [p["running_balance"] for p in st["postings"]] == [150, 100]
    assert st["postings"][0]["key_id"] == "manager"
    _, empty = await api.get("/v1/members/666/statement?to=2026-11-23")
    assert empty["postings"] == []


async def test_statement_limit_out_of_range_is_refused_not_stretched(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "667"})
    await api.post("/v1/admin/adjustments", {"card": "667", "points": 50, "reason": "r", "adjustment_id": "a1"})
    for limit in ("0", "-1", "1001"):
        status, err = await api.get(f"/v1/members/667/statement?limit={limit}")
        assert status == 422, (limit, err)
        assert err["error"]["details"] == [{"path": "limit", "message": "must be 1 to 1000"}]
    status, st = await api.get("/v1/members/667/statement?limit=1")
    assert status == 200 and [p["kind"] for p in st["postings"]] == ["adjustment"]
    status, st = await api.get("/v1/members/667/statement?limit=1000")
    assert status == 200 and len(st["postings"]) == 2


async def test_returned_amounts_no_longer_count_towards_the_tier(make_api):
    api = await make_api(now="2026-11-24T12:00:05+02:00")
    await api.post("/v1/members", {"card": "444"})
    await api.post("/v1/members", {"card": "445"})
    for card in ("444", "445"):
        body = receipt(f"T-{card}", [line(1, "grocery", 400000), line(2, "dairy", 200000)], card=card)
        assert (await api.post("/v1/receipts", body, as_="register"))[0] == 201
    ret = {"return_id": "RT-1", "store_id": "S001", "register_id": "K01", "lines": [{"line_no": 2, "qty": 1}],
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "T-444"}}
    assert (await api.post("/v1/returns", ret, as_="register"))[0] == 201
    _, m = await api.get("/v1/members/444")
    assert m["tier"]["value"] == 400000 and m["tier"]["id"] == "base"
    _, other = await api.get("/v1/members/445")
    assert other["tier"]["value"] == 600000 and other["tier"]["id"] == "silver"


async def test_a_moment_without_offset_is_local_time_and_an_unescaped_plus_is_an_offset(make_api):
    """As docs/integrators.md says of ?at=: what a curl user types in a URL works as meant."""
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "667"})
    for at in ("2026-11-24T12:01:00%2B02:00", "2026-11-24T12:01:00+02:00", "2026-11-24T12:01:00"):
        status, member = await api.get(f"/v1/members/667?at={at}")
        assert status == 200 and member["as_of"] == "2026-11-24T12:01:00+02:00", member
        assert member["balance"]["available"] == 100
    # 11:00 in Kyiv is before the enrolment; 11:00 UTC would be after it.
    _, before = await api.get("/v1/members/667?at=2026-11-24T11:00:00")
    assert before["as_of"] == "2026-11-24T11:00:00+02:00" and before["balance"]["available"] == 0
