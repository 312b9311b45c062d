"""A refused redemption below min_points says what fell short: the points asked for, or the
receipt itself (its lines that points may pay for allow fewer than min_points)."""
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
