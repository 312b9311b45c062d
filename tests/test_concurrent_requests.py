"""Requests that overlap, as at a busy till: each answer and the ledger afterwards are those
of the requests run one after another in some order. On SQLite the one writer orders them;
on PostgreSQL (LOYALTY_TEST_BACKEND=postgresql) the server's connections run them at once,
as several servers' would, and the member's row lock orders them."""
from __future__ import annotations

import asyncio

from conftest import line, receipt

NOW = "2026-11-28T09:00:05+02:00"
TS = "2026-11-28T09:00:00+02:00"
CARD = "7000000000061"
OTHER = "7000000000062"
AT_ONCE = 6
WELCOME = 100


def ref(receipt_id: str, register: str = "K01") -> dict:
    return {"store_id": "S001", "register_id": register, "receipt_id": receipt_id}


def a_return(return_id: str, receipt_id: str, lines: list[tuple[int, int]], register: str = "K01") -> dict:
    return {"return_id": return_id, "store_id": "S001", "register_id": register, "receipt": ref(receipt_id),
            "lines": [{"line_no": no, "qty": qty} for no, qty in lines]}


async def member_with(api, card: str, points: int) -> dict:
    """A member with `points` available: the welcome event's 100, adjusted."""
    status, member = await api.post("/v1/members", {"card": card})
    assert status == 201, member
    if points != WELCOME:
        status, adj = await api.post("/v1/admin/adjustments", {"card": card, "points": points - WELCOME,
                                                               "reason": "r", "adjustment_id": f"start-{card}"})
        assert status == 201, adj
    return member


async def balance(api, card: str) -> dict:
    status, member = await api.get(f"/v1/members/{card}")
    assert status == 200, member
    return member["balance"]


def three_lines(receipt_id: str, card: str | None = CARD, redeem: int = 0) -> dict:
    return receipt(receipt_id, [line(1, "grocery", 30000, qty=3, sku="coffee-1"), line(2, "dairy", 20000, sku="cheese-1"),
                                line(3, "grocery", 50000, sku="tea-1")], card=card, ts=TS, redeem=redeem)


# ---------------------------------------------------------------- returns

async def test_the_same_return_sent_twice_at_once_is_written_once_and_replayed(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 0)
    assert (await api.post("/v1/receipts", three_lines("B-1"), as_="register"))[0] == 201
    body = a_return("RET-1", "B-1", [(1, 3), (3, 1)])
    answers = await asyncio.gather(*(api.post("/v1/returns", body, as_="register") for _ in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [200] * (AT_ONCE - 1) + [201], answers
    first = next(r for s, r in answers if s == 201)
    assert all(r == {**first, "replayed": True} for s, r in answers if s == 200)


async def test_returns_of_one_line_sent_at_once_never_return_more_than_was_sold(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 0)
    _, sold = await api.post("/v1/receipts", three_lines("B-1"), as_="register")
    answers = await asyncio.gather(*(api.post("/v1/returns", a_return(f"RET-{i}", "B-1", [(1, 2)]), as_="register")
                                     for i in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [201] + [422] * (AT_ONCE - 1), answers
    assert all(r["error"]["code"] == "return_exceeds_sold" for s, r in answers if s == 422)
    # What one return of 2 of the 3 units takes back, no more.
    reversed_ = next(r for s, r in answers if s == 201)["reversed"]["points"]
    assert (await balance(api, CARD))["pending"] == sold["accrued"]["points"] - reversed_


async def test_returns_of_a_receipt_without_a_card_sent_at_once_never_return_more_than_was_sold(make_api):
    api = await make_api(now=NOW)
    assert (await api.post("/v1/receipts", three_lines("A-1", card=None), as_="register"))[0] == 201
    answers = await asyncio.gather(*(api.post("/v1/returns", a_return(f"RET-{i}", "A-1", [(1, 2)]), as_="register")
                                     for i in range(AT_ONCE)))
    assert sorted(s for s, _ in answers) == [201] + [422] * (AT_ONCE - 1), answers


async def test_a_return_racing_the_cancel_of_its_receipt_takes_back_nothing_twice(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    _, sold = await api.post("/v1/receipts", three_lines("B-1", redeem=500), as_="register")
    assert sold["redeemed"]["points"] == 500
    (rs, ret), (cs, cancel) = await asyncio.gather(
        api.post("/v1/returns", a_return("RET-1", "B-1", [(3, 1)]), as_="register"),
        api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register"))
    assert cs == 200 and cancel["status"] == "cancelled", cancel
    # Either the return came first and the cancel reversed the rest, or the cancel came
    # first and the return found nothing left: the member is back where they started.
    assert (rs, rs == 422 and ret["error"]["code"]) in ((201, False), (422, "receipt_cancelled")), ret
    assert await balance(api, CARD) == {"available": 1000, "pending": 0, "held": 0}


# ---------------------------------------------------------------- holds, confirm and cancel

async def test_a_cancel_racing_the_confirm_of_its_receipt_leaves_it_wholly_one_or_the_other(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    body = three_lines("B-1", redeem=500)
    status, calc = await api.post("/v1/receipts/calculate", body, as_="register")
    assert status == 200 and calc["hold"]["points"] == 500
    (fs, confirmed), (cs, cancel) = await asyncio.gather(
        api.post("/v1/receipts", body, as_="register"),
        api.post("/v1/receipts/S001/K01/B-1/cancel", as_="register"))
    assert fs == 201 and cs == 200, (confirmed, cancel)
    after = await balance(api, CARD)
    if cancel["status"] == "cancelled":         # after the confirm: reversed whole
        assert after == {"available": 1000, "pending": 0, "held": 0}
    else:                                       # before it: the hold let go, the confirm paid anyway
        assert cancel["status"] == "hold_released", cancel
        assert after == {"available": 500, "pending": confirmed["accrued"]["points"], "held": 0}


async def test_calculating_one_receipt_at_once_holds_its_points_once(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    answers = await asyncio.gather(*(api.post("/v1/receipts/calculate", three_lines("B-1", redeem=400 + i),
                                              as_="register") for i in range(AT_ONCE)))
    assert [s for s, _ in answers] == [200] * AT_ONCE, answers
    assert (await balance(api, CARD))["held"] in {400 + i for i in range(AT_ONCE)}


async def test_holds_of_one_register_are_kept_from_confirms_on_others(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    assert (await api.post("/v1/receipts/calculate", three_lines("B-0", redeem=500), as_="register"))[0] == 200
    bodies = [receipt(f"B-{i}", [line(1, "grocery", 100000)], card=CARD, ts=TS, register=f"K{i:02d}", redeem=300)
              for i in range(1, AT_ONCE + 1)]
    answers = await asyncio.gather(*(api.post("/v1/receipts", b, as_="register") for b in bodies))
    assert all(s in (201, 422) for s, _ in answers), answers
    spent = sum(r["redeemed"]["points"] for s, r in answers if s == 201)
    assert spent <= 500
    assert (await balance(api, CARD))["available"] == 500 - spent
    status, held = await api.post("/v1/receipts", three_lines("B-0", redeem=500), as_="register")
    assert status == 201 and held["redeemed"]["points"] == 500, held


# ---------------------------------------------------------------- adjustments and member care

async def test_adjustments_racing_redemptions_never_spend_a_point_twice(make_api):
    api = await make_api(now=NOW)
    await member_with(api, CARD, 1000)
    calls = [api.post("/v1/admin/adjustments", {"card": CARD, "points": -300, "reason": "r", "adjustment_id": f"A-{i}"})
             for i in range(3)]
    calls += [api.post("/v1/receipts", receipt(f"B-{i}", [line(1, "grocery", 100000)], card=CARD, ts=TS,
                                               register=f"K{i:02d}", redeem=300), as_="register") for i in range(3)]
    answers = await asyncio.gather(*calls)
    assert all(s in (201, 422) for s, _ in answers), answers
    spent = sum(300 if "adjustment_id" in r else r["redeemed"]["points"] for s, r in answers if s == 201)
    assert spent <= 1000
    assert (await balance(api, CARD))["available"] == 1000 - spent


async def test_an_adjustment_racing_a_merge_reaches_the_points_of_the_member_they_went_to(make_api):
    api = await make_api(now=NOW)
    old = await member_with(api, CARD, 100)
    keep = await member_with(api, OTHER, 0)
    merge = {"merge_id": "MG-1", "from_member_id": old["member_id"], "into_member_id": keep["member_id"],
             "reason": "one customer"}
    (ms, merged), (as_, adjusted) = await asyncio.gather(
        api.post("/v1/admin/members/merge", merge),
        api.post("/v1/admin/adjustments", {"card": CARD, "points": 50, "reason": "r", "adjustment_id": "A-1"}))
    assert ms == 201, merged
    # Before the merge, its points went along; after it, the card is refused as merged.
    assert as_ == 201 or (as_, adjusted["error"]["code"]) == (422, "card_merged"), adjusted
    kept = await balance(api, OTHER)
    assert kept["available"] == 100 + (50 if as_ == 201 else 0)
