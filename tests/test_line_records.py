"""Line records: what a confirmed receipt keeps per line for its returns (m023).

Receipts stored before them get theirs from what was stored then (body, answer and the
detail column as the server wrote it between m013 and m023); for any receipt that must be
exactly what the server now writes at the confirm."""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MARKET
from rules import MemberFacts, load_program
from server.schema import Line, Receipt, canonical
from storage import line_records

pytestmark = pytest.mark.no_database

CATEGORIES = ["dairy", "grocery", "bakery", "tobacco", "fuel", "alcohol"]


def detail_as_stored(ev) -> bytes | None:
    """receipts.detail as the server wrote it between m013 and m023: the pairs when the
    answer alone did not give them back."""
    earned = {rule for rule, points in ev.by_rule if points}
    if len(earned) <= 1:
        from_answer = {line_no: points for line_no, points in ev.by_line if points}
        if {line_no: points for _, line_no, points in ev.pairs} == from_answer and len(ev.pairs) == len(from_answer) \
                and all(rule in earned for rule, _, _ in ev.pairs):
            return None
    return msgspec.json.encode(ev.pairs)


def answer_as_stored(ev) -> bytes:
    # The parts of the stored answer the derivation reads.
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
def test_records_derived_from_older_rows_equal_the_ones_written_now(market, lines, store, hour, tier, redeem):
    receipt = Receipt(receipt_id="R-1", store_id=store, register_id="K01",
                      ts=datetime.fromisoformat(f"2026-11-24T{hour}:00:00+02:00"),
                      lines=[Line(line_no=n + 1, sku=f"sku-{n}", qty=Decimal(q), price=a, amount=a, category=c)
                             for n, (c, a, q) in enumerate(lines)],
                      total=sum(a for _, a, _ in lines), card="hmac-of-the-card", redeem_points=redeem)
    facts = MemberFacts(member_id="m_1", tier=tier, enrolled_on=date(2026, 1, 1), receipt_number=3)
    ev = market.evaluate(receipt, facts, redeem, 5_000, {})
    lots = {rule: 10 + i for i, (rule, points) in enumerate(ev.by_rule) if points}
    written = line_records.build([(ln.line_no, ln.qty, ln.amount) for ln in receipt.lines], ev.pairs,
                                 ev.redeemed_by_line, lots)
    derived = line_records.from_stored(canonical(receipt), answer_as_stored(ev), detail_as_stored(ev), lots)
    assert line_records.encode(derived) == line_records.encode(written)
    views = line_records.decode(line_records.encode(written))
    assert views == written.views() and list(views) == [ln.line_no for ln in receipt.lines]
    assert sum(ln.points for ln in views.values()) == ev.accrued_points
    assert sum(ln.discount for ln in views.values()) == ev.discount
    assert {a.lot for ln in views.values() for a in ln.accrued} == set(lots.values())


def test_a_record_of_an_unknown_version_is_refused_not_misread():
    newer = msgspec.msgpack.encode([line_records.VERSION + 1, [[1, "2", 100, 0, 0, "extra"]], [], {}])
    with pytest.raises(line_records.UnknownVersion, match="version 2"):
        line_records.decode(newer)
