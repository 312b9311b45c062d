"""What a return knows about each sold line is no longer stored per receipt: it is derived
from the stored body and answer (plus the rule-by-line pairs when several rules earned).
The derivation must give exactly what was stored before, for any receipt."""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MARKET
from rules import MemberFacts, load_program
from server.returns import pairs_to_store, receipt_lines
from server.schema import Line, Receipt, canonical

CATEGORIES = ["dairy", "grocery", "bakery", "tobacco", "fuel", "alcohol"]


def stored_detail(receipt: Receipt, ev) -> dict:
    """What a confirmed receipt stored as its detail before the compact format (m013)."""
    lines = {str(line.line_no): {"qty": str(line.qty), "amount": line.amount, "points": 0, "pairs": {},
                                 "redeemed": 0, "discount": 0} for line in receipt.lines}
    for rule_id, line_no, points in ev.pairs:
        if points:
            entry = lines[str(line_no)]
            entry["points"] += points
            entry["pairs"][rule_id] = entry["pairs"].get(rule_id, 0) + points
    for line_no, points, discount in ev.redeemed_by_line:
        lines[str(line_no)].update(redeemed=points, discount=discount)
    return {"lines": lines}


def answer(ev) -> bytes:
    # The parts of server/service.py _result that a return reads.
    return msgspec.json.encode({
        "accrued": {"points": ev.accrued_points, "by_rule": [{"rule": r, "points": p} for r, p in ev.by_rule],
                    "by_line": [{"line_no": n, "points": p} for n, p in ev.by_line]},
        "redeemed": {"points": ev.redeemed_points, "discount": ev.discount,
                     "by_line": [{"line_no": n, "points": p, "discount": d} for n, p, d in ev.redeemed_by_line]}})


@pytest.fixture(scope="module")
def market():
    program = load_program(MARKET)
    yield program
    program.close()


lines_st = st.lists(st.tuples(st.sampled_from(CATEGORIES), st.integers(1, 400_000),
                              st.sampled_from(["1", "2", "0.5", "1.250", "3"])), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=lines_st, store=st.sampled_from(["S001", "F001"]), hour=st.sampled_from(["08", "12"]),
       tier=st.sampled_from(["base", "silver", "gold"]), redeem=st.sampled_from([0, 0, 100, 1000]))
def test_derived_lines_equal_the_stored_detail(market, lines, store, hour, tier, redeem):
    receipt = Receipt(receipt_id="R-1", store_id=store, register_id="K01",
                      ts=datetime.fromisoformat(f"2026-11-24T{hour}:00:00+02:00"),
                      lines=[Line(line_no=n + 1, sku=f"sku-{n}", qty=Decimal(q), price=a, amount=a, category=c)
                             for n, (c, a, q) in enumerate(lines)],
                      total=sum(a for _, a, _ in lines), card="hmac-of-the-card", redeem_points=redeem)
    facts = MemberFacts(member_id="m_1", tier=tier, enrolled_on=date(2026, 1, 1), receipt_number=3)
    ev = market.evaluate(receipt, facts, redeem, 5_000, {})
    assert receipt_lines(canonical(receipt), answer(ev), pairs_to_store(ev)) == stored_detail(receipt, ev)
