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


def ref(receipt_id: str, register: str = "K01") -> dict:
    return {"store_id": "S001", "register_id": register, "receipt_id": receipt_id}


def a_return(return_id: str, receipt_id: str, lines: list[tuple[int, int]], register: str = "K01") -> dict:
    return {"return_id": return_id, "store_id": "S001", "register_id": register, "receipt": ref(receipt_id),
            "lines": [{"line_no": no, "qty": qty} for no, qty in lines]}


async def member_with(api, card: str, points: int) -> dict:
    status, member = await api.post("/v1/members", {"card": card})
    assert status == 201, member
    if points:
        status, adj = await api.post("/v1/admin/adjustments", {"card": card, "points": points, "reason": "r",
                                                               "adjustment_id": f"start-{card}"})
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
