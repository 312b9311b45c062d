"""A receipt that neither redeems nor repays a debt counts its member's lots in one
statement (storage.ledger.lot_totals) instead of reading a row per lot, so its cost does not
grow with the member's history. The totals must be the balance the lots give: available
(debts counted against it), pending, and expired lots left out, on the day of arrival."""
from __future__ import annotations

import random

import msgspec
import pytest

from conftest import MARKET, line, migrated_connection
from conftest import receipt as receipt_json
from rules import load_program
from server import answer
from server.plan import MemberState, plan_calculate, plan_confirm, with_totals
from storage import ledger
from storage.ledger import Lot, balance_of, lot_totals
from test_late_receipts import confirm, setup
from test_receipt_plan import NOW, receipt, state

DAY = "2026-11-24"
DATES = ["2025-11-01", "2026-11-23", DAY, "2026-11-25", "2027-06-01"]


def random_lots(rng: random.Random, count: int) -> list[tuple[str, str | None, int]]:
    """(available_from, expires_on, remaining): pending, available and expired lots, lots
    expiring on the day itself, lots that never expire, lots used up, and debts."""
    out = []
    for _ in range(count):
        first = rng.choice(DATES[:4])
        expires = rng.choice([None, *[d for d in DATES if d >= first]])
        remaining = rng.choice([0, rng.randint(1, 500), rng.randint(1, 500), -rng.randint(1, 300)])
        out.append((first, expires, remaining))
    return out


def test_lot_totals_are_the_balance_the_lots_give(tmp_path):
    conn = migrated_connection(tmp_path / "loyalty.db")
    rng = random.Random(20261203)
    try:
        for n in range(60):
            member_id = ledger.insert_member(conn, card=f"{n:064x}", card_last4="0001", phone_hmac=None,
                                             phone_last4=None, birthday=None, tags="[]", referred_by=None,
                                             store_id=None, now="2026-11-24T10:00:00.000000Z")
            lots = random_lots(rng, rng.randint(0, 40))
            for first, expires, remaining in lots:
                conn.execute("INSERT INTO lots (member_id, available_from, expires_on, remaining) VALUES (?, ?, ?, ?)",
                             (member_id, first, expires, remaining))
            kept = balance_of(ledger.lots_of(conn, member_id), [], DAY)
            totals = lot_totals(conn, member_id, DAY)
            assert (totals.available, totals.pending) == (kept.available, kept.pending), lots
            assert totals.debts == sum(1 for *_, remaining in lots if remaining < 0)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def market():
    program = load_program(MARKET)
    yield program
    program.close()


LOTS = [(1, "2026-01-01", "2027-06-01", 300), (2, "2026-01-01", "2026-11-24", 200),   # 2 expired today
        (3, "2026-12-01", "2026-12-31", 500), (4, "2025-11-01", None, 40)]             # 3 pending


def from_totals(lots) -> MemberState:
    """The member of `state(lots)` as read_member_state reads it for a receipt that does not redeem."""
    read = state(lots)
    kept = balance_of(read.lots, [], DAY)
    return msgspec.structs.replace(read, lots=None, lot_totals=ledger.LotTotals(kept.available, kept.pending, 0))


@pytest.mark.no_database
def test_a_confirm_counted_from_totals_answers_what_its_lots_would(market):
    from_lots = plan_confirm(receipt((60000, 40000)), state(LOTS), market, NOW)
    counted = plan_confirm(receipt((60000, 40000)), from_totals(LOTS), market, NOW)
    assert counted.postings == from_lots.postings and counted.lots == from_lots.lots
    assert msgspec.to_builtins(answer.confirm_answer(counted, market)) == \
        msgspec.to_builtins(answer.confirm_answer(from_lots, market))
    earned = from_lots.evaluation.accrued_points
    assert (counted.balance.available, counted.balance.pending) == (340, 500 + earned)


@pytest.mark.no_database
def test_a_calculate_counted_from_totals_answers_what_its_lots_would(market):
    from_lots = plan_calculate(receipt((60000,)), state(LOTS), market, NOW)
    counted = plan_calculate(receipt((60000,)), from_totals(LOTS), market, NOW)
    assert msgspec.to_builtins(answer.calculate_answer(counted, market)) == \
        msgspec.to_builtins(answer.calculate_answer(from_lots, market))


@pytest.mark.no_database
def test_a_redemption_planned_against_totals_is_refused_not_drawn_from_nothing(market):
    with pytest.raises(RuntimeError, match="lots were not read"):
        plan_confirm(receipt((60000,), redeem=100), from_totals(LOTS), market, NOW)


@pytest.mark.no_database
def test_totals_add_to_the_new_lots_and_keep_the_holds():
    new = [Lot(-1, "2026-12-08", "2027-11-24", 15)]
    hold = ledger.Hold(("S001", "K02", "R-9"), 30, "2026-11-24T10:20:00.000000Z")
    counted = with_totals(balance_of(new, [], DAY), ledger.LotTotals(340, 500, 0), [hold])
    assert (counted.available, counted.pending, counted.held) == (340 - 30, 515, 30)


async def test_answers_agree_with_the_member_through_expiry_redemption_and_a_debt(make_api, tmp_path):
    """Through the API: answers counted from totals and from lots, and the member's own
    balance, agree as lots expire before arrival, are spent and fall into debt."""
    api = await setup(make_api, tmp_path)
    card = "7000000000001"

    async def agrees(res: dict) -> None:
        _, member = await api.get(f"/v1/members/{card}")
        assert res["balance"] == member["balance"]

    for n, ts in enumerate(["2026-10-01T12:00:00+03:00", "2026-11-05T12:00:00+02:00",
                            "2026-11-06T12:00:00+02:00", "2026-11-24T11:00:00+02:00"]):
        await agrees(await confirm(api, f"L-{n}", ts, 20000 + 1000 * n))    # expired, available, pending
    _, member = await api.get(f"/v1/members/{card}")
    spend = member["balance"]["available"]
    status, spent = await api.post("/v1/receipts", receipt_body("SPEND", card, spend), as_="register")
    assert status == 201 and spent["redeemed"]["points"] == spend
    await agrees(spent)
    status, _ = await api.post("/v1/returns", {
        "return_id": "X-1", "store_id": "S001", "register_id": "K01",
        "receipt": {"store_id": "S001", "register_id": "K01", "receipt_id": "L-1"},
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201
    _, member = await api.get(f"/v1/members/{card}")
    assert member["balance"]["available"] < 0       # the returned receipt's points were spent: a debt
    await agrees(await confirm(api, "AFTER", "2026-11-24T11:30:00+02:00", 90000))


def receipt_body(receipt_id: str, card: str, redeem: int) -> dict:
    return receipt_json(receipt_id, [line(1, "grocery", 50000)], card=card, ts="2026-11-24T11:10:00+02:00",
                        redeem=redeem)
