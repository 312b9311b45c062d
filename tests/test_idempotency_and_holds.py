"""Retries, conflicting bodies, holds between two registers, and concurrent requests."""
import asyncio
from datetime import datetime, timedelta

from conftest import Api, line, receipt, test_config

from server.app import create_app
from server.keys import CLOCK

CARD = "7000000000003"
NOW = "2026-11-25T18:00:00+02:00"


def tv(receipt_id, register, ts, amount=200000, redeem=600):
    return receipt(receipt_id, [line(1, "electronics", amount, sku=f"tv-{receipt_id}")], card=CARD, ts=ts,
                   register=register, redeem=redeem)


async def member_with_1000(api):
    await api.post("/v1/members", {"card": CARD})
    status, _ = await api.post("/v1/admin/adjustments", {"card": CARD, "points": 900, "reason": "goodwill",
                                                         "adjustment_id": "adj-3"})
    assert status == 201


async def test_holds_retries_conflicts_and_cancel(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    ra = tv("C-1", "K01", "2026-11-25T18:00:00+02:00")
    status, r = await api.post("/v1/receipts/calculate", ra, as_="register")
    assert status == 200, r
    assert r["redeemed"]["points"] == 600 and r["hold"]["points"] == 600
    assert r["balance"]["available"] == 400 and r["balance"]["held"] == 600

    rb = tv("C-2", "K02", "2026-11-25T18:00:30+02:00")
    status, r = await api.post("/v1/receipts/calculate", rb, as_="register")
    assert status == 200
    assert r["redeemed"]["points"] == 400 and r["hold"]["points"] == 400
    assert r["balance"]["available"] == 0 and r["balance"]["held"] == 1000

    status, r = await api.post("/v1/receipts", ra, as_="register")
    assert status == 201
    assert r["redeemed"]["points"] == 600 and r["accrued"]["points"] == 78
    assert r["balance"] == {"available": 0, "held": 400, "pending": 78}

    status, r = await api.post("/v1/receipts", ra, as_="register")
    assert status == 200 and r["replayed"] is True and r["accrued"]["points"] == 78

    changed = tv("C-1", "K01", "2026-11-25T18:00:00+02:00", amount=200001)
    status, r = await api.post("/v1/receipts", changed, as_="register")
    assert status == 409 and r["error"]["code"] == "idempotency_conflict"

    status, r = await api.post("/v1/receipts/S001/K02/C-2/cancel", as_="register")
    assert status == 200 and r["status"] == "hold_released"
    status, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"] == {"available": 400, "held": 0, "pending": 78}


async def test_calculating_a_confirmed_receipt_again_answers_its_result_and_holds_nothing(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    ra = tv("C-1", "K01", "2026-11-25T18:00:00+02:00")
    status, confirmed = await api.post("/v1/receipts", ra, as_="register")
    assert status == 201 and confirmed["redeemed"]["points"] == 600
    status, again = await api.post("/v1/receipts/calculate", ra, as_="register")
    assert status == 200 and again["hold"] is None and again["replayed"] is True, again
    assert again["redeemed"] == confirmed["redeemed"] and again["accrued"] == confirmed["accrued"]
    _, member = await api.get(f"/v1/members/{CARD}")
    assert member["balance"] == {"available": 400, "pending": 78, "held": 0}
    other = tv("C-1", "K01", "2026-11-25T18:00:00+02:00", redeem=300)
    status, err = await api.post("/v1/receipts/calculate", other, as_="register")
    assert status == 409 and err["error"]["code"] == "idempotency_conflict"
    assert (await api.post("/v1/receipts/S001/K01/C-1/cancel", as_="register"))[0] == 200
    status, after = await api.post("/v1/receipts/calculate", ra, as_="register")
    assert status == 200 and after["hold"] is None and after["cancelled"] is True, after
    assert after["balance"] == {"available": 1000, "pending": 0, "held": 0}
    # The void sent again (its first answer lost) says so, with the balance to print.
    status, again = await api.post("/v1/receipts/S001/K01/C-1/cancel", as_="register")
    assert status == 200 and again == {"receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "C-1"},
                                       "status": "cancelled", "already": True,
                                       "balance": {"available": 1000, "pending": 0, "held": 0}}, again


async def test_calculating_a_confirmed_receipt_without_a_card_answers_its_result(make_api):
    api = await make_api(now=NOW)
    body = receipt("A-1", [line(1, "dairy", 10000)], ts="2026-11-25T18:00:00+02:00")
    status, confirmed = await api.post("/v1/receipts", body, as_="register")
    assert status == 201 and confirmed["member_id"] is None
    status, again = await api.post("/v1/receipts/calculate", body, as_="register")
    assert status == 200 and again["replayed"] is True and again["hold"] is None, again
    status, err = await api.post("/v1/receipts/calculate", dict(body, channel="web"), as_="register")
    assert status == 409 and err["error"]["code"] == "idempotency_conflict"


async def test_adjustment_replay_and_conflict(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    body = {"card": CARD, "points": 900, "reason": "goodwill", "adjustment_id": "adj-3"}
    status, r = await api.post("/v1/admin/adjustments", body)
    assert status == 200 and r["replayed"] is True
    status, r = await api.post("/v1/admin/adjustments", {**body, "points": 901})
    assert status == 409
    status, r = await api.post("/v1/admin/adjustments", {**body, "points": -5000, "adjustment_id": "adj-x"})
    assert status == 422 and r["error"]["code"] == "insufficient_points"
    status, r = await api.post("/v1/admin/adjustments", {**body, "points": -100, "adjustment_id": "adj-y"})
    assert status == 201 and r["balance"]["available"] == 900


async def test_fifty_identical_confirms_write_once(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    body = tv("SAME-1", "K01", "2026-11-25T18:00:00+02:00", redeem=100)
    answers = await asyncio.gather(*(api.post("/v1/receipts", body, as_="register") for _ in range(50)))
    statuses = sorted(s for s, _ in answers)
    assert statuses == [200] * 49 + [201]
    results = [{k: v for k, v in r.items() if k != "replayed"} for _, r in answers]
    assert all(r == results[0] for r in results)
    _, st = await api.get(f"/v1/members/{CARD}/statement")
    redemptions = [p for p in st["postings"] if p["kind"] == "redemption"]
    assert sum(p["points"] for p in redemptions) == -100
    _, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"]["available"] == 900


async def test_two_registers_never_overspend(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    bodies = [tv(f"RACE-{i}", f"K{i:02d}", "2026-11-25T18:00:00+02:00", redeem=600) for i in range(6)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    spent = sum(r["redeemed"]["points"] for s, r in answers if s == 201)
    assert all(s in (201, 422) for s, _ in answers)
    assert spent <= 1000
    _, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"]["available"] == 1000 - spent >= 0


async def test_concurrent_receipts_of_one_member_each_see_the_one_before(make_api):
    # Each must answer as if they had come one after another (limits, balances), not
    # from the same snapshot, even when they share one group commit.
    api = await make_api(now=NOW)
    await member_with_1000(api)
    bodies = [tv(f"SEQ-{i}", f"K{i:02d}", "2026-11-25T18:00:00+02:00", amount=150000, redeem=0) for i in range(6)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert [s for s, _ in answers] == [201] * 6
    basket = [r for _, r in answers if any(x["rule"] == "big-basket" for x in r["accrued"]["by_rule"])]
    assert len(basket) == 1                                      # once a day per member
    pending = sorted(r["balance"]["pending"] for _, r in answers)
    assert len(set(pending)) == 6                                # each saw the points of the ones before
    _, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"]["pending"] == pending[-1]


async def api_with_clock(aiohttp_client, tmp_path):
    app = create_app(test_config(tmp_path, NOW))
    api = Api(await aiohttp_client(app))
    return api, app[CLOCK]


async def test_a_hold_expired_before_its_confirm_gives_way_to_other_registers(aiohttp_client, tmp_path):
    api, clock = await api_with_clock(aiohttp_client, tmp_path)
    await member_with_1000(api)
    ra = tv("C-1", "K01", "2026-11-25T18:00:00+02:00", redeem=600)
    status, calc = await api.post("/v1/receipts/calculate", ra, as_="register")
    assert status == 200 and calc["hold"]["points"] == 600
    clock.set(datetime.fromisoformat(calc["hold"]["expires_at"]) + timedelta(seconds=1))
    assert (await api.get(f"/v1/members/{CARD}"))[1]["balance"] == {"available": 1000, "pending": 0, "held": 0}
    # Another register spends what the hold no longer keeps; the late confirm pays with what is left.
    status, other = await api.post("/v1/receipts", tv("C-2", "K02", "2026-11-25T18:00:30+02:00", redeem=700),
                                   as_="register")
    assert status == 201 and other["redeemed"]["points"] == 700, other
    status, late = await api.post("/v1/receipts", ra, as_="register")
    assert status == 201 and late["redeemed"]["points"] == 300, late
    assert late["balance"]["available"] == 0 and late["balance"]["held"] == 0


async def test_a_confirm_with_another_body_than_its_calculate_consumes_the_hold_and_pays_what_it_asks(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    status, calc = await api.post("/v1/receipts/calculate", tv("C-1", "K01", "2026-11-25T18:00:00+02:00", redeem=600),
                                  as_="register")
    assert status == 200 and calc["hold"]["points"] == 600
    status, confirmed = await api.post("/v1/receipts", tv("C-1", "K01", "2026-11-25T18:00:00+02:00", redeem=200),
                                       as_="register")
    assert status == 201 and confirmed["redeemed"]["points"] == 200, confirmed
    assert (await api.get(f"/v1/members/{CARD}"))[1]["balance"]["held"] == 0
    assert confirmed["balance"]["available"] == 800


async def test_calculating_a_receipt_again_counts_its_own_hold_as_its_own(make_api):
    api = await make_api(now=NOW)
    await member_with_1000(api)
    body = tv("C-1", "K01", "2026-11-25T18:00:00+02:00", redeem=800)
    assert (await api.post("/v1/receipts/calculate", body, as_="register"))[1]["hold"]["points"] == 800
    status, again = await api.post("/v1/receipts/calculate", {**body, "redeem_points": 900}, as_="register")
    assert status == 200 and again["hold"]["points"] == 900, again
    assert again["balance"] == {"available": 100, "pending": 0, "held": 900}


async def test_a_hold_on_points_that_expire_under_it_holds_nothing(make_api):
    """Calculated at 23:58, the welcome points expire at midnight while the hold is open:
    the member owes nothing, so nothing shows below zero, and the confirm finds no points."""
    from datetime import datetime
    from server.keys import CLOCK
    api = await make_api(now="2026-11-24T12:00:05+02:00")
    await api.post("/v1/members", {"card": CARD})              # 100 points, gone from 2027-11-24
    api.client.app[CLOCK].set(datetime.fromisoformat("2027-11-23T23:58:00+02:00"))
    body = receipt("E-1", [line(1, "grocery", 30000)], card=CARD, ts="2027-11-23T23:57:00+02:00", redeem=50)
    status, r = await api.post("/v1/receipts/calculate", body, as_="register")
    assert status == 200 and r["balance"] == {"available": 50, "pending": 0, "held": 50}
    api.client.app[CLOCK].set(datetime.fromisoformat("2027-11-24T00:02:00+02:00"))
    _, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"] == {"available": 0, "pending": 0, "held": 0}
    status, r = await api.post("/v1/receipts", body, as_="register")
    assert status == 422 and r["error"]["code"] == "insufficient_points", r
    status, r = await api.post("/v1/receipts", {**body, "redeem_points": 0}, as_="register")
    assert status == 201 and r["balance"] == {"available": 0, "pending": 6, "held": 0}, r


async def test_a_return_under_a_hold_leaves_the_hold_what_is_left(make_api):
    """Points a return takes back were only held, not spent: the hold shrinks to what is
    left instead of the member's available points going below zero."""
    from datetime import datetime
    from server.keys import CLOCK
    api = await make_api(now="2026-11-24T12:00:05+02:00")
    await api.post("/v1/members", {"card": CARD})
    sale = receipt("S-1", [line(1, "grocery", 500000)], card=CARD, ts="2026-11-24T12:00:00+02:00")
    status, r = await api.post("/v1/receipts", sale, as_="register")
    assert status == 201 and r["accrued"]["points"] == 150           # 2% of 5,000.00 and big-basket's 50
    api.client.app[CLOCK].set(datetime.fromisoformat("2026-12-09T12:00:00+02:00"))   # active from 12-08
    body = receipt("S-2", [line(1, "grocery", 100000)], card=CARD, ts="2026-12-09T11:59:00+02:00", redeem=250)
    status, r = await api.post("/v1/receipts/calculate", body, as_="register")
    assert status == 200 and r["balance"] == {"available": 0, "pending": 0, "held": 250}, r
    status, r = await api.post("/v1/returns", {"return_id": "X-1", "store_id": "S001", "register_id": "K01",
                                               "receipt": {"store_id": "S001", "register_id": "K01",
                                                           "receipt_id": "S-1"},
                                               "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201 and r["reversed"]["points"] == 150
    assert r["balance"] == {"available": 0, "pending": 0, "held": 100}, r
    _, m = await api.get(f"/v1/members/{CARD}")
    assert m["balance"] == {"available": 0, "pending": 0, "held": 100}
    status, r = await api.post("/v1/receipts", body, as_="register")
    assert status == 201 and r["redeemed"]["points"] == 100, r
