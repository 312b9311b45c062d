"""The receipt path's pure part: plans from hand-built member states, no HTTP, no SQLite.

A plan carries every number the ledger and the answer use; these check the numbers a
member would notice: which lots a redemption draws, what a debt takes from new points,
points that arrive already expired, the hold, the balance the register prints."""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import msgspec
import pytest

from conftest import MARKET
from rules import MemberFacts, load_program
from server import answer
from server.plan import MemberState, plan_calculate, plan_confirm
from server.schema import Line, Receipt
from storage.ledger import Hold, InsufficientPoints, Lot, MemberRow, draw

pytestmark = pytest.mark.no_database

NOW = datetime.fromisoformat("2026-11-24T12:00:05+02:00")
KEY = ("S001", "K01", "R-1")


@pytest.fixture(scope="module")
def market():
    program = load_program(MARKET)
    yield program
    program.close()


def confirm_answer(plan, program) -> dict:
    """The answer as the register reads it."""
    return msgspec.to_builtins(answer.confirm_answer(plan, program))


def calculate_answer(plan, program) -> dict:
    return msgspec.to_builtins(answer.calculate_answer(plan, program))


def receipt(amounts=(60000,), redeem=0, ts="2026-11-24T12:00:00+02:00", category="grocery") -> Receipt:
    return Receipt(receipt_id="R-1", store_id="S001", register_id="K01", ts=datetime.fromisoformat(ts),
                   lines=[Line(line_no=n + 1, sku=f"sku-{n}", qty=Decimal(1), price=a, amount=a, category=category)
                          for n, a in enumerate(amounts)],
                   total=sum(amounts), card="hmac", redeem_points=redeem)


def state(lots=(), holds=(), referred_by=None, receipt_number=2, hold_open=False, usage=None) -> MemberState:
    member = MemberRow(7, None, None, "[]", referred_by, "2026-01-01T00:00:00.000000Z", None, None)
    facts = MemberFacts(member_id="m_7", tier="base", enrolled_on=date(2026, 1, 1), receipt_number=receipt_number)
    return MemberState(member, facts, [Lot(*lot) for lot in lots], list(holds), usage or {}, None, hold_open)


def test_a_redemption_draws_the_soonest_expiring_available_lots_and_the_answer_agrees(market):
    lots = [(1, "2026-01-01", "2027-06-01", 300), (2, "2026-01-01", "2027-01-10", 200),
            (3, "2026-12-01", "2026-12-31", 500)]        # lot 3 is still pending
    plan = plan_confirm(receipt((60000, 40000), redeem=250), state(lots), market, NOW)
    drawn = [(p.lot, -p.points) for p in plan.postings if p.kind == "redemption"]
    assert drawn == [(2, 200), (1, 50)]
    assert plan.evaluation.redeemed_points == 250
    answer = confirm_answer(plan, market)
    earned = plan.evaluation.accrued_points
    assert answer["balance"] == {"available": 250, "pending": 500 + earned, "held": 0}
    assert sum(line.redeemed for line in plan.lines.lines) == 250
    assert sum(line.discount for line in plan.lines.lines) == answer["redeemed"]["discount"] == 25000
    assert [lot.id for lot in state(lots).lots] == [1, 2, 3] and state(lots).lots[1].remaining == 200


def test_new_points_go_to_one_lot_per_pair_of_dates_and_the_line_records_name_it(market):
    plan = plan_confirm(receipt((60000, 70000), category="dairy"), state(), market, NOW)
    assert [(str(lot.available_from), str(lot.expires_on), lot.points) for lot in plan.lots] == \
        [("2026-12-08", "2027-11-24", plan.evaluation.accrued_points)]
    # One accrual posting for the lot, however many rules earned; its split names each rule.
    accruals = [p for p in plan.postings if p.kind == "accrual"]
    assert [(p.lot, p.points, p.rule) for p in accruals] == [(0, plan.evaluation.accrued_points, None)]
    assert dict(accruals[0].rules) == {r: p for r, p in plan.evaluation.by_rule if p}
    lines = plan.lines.views().values()
    assert {a.lot for line in lines for a in line.accrued} == {0}
    assert sum(line.points for line in lines) == plan.evaluation.accrued_points


def test_a_debt_is_paid_from_the_new_points_first(market):
    lots = [(4, "2026-01-01", "2027-01-01", -3)]
    plan = plan_confirm(receipt((60000,), ts="2026-11-24T12:00:00+02:00"), state(lots), market, NOW)
    earned = plan.evaluation.accrued_points
    assert earned == 12
    assert [(p.kind, p.points, p.lot, p.new_lot) for p in plan.postings if p.kind == "repayment"] == \
        [("repayment", -3, 0, True), ("repayment", 3, 4, False)]
    assert confirm_answer(plan, market)["balance"] == {"available": 0, "pending": 9, "held": 0}


def test_points_that_expired_before_the_receipt_arrived_are_posted_and_expire_at_once(market):
    late = receipt((60000,), ts="2025-11-10T12:00:00+02:00")     # expiry 2026-11-10, arrives 2026-11-24
    plan = plan_confirm(late, state(), market, NOW)
    expiry = [p for p in plan.postings if p.kind == "expiry"]
    assert [(p.points, p.of_receipt, p.effective_at) for p in expiry] == \
        [(-12, False, "2026-11-09T22:00:00.000000Z")]
    assert plan.expired_lots == [0]
    assert confirm_answer(plan, market)["balance"] == {"available": 0, "pending": 0, "held": 0}


def test_a_calculate_holds_what_it_would_redeem_in_place_of_its_earlier_hold(market):
    lots = [(1, "2026-01-01", "2027-06-01", 1000)]
    earlier = Hold(KEY, 400, "2026-11-24T10:10:00.000000Z")
    other = Hold(("S001", "K02", "R-9"), 100, "2026-11-24T10:10:00.000000Z")
    plan = plan_calculate(receipt((60000,), redeem=300), state(lots, [earlier, other]), market, NOW)
    assert (plan.hold.action, plan.hold.points) == ("put", 300)
    answer = calculate_answer(plan, market)
    assert answer["balance"] == {"available": 600, "pending": 0, "held": 400}
    assert answer["hold"]["points"] == 300
    released = plan_calculate(receipt((60000,)), state(lots, [earlier]), market, NOW)
    assert released.hold.action == "release"
    assert calculate_answer(released, market)["balance"]["held"] == 0


def test_points_held_for_other_receipts_are_not_spent(market):
    lots = [(1, "2026-01-01", "2027-06-01", 300)]
    other = Hold(("S001", "K02", "R-9"), 250, "2026-11-24T10:10:00.000000Z")
    plan = plan_confirm(receipt((60000,), redeem=100), state(lots, [other]), market, NOW)
    assert plan.evaluation.redeemed_points == 50
    assert [(p.lot, p.points) for p in plan.postings if p.kind == "redemption"] == [(1, -50)]
    # 11 points: earned on what is paid in money, 550.00
    assert confirm_answer(plan, market)["balance"] == {"available": 0, "pending": 11, "held": 250}
    with pytest.raises(InsufficientPoints):      # the draw itself refuses, whatever the rules said
        draw(state(lots).lots, 100, "2026-11-24", reserved_by_others=250)


def test_a_first_receipt_fires_the_referrers_event_and_a_confirm_consumes_its_hold(market):
    plan = plan_confirm(receipt(), state(referred_by=3, receipt_number=1, hold_open=True), market, NOW)
    assert [(e.member_id, e.on, e.occasion) for e in plan.events] == [(3, "referred_first_purchase", "referral:7")]
    assert plan.hold.action == "consume"
    assert plan_confirm(receipt(), state(referred_by=3, receipt_number=2), market, NOW).events == []


def test_an_anonymous_receipt_plans_no_ledger_change(market):
    plan = plan_confirm(receipt((60000, 5000)), None, market, NOW)
    assert plan.postings == [] and plan.lots == [] and plan.member is None
    assert [line.line_no for line in plan.lines.lines] == [1, 2]
    assert confirm_answer(plan, market)["balance"] == {}
