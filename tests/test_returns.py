"""Returns and cancels: accrual reversed, spent points refunded, never more than sold."""
from conftest import connect, line, receipt

CARD = "7000000000002"
NOW = "2026-11-28T09:00:05+02:00"


async def gold_member_with_points(api):
    assert (await api.post("/v1/members", {"card": CARD}))[0] == 201
    status, _ = await api.put(f"/v1/admin/members/{CARD}/tier", {"tier": "gold", "until": "2027-12-31"})
    assert status == 200
    status, adj = await api.post("/v1/admin/adjustments", {"card": CARD, "points": 4900,
                                                           "reason": "migration", "adjustment_id": "adj-1"})
    assert status == 201, adj


def basket():
    return receipt("B-1", [line(1, "alcohol", 30000, sku="wine-1"), line(2, "dairy", 20000, sku="cheese-1"),
                           line(3, "grocery", 50000, sku="coffee-1")],
                   card=CARD, ts="2026-11-28T09:00:00+02:00", redeem=1000)


async def test_gold_member_redeems_then_returns_a_line(make_api):
    api = await make_api(now=NOW)
    await gold_member_with_points(api)
    status, res = await api.post("/v1/receipts", basket(), as_="register")
    assert status == 201, res
    assert res["redeemed"]["points"] == 350 and res["redeemed"]["discount"] == 35000
    assert [(x["line_no"], x["points"]) for x in res["redeemed"]["by_line"]] == [(2, 100), (3, 250)]
    acc = res["accrued"]
    assert acc["points"] == 87
    assert acc["by_rule"] == [{"rule": "base-gold", "points": 32}, {"rule": "dairy-x2", "points": 5},
                              {"rule": "big-basket", "points": 50}]
    assert {x["line_no"]: x["points"] for x in acc["by_line"]} == {1: 38, 2: 18, 3: 31}
    assert res["balance"] == {"available": 4650, "pending": 87, "held": 0}

    ret = {"return_id": "RET-1", "store_id": "S001", "register_id": "K01",
           "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "B-1"},
           "lines": [{"line_no": 3, "qty": 1}]}
    status, r = await api.post("/v1/returns", ret, as_="register")
    assert status == 201, r
    assert r["reversed"]["points"] == 31 and r["refunded"]["points"] == 250
    assert r["balance"] == {"available": 4900, "pending": 56, "held": 0}

    status, again = await api.post("/v1/returns", ret, as_="register")
    assert status == 200 and again["replayed"] is True and again["reversed"]["points"] == 31

    status, err = await api.post("/v1/returns", {**ret, "return_id": "RET-2"}, as_="register")
    assert status == 422 and err["error"]["code"] == "return_exceeds_sold"


async def test_partial_returns_reverse_floor_share_and_rest(make_api):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    body = receipt("P-1", [line(1, "grocery", 33300, qty=3)], card=CARD, ts="2026-11-28T09:00:00+02:00")
    _, res = await api.post("/v1/receipts", body, as_="register")
    earned = res["accrued"]["points"]   # 2% of 333.00 = 6.66 -> 6
    assert earned == 6
    ref = {"store_id": "S001", "register_id": "K01", "receipt_id": "P-1"}
    reversed_ = []
    for n in range(3):
        status, r = await api.post("/v1/returns", {"return_id": f"PR-{n}", "store_id": "S001", "register_id": "K01",
                                                   "receipt": ref, "lines": [{"line_no": 1, "qty": 1}]},
                                   as_="register")
        assert status == 201, r
        reversed_.append(r["reversed"]["points"])
    assert reversed_ == [2, 2, 2] and sum(reversed_) == earned
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"]["pending"] == 0


async def test_cancel_reverses_everything_and_is_idempotent(make_api):
    api = await make_api(now=NOW)
    await gold_member_with_points(api)
    await api.post("/v1/receipts", basket(), as_="register")
    status, c1 = await api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register")
    assert status == 200 and c1["status"] == "cancelled"
    assert c1["reversed"]["points"] == 87 and c1["refunded"]["points"] == 350
    assert c1["balance"] == {"available": 5000, "pending": 0, "held": 0}
    status, c2 = await api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register")
    assert status == 200 and c2["status"] == "cancelled" and c2["already"] is True
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == {"available": 5000, "pending": 0, "held": 0}


async def test_return_of_unknown_receipt_or_line(make_api):
    api = await make_api(now=NOW)
    ref = {"store_id": "S001", "register_id": "K01", "receipt_id": "nope"}
    status, err = await api.post("/v1/returns", {"return_id": "X", "store_id": "S001", "register_id": "K01",
                                                 "receipt": ref, "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 422 and err["error"]["code"] == "receipt_not_found"
    await api.post("/v1/members", {"card": CARD})
    await api.post("/v1/receipts", receipt("L-1", [line(1, "grocery", 1000)], card=CARD,
                                           ts="2026-11-28T09:00:00+02:00"), as_="register")
    ref["receipt_id"] = "L-1"
    status, err = await api.post("/v1/returns", {"return_id": "Y", "store_id": "S001", "register_id": "K01",
                                                 "receipt": ref, "lines": [{"line_no": 7, "qty": 1}]}, as_="register")
    assert status == 422 and err["error"]["details"][0]["path"] == "lines[0].line_no"


async def test_returns_read_receipt_bodies_packed_any_way(make_api, tmp_path):
    """Bodies stored as zstd frames (now), as zlib streams with the default or a small
    window (before) and as plain JSON all serve a return; nothing is rewritten on upgrade."""
    import zlib

    from storage.ledger import unpack

    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": CARD})
    lines = [line(n, "grocery", 10000 + n, sku=f"sku-{n}") for n in range(1, 21)]
    kinds = ("Z-NEW", "Z-ZLIB", "Z-ZLIB-SMALL", "Z-JSON")
    for rid in kinds:
        status, res = await api.post("/v1/receipts", receipt(rid, lines, card=CARD, ts="2026-11-28T09:00:00+02:00"),
                                     as_="register")
        assert status == 201, res
    with connect(tmp_path / "loyalty.db") as conn:
        new = conn.execute("SELECT body FROM receipts WHERE receipt_id = 'Z-NEW'").fetchone()[0]
        assert new[:4] == b"\x28\xb5\x2f\xfd"      # a zstd frame
        body = unpack(new)
        small = zlib.compressobj(1, zlib.DEFLATED, 12, 4)
        for rid, stored in (("Z-ZLIB", zlib.compress(body, 6)), ("Z-ZLIB-SMALL", small.compress(body) + small.flush()),
                            ("Z-JSON", body)):
            conn.execute("UPDATE receipts SET body = ? WHERE receipt_id = ?", (stored, rid))
    for rid in kinds:
        ret = {"return_id": f"R-{rid}", "store_id": "S001", "register_id": "K01",
               "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": rid},
               "lines": [{"line_no": 20, "qty": 1}]}
        status, r = await api.post("/v1/returns", ret, as_="register")
        assert status == 201, r
        assert r["reversed"]["points"] > 0
