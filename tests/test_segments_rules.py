"""Segments in the rule language: how they load, who is in a computed one, and
`when: {segment: id}` on a receipt."""

from __future__ import annotations

import textwrap
from datetime import date
from decimal import Decimal

import pytest
from test_rules_arithmetic import line, receipt

from rules import MemberFacts, SegmentFacts, check_dir, check_files, load_files, load_program
from server.cli import main

# The boutique example of the contract, as written there.
BOUTIQUE = """\
# A small shop that shows the customer-value sections of the language: a list segment, a
# coupon campaign, a personal offer and a rule with a control group.
program: {id: boutique, name: Demo Boutique, currency: UAH, timezone: Europe/Kyiv}
points:
  value: 100
  rounding: floor
  activation_delay_days: 0
  expiry_days: 365
redemption:
  max_share: 0.5
  min_points: 10
holds: {ttl_minutes: 15}
tiers:
  metric: spend
  window_days: 365
  levels:
    - {id: base, from: 0}
stores:
  - {id: B01, tags: [kyiv]}
events:
  - {id: welcome, on: enrolled, reward: {points: 50}}
segments:
  rfm: {window_days: 365}
  define:
    - {id: champions, rfm: {r: [4, 5], f: [4, 5], m: [4, 5]}}
    - {id: staff, list: true}
coupons:
  - {id: winter, uses_per_code: 1, valid: {from: "2026-12-01", to: "2026-12-31"}}
rules:
  - id: base
    reward: {percent: 2}
  - id: staff-bonus
    when: {segment: staff}
    reward: {percent: 10}
  - id: winter-coupon
    when: {coupon: winter}
    reward: {points: 100}
  - id: comeback
    personal: true
    reward: {points: 30}
  - id: scarf-week
    scope: {categories: [scarves]}
    reward: {percent: 5}
    holdout: 0.2
"""
TODAY = date(2026, 11, 24)

SETTINGS = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}, {id: gold, from: 100000}]}
stores: [{id: S001}]
"""

SEGMENTS = """\
segments:
  rfm: {window_days: 180}
  define:
    - {id: champions, rfm: {r: [4, 5], f: [4, 5], m: [4, 5]}}
    - {id: big-spenders, rfm: {m: [5, 5]}}
    - {id: lapsing, when: {days_since_last_purchase: {between: [60, 180]}}}
    - id: loyal-gold
      when:
        tier: gold
        receipts_in_window: {gte: 10}
        any: [{spend_in_window: {gt: 500000}}, {tags: [vip]}]
    - {id: newcomers, when: {enrolled_days: {lt: 30}, not: {tags: [staff]}}}
    - {id: staff, list: true}
rules:
  - id: base
    reward: {percent: 2}
  - id: champions-coffee
    when: {segment: champions}
    scope: {categories: [coffee]}
    reward: {percent: 10}
  - id: welcome-back
    when: {segment: [lapsing, newcomers], not: {segment: staff}}
    reward: {points: 30}
"""


def files(text: str = SEGMENTS) -> dict[str, str]:
    return {"program.yaml": SETTINGS, "customers.yaml": textwrap.dedent(text)}


@pytest.fixture
def shop():
    program = load_files(files(), TODAY)
    yield program
    program.close()


def problems_of(text: str) -> list[str]:
    return [str(problem) for problem in check_files(files(text), TODAY)]


def facts(**values) -> SegmentFacts:
    values.setdefault("tier", "base")
    return SegmentFacts(**values)


def test_the_boutique_example_loads_without_a_word(tmp_path, capsys):
    (tmp_path / "program.yaml").write_text(BOUTIQUE)
    assert check_dir(tmp_path, TODAY) == []
    assert main(["rules", "check", str(tmp_path), "--today", "2026-11-24"]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    program = load_program(tmp_path)
    try:
        assert {seg.id: seg.kind for seg in program.segments.values()} == {"champions": "rfm", "staff": "list"}
        assert program.segment_window_days == 365
        assert list(program.coupons) == ["winter"]
        assert [(rule.id, rule.personal, rule.holdout) for rule in program.rules if rule.personal or rule.holdout] == [
            ("comeback", True, None), ("scarf-week", False, Decimal("0.2"))]
    finally:
        program.close()


def test_segments_are_typed_definitions(shop):
    assert list(shop.segments) == ["champions", "big-spenders", "lapsing", "loyal-gold", "newcomers", "staff"]
    assert shop.segment_window_days == 180
    champions = shop.segments["champions"]
    assert (champions.kind, champions.rfm) == ("rfm", {"r": (4, 5), "f": (4, 5), "m": (4, 5)})
    assert shop.segments["staff"].kind == "list"
    assert shop.segments["lapsing"].file == "customers.yaml" and shop.segments["lapsing"].line == 6


def test_rfm_segments_hold_within_every_range_given(shop):
    assert shop.computed_segments(facts(rfm=(5, 4, 4))) == {"champions"}
    assert shop.computed_segments(facts(rfm=(4, 4, 5))) == {"champions", "big-spenders"}
    assert shop.computed_segments(facts(rfm=(1, 1, 5))) == {"big-spenders"}
    assert shop.computed_segments(facts(rfm=(3, 5, 5))) == {"big-spenders"}
    assert shop.computed_segments(facts(rfm=None)) == frozenset(), "a member not scored is in no rfm segment"


def test_when_segments_read_the_members_facts(shop):
    lapsing = shop.segments["lapsing"]
    assert [lapsing.holds(facts(days_since_last_purchase=d)) for d in (59, 60, 180, 181)] == [False, True, True, False]
    assert not lapsing.holds(facts(days_since_last_purchase=None)), "never bought is not 'between 60 and 180'"
    gold = shop.segments["loyal-gold"]
    assert gold.holds(facts(tier="gold", receipts_in_window=10, spend_in_window=500001))
    assert gold.holds(facts(tier="gold", receipts_in_window=12, tags=frozenset({"vip"})))
    assert not gold.holds(facts(tier="gold", receipts_in_window=12, spend_in_window=500000))
    assert not gold.holds(facts(tier="base", receipts_in_window=12, spend_in_window=900000))
    assert not gold.holds(facts(tier="gold", receipts_in_window=9, spend_in_window=900000))
    newcomers = shop.segments["newcomers"]
    assert newcomers.holds(facts(enrolled_days=0)) and newcomers.holds(facts(enrolled_days=29))
    assert not newcomers.holds(facts(enrolled_days=30))
    assert not newcomers.holds(facts(enrolled_days=3, tags=frozenset({"staff"})))
    assert not newcomers.holds(facts(enrolled_days=None))
    assert not shop.segments["staff"].holds(facts(tags=frozenset({"staff"}))), "a list segment is never computed"
    assert shop.computed_segments(facts(days_since_last_purchase=90, enrolled_days=10)) == {"lapsing", "newcomers"}


def test_a_rule_on_a_segment_applies_only_to_its_members(shop):
    sale = receipt("2026-12-10T12:00:00+02:00", line(1, "coffee", 20000), line(2, "milk", 5000))

    def points(*segments: str):
        member = MemberFacts(member_id="m_1", tier="base", segments=frozenset(segments))
        return shop.evaluate(sale, member, 0, 0, {}).by_rule

    # base 2 % of 250.00 = 5; champions-coffee 10 % of 200.00 = 20; welcome-back 30
    assert points() == [("base", 5)]
    assert points("champions") == [("base", 5), ("champions-coffee", 20)]
    assert points("lapsing") == [("base", 5), ("welcome-back", 30)]
    assert points("newcomers", "champions") == [("base", 5), ("champions-coffee", 20), ("welcome-back", 30)]
    assert points("lapsing", "staff") == [("base", 5)], "not: {segment: staff}"
    member = MemberFacts(member_id="m_1", tier="base", segments=frozenset({"champions"}))
    ev = shop.evaluate(sale, member, 0, 0, {})
    assert ev.by_line == [(1, 24), (2, 1)] and ev.accrued_points == 25
    assert sorted(ev.pairs) == [("base", 1, 4), ("base", 2, 1), ("champions-coffee", 1, 20)]


def test_explain_names_the_segments_it_looked_for(shop):
    sale = receipt("2026-12-10T12:00:00+02:00", line(1, "coffee", 20000))
    member = MemberFacts(member_id="m_1", tier="base", segments=frozenset({"staff"}))
    rules = {item.id: item for item in shop.explain(sale, member).rules}
    assert rules["champions-coffee"].reasons == ["when.segment: member segments [staff] include none of champions"]
    assert rules["champions-coffee"].notes == []  # the engine agrees with the reading


def test_segment_problems_at_their_place():
    text = """\
    segments:
      rfm: {window_day: 365}
      define:
        - {id: champions, rfm: {r: [5, 4]}}
        - {id: lapsing, when: {days_since_last_purchase: {between: [60, 180]}, store: S001}}
        - {id: staff, list: true, when: {tier: gold}}
        - {id: staff, list: true}
        - {id: golden, when: {tier: golde, enrolled_days: {gte: 40000}}}
        - {id: nothing, list: false}
        - {id: empty, when: {}}
    rules:
      - id: lapsed
        when: {days_since_last_purchase: {gt: 90}}
        reward: {points: 5}
    """
    assert problems_of(text) == [
        "customers.yaml:2:9: unknown key 'window_day', did you mean 'window_days'?",
        "customers.yaml:4:32: 'r' ends (4) before it starts (5)",
        "customers.yaml:5:76: unknown condition 'store' (a segment's when may use: tier, tags, "
        "days_since_last_purchase, receipts_in_window, spend_in_window, enrolled_days, not, any)",
        "customers.yaml:6:7: a segment needs exactly one of: rfm, when, list: true (when, list given)",
        "customers.yaml:7:12: duplicate segment 'staff' (first defined at customers.yaml:6:12)",
        "customers.yaml:8:33: warning: unknown tier 'golde', did you mean 'gold'?",
        "customers.yaml:8:61: 40000 is out of range 0..36500",
        "customers.yaml:9:7: a segment needs exactly one of: rfm, when, list: true",
        "customers.yaml:10:25: 'when' is empty: a segment needs at least one condition",
        "customers.yaml:13:12: unknown condition 'days_since_last_purchase' ('days_since_last_purchase' is for a "
        "segment's when: define a segment with it, then use 'segment: <id>')",
    ]


def test_a_segment_the_program_does_not_define_is_a_warning_with_the_nearest():
    text = SEGMENTS + """\
  - id: champs-tea
    when: {segment: champion}
    reward: {points: 1}
  - id: nobody
    when: {not: {segment: [stuff]}}
    reward: {points: 1}
"""
    assert problems_of(text) == [
        "customers.yaml:25:21: warning: unknown segment 'champion', did you mean 'champions'?",
        "customers.yaml:28:28: warning: unknown segment 'stuff', did you mean 'staff'?",
    ]
    program = load_files({"program.yaml": SETTINGS, "rules.yaml": "rules:\n  - {id: a, when: {segment: x}, reward: {points: 1}}\n"}, TODAY)
    try:
        assert [str(w) for w in program.warnings] == ["rules.yaml:2:29: warning: unknown segment 'x'"]
    finally:
        program.close()


def test_the_engine_and_the_plain_reading_agree_on_every_membership():
    text = """\
    segments:
      define:
        - {id: a, list: true}
        - {id: b, list: true}
        - {id: c, list: true}
    coupons: [{id: x}, {id: y}]
    rules:
      - {id: one, when: {segment: a, coupon: x}, reward: {points: 1}}
      - {id: two, when: {any: [{segment: [b, c]}, {coupon: y}], not: {segment: a}}, reward: {points: 1}}
      - {id: three, when: {not: {any: [{segment: c}, {coupon: [x, y]}]}}, reward: {points: 1}}
      - {id: four, when: {segment: b, tags: [vip], not: {coupon: x}}, reward: {points: 1}}
    """
    program = load_files(files(text), TODAY)
    sale = receipt("2026-12-10T12:00:00+02:00", line(1, "coats", 10000))
    try:
        seen = set()
        for mask in range(2**6):
            segments = frozenset(name for bit, name in enumerate("abc") if mask >> bit & 1)
            coupons = {name: f"{name}-1" for bit, name in enumerate("xy") if mask >> (bit + 3) & 1}
            tags = frozenset({"vip"}) if mask % 3 == 0 else frozenset()
            who = MemberFacts(member_id="m_1", tier="base", tags=tags, segments=segments, coupons=coupons)
            explanation = program.explain(sale, who)
            assert all("rule engine" not in note for item in explanation.rules for note in item.notes), mask
            fired = tuple(explanation.evaluation.fired)
            assert fired == tuple(item.id for item in explanation.rules if item.status == "applied")
            seen.add(fired)
        assert len(seen) >= 6, "the memberships gave too few different outcomes to mean anything"
    finally:
        program.close()
