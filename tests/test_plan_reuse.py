"""What evaluation and planning remember or share between receipts does not leak into an answer.

A plan shares the member state's lots instead of copying them, a program remembers the rules
to look at per set of held conditions, and a moment's local date is remembered per timezone:
each must give what computing afresh gives."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest

from conftest import MARKET
from rules import MemberFacts, load_program
from rules import program as program_module
from rules.loader import load_files, read_directory
from server.plan import MemberState, plan_calculate, plan_confirm
from server.schema import Line, Receipt
from storage import ledger
from storage.ledger import Hold, Lot, MemberRow

pytestmark = pytest.mark.no_database

NOW = datetime.fromisoformat("2026-11-24T12:00:05+02:00")


@pytest.fixture(scope="module")
def market():
    program = load_program(MARKET)
    yield program
    program.close()


def receipt(amounts=(60000,), redeem=0, ts="2026-11-24T12:00:00+02:00", category="dairy") -> Receipt:
    return Receipt(receipt_id="R-1", store_id="S001", register_id="K01", ts=datetime.fromisoformat(ts),
                   lines=[Line(line_no=n + 1, sku=f"sku-{n}", qty=Decimal(1), price=a, amount=a, category=category)
                          for n, a in enumerate(amounts)],
                   total=sum(amounts), card="hmac", redeem_points=redeem)


def state(lots, tier="base") -> MemberState:
    member = MemberRow(7, None, None, "[]", None, "2026-01-01T00:00:00.000000Z", None, None)
    facts = MemberFacts(member_id="m_7", tier=tier, enrolled_on=date(2026, 1, 1), receipt_number=2)
    holds = [Hold(("S001", "K09", "other"), 30, "2026-11-24T10:30:00.000000Z")]
    return MemberState(member, facts, [Lot(*lot) for lot in lots], holds, {}, None, False)


def test_planning_from_a_state_leaves_its_lots_as_read_so_a_second_plan_is_the_same(market):
    lots = [(1, "2026-01-01", "2027-06-01", 300), (2, "2026-01-01", "2027-01-10", 200),
            (3, "2026-01-01", None, -120), (4, "2026-12-01", "2027-12-01", 50)]
    member = state(lots)
    first = plan_confirm(receipt((60000, 40000), redeem=250), member, market, NOW)
    # Lot 2 (soonest expiry) and lot 1 pay the 250 points; the debt takes the new points first.
    repaid = min(120, first.evaluation.accrued_points)
    assert [(p.kind, p.lot, p.points) for p in first.postings if p.kind != "accrual"] == \
        [("redemption", 2, -200), ("redemption", 1, -50), ("repayment", 0, -repaid), ("repayment", 3, repaid)]
    assert [(lot.id, lot.remaining) for lot in member.lots] == [(1, 300), (2, 200), (3, -120), (4, 50)]
    second = plan_confirm(receipt((60000, 40000), redeem=250), member, market, NOW)
    assert second.postings == first.postings and second.balance == first.balance
    earned = first.evaluation.accrued_points
    # 300 + 200 - 250 paid, -120 owed and repaid from the new points, 30 held for another receipt.
    assert (first.balance.available, first.balance.pending, first.balance.held, first.balance.owed) == \
        (250 - 120 + repaid - 30, 50 + earned - repaid, 30, 120 - repaid)


def test_a_moment_has_each_programs_own_local_date(market):
    files, _, problems = read_directory(MARKET)
    assert not problems
    text = files["program.yaml"].decode().replace("Europe/Kyiv", "America/New_York")
    new_york = load_files({**files, "program.yaml": text}, NOW)
    try:
        # 01:00 in Kyiv on 25 November is still 24 November in New York: the lot that becomes
        # available on the 25th is spendable in one program and pending in the other.
        now = datetime.fromisoformat("2026-11-25T01:00:00+02:00")
        member = state([(1, "2026-11-25", "2027-11-25", 400)])
        for _ in range(2):      # asked again, in either order, each answers for its own timezone
            kyiv = plan_calculate(receipt(ts="2026-11-25T00:30:00+02:00"), member, market, now)
            there = plan_calculate(receipt(ts="2026-11-25T00:30:00+02:00"), member, new_york, now)
            assert (kyiv.today, kyiv.balance.available, kyiv.balance.pending) == ("2026-11-25", 400 - 30, 0)
            # The other receipt's hold finds nothing spendable to reserve there (a hold is no debt).
            assert (there.today, there.balance.available, there.balance.pending, there.balance.held) == \
                ("2026-11-24", 0, 400, 0)
            assert kyiv.evaluation.local_date == date(2026, 11, 25)
            assert there.evaluation.local_date == date(2026, 11, 24)
    finally:
        new_york.close()


def test_receipts_evaluate_alike_when_the_rules_remembered_per_held_set_are_dropped(market, monkeypatch):
    # Each tier holds another condition (base-silver, base-gold), and 07:00-10:00 on a weekday
    # the morning rule's: six sets of held conditions, against a memory of one.
    cases = [(tier, ts) for tier in ("base", "silver", "gold")
             for ts in ("2026-11-24T08:00:00+02:00", "2026-11-24T12:00:00+02:00")]
    fresh = {case: msgspec.to_builtins(market.evaluate(receipt(ts=case[1]), state([], case[0]).facts, 0, 0, {}))
             for case in cases}
    monkeypatch.setattr(program_module, "MAX_CANDIDATE_SETS", 1)
    program = load_program(MARKET)
    try:
        for _ in range(3):
            for case in cases:
                ev = program.evaluate(receipt(ts=case[1]), state([], case[0]).facts, 0, 0, {})
                assert msgspec.to_builtins(ev) == fresh[case]
        assert len(program._candidates) == 1
        assert {tuple(fresh[case]["fired"]) for case in cases} == {
            ("base", "dairy-x2"), ("base", "dairy-x2", "morning"), ("base-silver", "dairy-x2"),
            ("base-silver", "dairy-x2", "morning"), ("base-gold", "dairy-x2"), ("base-gold", "dairy-x2", "morning")}
    finally:
        program.close()


def test_dates_and_moments_are_written_as_before_when_their_texts_are_kept(monkeypatch):
    # Texts kept by date (and stored text passed through) are the dates' own; the set kept
    # is emptied when full, so a long-running server holds a bounded number.
    monkeypatch.setattr(ledger, "_day_texts", {})
    monkeypatch.setattr(ledger, "DAY_TEXTS_MAX", 3)
    days = [date(2026, 11, 24), date(1, 1, 1), date(9999, 12, 31), "2027-11-24", date(2026, 11, 25)]
    for day in days * 2:
        assert ledger.day_text(day) == str(day)
        assert len(ledger._day_texts) <= 3
    # Timestamps in the stored form, every field padded, whatever the offset they came with.
    assert ledger.iso(datetime(5, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "0005-01-02T03:04:05.000000Z"
    assert ledger.iso(datetime(2026, 11, 24, 0, 30, 0, 7, tzinfo=timezone(timedelta(hours=2)))) == \
        "2026-11-23T22:30:00.000007Z"
