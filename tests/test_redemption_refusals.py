"""A refused redemption below min_points says what fell short: the points asked for, the
receipt itself (its lines that points may pay for allow fewer than min_points), or the
member's points (how many they have beside other receipts' holds, and how many were asked)."""
from __future__ import annotations

from conftest import line, receipt

CARD = "7000000000021"
NOW = "2026-11-25T18:00:00+02:00"


async def refused(api, receipt_id: str, lines: list[dict], redeem: int) -> dict:
    status, err = await api.post("/v1/receipts/calculate", receipt(receipt_id, lines, card=CARD, redeem=redeem),
                                 as_="register")
    assert status == 422, err
    return err["error"]


async def test_each_refusal_names_what_fell_short(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})   # the welcome event's 100 points
    status, _ = await api.post("/v1/admin/adjustments", {"card": CARD, "points": 900, "reason": "goodwill",
                                                         "adjustment_id": "adj-1"})
    assert status == 201
    # Too few asked for: the request is what to change.
    err = await refused(api, "r1", [line(1, "dairy", 10000)], redeem=5)
    assert (err["code"], err["message"]) == ("below_min_redemption", "at least 10 points must be redeemed at once")
    # Only alcohol, which points may not pay for: asking for more would not help.
    err = await refused(api, "r2", [line(1, "alcohol", 10000)], redeem=50)
    assert err["code"] == "below_min_redemption"
    assert err["message"] == ("this receipt may be paid with at most 0 points (its lines that points may pay for), "
                              "fewer than the 10 that must be redeemed at once")
    assert err["details"] == [{"path": "redeem_points", "message": err["message"]}]
    # Half of 15.00 is 7 points: the receipt, not the request, is too small.
    err = await refused(api, "r3", [line(1, "dairy", 1500)], redeem=100)
    assert "at most 7 points" in err["message"]


async def test_too_few_points_says_how_many_the_member_has_and_how_many_were_asked(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})   # the welcome event's 100 points
    # Another register holds 95 of them: 5 are left to this receipt, below the 10 of min_points.
    status, r = await api.post("/v1/receipts/calculate", receipt("other", [line(1, "dairy", 50000)], card=CARD,
                                                                 register="K02", redeem=95), as_="register")
    assert status == 200 and r["balance"] == {"available": 5, "pending": 0, "held": 95}, r
    message = ("50 points asked for; the member has 5 available after what registers hold for other receipts, "
               "fewer than the 10 that must be redeemed at once")
    for path in ("/v1/receipts/calculate", "/v1/receipts"):
        status, r = await api.post(path, receipt("r4", [line(1, "dairy", 50000)], card=CARD, redeem=50),
                                   as_="register")
        assert status == 422, r
        assert r["error"] == {"code": "insufficient_points", "message": message,
                              "details": [{"path": "redeem_points", "message": message}]}
    # The held receipt's own hold is its to spend: asked again for more, it redeems all 100.
    status, r = await api.post("/v1/receipts", receipt("other", [line(1, "dairy", 50000)], card=CARD,
                                                       register="K02", redeem=150), as_="register")
    assert status == 201 and r["redeemed"]["points"] == 100, r
    # Nothing left: the refusal says 0, whatever was asked.
    status, r = await api.post("/v1/receipts", receipt("r5", [line(1, "dairy", 50000)], card=CARD, redeem=20),
                               as_="register")
    assert status == 422 and r["error"]["message"] == (
        "20 points asked for; the member has 0 available after what registers hold for other receipts, "
        "fewer than the 10 that must be redeemed at once"), r


async def test_a_negative_adjustment_beyond_the_balance_says_how_many_there_are(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})   # 100 points
    status, r = await api.post("/v1/receipts/calculate", receipt("held", [line(1, "dairy", 50000)], card=CARD,
                                                                 redeem=30), as_="register")
    assert status == 200 and r["hold"]["points"] == 30, r
    status, r = await api.post("/v1/admin/adjustments", {"card": CARD, "points": -80, "reason": "correction",
                                                         "adjustment_id": "adj-short"})
    message = "80 points asked for; the member has 70 available after what registers hold for other receipts"
    assert status == 422 and r["error"] == {"code": "insufficient_points", "message": message,
                                            "details": [{"path": "points", "message": message}]}, r
    _, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"] == {"available": 70, "pending": 0, "held": 30}
    status, r = await api.post("/v1/admin/adjustments", {"card": CARD, "points": -70, "reason": "correction",
                                                         "adjustment_id": "adj-all"})
    assert status == 201 and r["balance"]["available"] == 0, r
    status, r = await api.post("/v1/admin/adjustments", {"card": CARD, "points": -1, "reason": "correction",
                                                         "adjustment_id": "adj-one"})
    assert status == 422 and r["error"]["message"] == (
        "1 point asked for; the member has 0 available after what registers hold for other receipts"), r
