"""Returns and cancels planned from a receipt's line records and postings, without SQLite:
shares of a line's points, the lots and counter accounts they are taken from, refunds to
the lots points were spent from, lots that expired in between, and the referral reward
a cancel or a whole return of a first purchase takes back."""
from __future__ import annotations

import dataclasses
from decimal import Decimal

import msgspec
import pytest

from server.errors import ApiError
from server.plan import Posting
from server.returns import LotFacts, plan_cancel, plan_referral_take_back, plan_return, take_back_postings
from storage.referrals import Referral, Reward
from server.schema import ReturnLine
from storage.ledger import ReturnedLine
from storage.line_records import Accrual, LineRecord

pytestmark = pytest.mark.no_database

SOLD = {1: LineRecord(1, Decimal(3), 60000, (Accrual("base", 12, 5), Accrual("dairy-x2", 12, 5)), 30, 3000),
        2: LineRecord(2, Decimal(1), 70000, (Accrual("base", 14, 5), Accrual("promo", 50, 6)), 0, 0)}
POSTINGS = [("redemption", 2, None, "redemption:program", -20), ("redemption", 3, None, "redemption:program", -10),
            ("accrual", 5, "base", "issue:program", 26), ("accrual", 5, "dairy-x2", "issue:program", 12),
            ("accrual", 6, "promo", "funding:partner:fuelco", 50)]


def returning(*lines) -> list[ReturnLine]:
    return [ReturnLine(line_no=n, qty=Decimal(q)) for n, q in lines]


def test_a_partial_return_takes_the_lines_share_from_the_lots_the_rules_earned_on():
    plan = plan_return(SOLD, {}, POSTINGS, returning((1, "1"), (2, "1")))
    assert plan.lines[1].points_reversed == 8 and plan.lines[2].points_reversed == 64
    assert plan.by_rule == {"base": 4 + 14, "dairy-x2": 4, "promo": 50}
    assert plan.reversals == [(5, "base", 18, "issue:program"), (5, "dairy-x2", 4, "issue:program"),
                              (6, "promo", 50, "funding:partner:fuelco")]
    assert (plan.lines[1].points_refunded, plan.lines[1].discount_refunded) == (10, 1000)
    assert plan.refunds == [(3, 10, "redemption:program")]     # the lot drawn last gets its points back first


def test_the_return_that_completes_a_line_takes_exactly_what_is_left():
    before = {1: [ReturnedLine("1", 20000, 8, 10, 1000, msgspec.json.encode({"base": 4, "dairy-x2": 4}))]}
    plan = plan_return(SOLD, before, POSTINGS, returning((1, "2")))
    assert plan.lines[1].points_reversed == 16 and plan.by_rule == {"base": 8, "dairy-x2": 8}
    assert (plan.lines[1].amount, plan.lines[1].points_refunded, plan.lines[1].discount_refunded) == (40000, 20, 2000)


def test_more_than_was_sold_is_refused_and_names_the_line():
    with pytest.raises(ApiError) as refused:
        plan_return(SOLD, {}, POSTINGS, returning((1, "3.5")))
    assert refused.value.code == "return_exceeds_sold"
    assert refused.value.details[0]["path"] == "lines[0].qty"


def test_a_cancel_takes_back_everything_still_held():
    reversals, refunds = plan_cancel(POSTINGS + [("reversal", 5, "base", "issue:program", -6)])
    assert reversals == [(5, "base", 20, "issue:program"), (5, "dairy-x2", 12, "issue:program"),
                         (6, "promo", 50, "funding:partner:fuelco")]
    assert refunds == [(3, 10, "redemption:program"), (2, 20, "redemption:program")]


def test_points_of_a_lot_expired_since_come_back_from_the_expiry_account_once():
    lots = {5: LotFacts("2026-11-01", 30), 3: LotFacts("2026-11-01", 0), 6: LotFacts("2027-11-01", 0)}
    postings = take_back_postings([(5, "base", 20, "issue:program"), (5, "dairy-x2", 12, "issue:program"),
                                   (6, "promo", 50, "funding:partner:fuelco")],
                                  [(3, 10, "redemption:program")], lots, "2026-11-24")
    assert [(p.kind, p.points, p.lot) for p in postings] == [
        ("reversal", -20, 5), ("expiry", 20, 5),            # the member no longer had them
        ("reversal", -12, 5), ("expiry", 10, 5),            # only 30 had expired
        ("reversal", -50, 6),                               # still live: taken from the member
        ("refund", 10, 3), ("expiry", -10, 3)]              # refunded to an expired lot: expired again


REWARD = Reward(member_id=4, event_id="referral", ref="event:referral:referral:9", lot_id=40,
                counter="issue:program", points=500, expires_on="2026-12-01", expired=0)


def test_a_referral_is_taken_back_by_a_cancel_or_a_whole_return_of_the_first_purchase_only():
    first = Referral(fires=[(4, "referral")], rewards=[REWARD], first_purchase=True, others=False)
    cancel = plan_referral_take_back(first, 9, True, "2026-11-24")
    assert cancel.postings == [(4, REWARD.ref, [Posting("reversal", -500, "issue:program", 40)])]
    assert cancel.forget == [(4, "referral")] and cancel.by_member() == {4: 500}
    returned = plan_referral_take_back(first, 9, False, "2026-11-24")
    assert returned.postings == cancel.postings and returned.forget == []      # receipt_number stays
    # A later receipt stands: it is the first purchase now and keeps the reward.
    assert plan_referral_take_back(Referral([(4, "referral")], [REWARD], True, True), 9, True, "2026-11-24") is None
    assert plan_referral_take_back(Referral([(4, "referral")], [REWARD], False, False), 9, True, "2026-11-24") is None
    # Taken back already (nothing outstanding): a cancel still lets the next purchase pay again.
    again = plan_referral_take_back(Referral([(4, "referral")], [], True, False), 9, True, "2026-11-24")
    assert again.postings == [] and again.forget == [(4, "referral")]


def test_a_cancel_of_a_first_purchase_a_return_took_the_referral_from_pays_it_for_the_receipt_after():
    later = ("S001", "K01", "F-2")
    taken = Referral([(4, "referral")], [], True, True, referrer=3, successor=later)
    paid = plan_referral_take_back(taken, 9, True, "2026-11-24")
    assert (paid.postings, paid.forget, paid.pay_to) == ([], [(4, "referral")], 3)
    # Part of the later receipt returned: it still stands as a purchase, and pays.
    half = dataclasses.replace(taken, successor_sold=SOLD, successor_returned={
        1: [ReturnedLine("3", 60000, 24, 30, 3000, b"")]})
    assert plan_referral_take_back(half, 9, True, "2026-11-24").pay_to == 3
    # All of it returned: no reward is due for it.
    whole = dataclasses.replace(half, successor_returned={
        **half.successor_returned, 2: [ReturnedLine("1", 70000, 64, 0, 0, b"")]})
    assert plan_referral_take_back(whole, 9, True, "2026-11-24") is None
    # A return of the first purchase plans no payment: it leaves receipt_number as it was.
    assert plan_referral_take_back(taken, 9, False, "2026-11-24") is None


def test_a_referral_whose_points_expired_is_taken_from_the_expiry_account():
    expired = Referral([(4, "referral")], [dataclasses.replace(REWARD, expired=500)], True, False)
    plan = plan_referral_take_back(expired, 9, False, "2026-12-02")
    assert plan.postings[0][2] == [Posting("reversal", -500, "issue:program", 40),
                                   Posting("expiry", 500, "expiry", 40)]
