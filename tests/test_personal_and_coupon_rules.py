"""Personal offers (`personal: true`) and coupon campaigns (`when: {coupon: id}`) in the
rule language: what a receipt earns with and without them, and how they load."""

from __future__ import annotations

import textwrap
from datetime import date

import pytest
from test_rules_arithmetic import line, receipt
from test_segments_rules import BOUTIQUE

from rules import CouponCampaign, MemberFacts, check_files, load_files

pytestmark = pytest.mark.no_database

TODAY = date(2026, 11, 24)

SETTINGS = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
"""

RULES = """\
coupons:
  - {id: xmas, uses_per_code: 1, valid: {from: "2026-12-20", to: "2026-12-31"}}
  - {id: spring}
  - {id: vip}
rules:
  - id: base
    reward: {percent: 2}
  - id: comeback
    group: welcome
    priority: 10
    personal: true
    reward: {percent: 10}
  - id: hello-again
    group: welcome
    reward: {points: 5}
  - id: capped
    personal: true
    reward: {points: 300}
    budget: {points: 1000}
  - id: xmas-coupon
    when: {coupon: xmas}
    reward: {points: 200}
  - id: either
    when: {any: [{coupon: spring}, {coupon: vip}]}
    reward: {points: 7}
  - id: no-vip
    when: {not: {coupon: vip}}
    reward: {points: 1}
"""


@pytest.fixture
def shop():
    program = load_files({"program.yaml": SETTINGS, "offers.yaml": RULES}, TODAY)
    yield program
    program.close()


def member(offers=None, coupons=None, member_id="m_1") -> MemberFacts:
    return MemberFacts(member_id=member_id, tier="base", offers=offers or {}, coupons=coupons or {})


SALE = receipt("2026-12-22T12:00:00+02:00", line(1, "coats", 30000), line(2, "hats", 10000))


def ledger_sums_hold(ev) -> None:
    """Per-line attribution: pairs, by_rule and by_line all sum to the receipt's points."""
    assert sum(points for _, points in ev.by_rule) == ev.accrued_points
    assert sum(points for _, points in ev.by_line) == ev.accrued_points
    per_rule: dict[str, int] = {}
    for rule_id, _, points in ev.pairs:
        per_rule[rule_id] = per_rule.get(rule_id, 0) + points
    assert per_rule == {rule: points for rule, points in ev.by_rule if points}


def test_a_personal_rule_applies_only_with_an_offer(shop):
    # base 2 % of 400.00 = 8; no-vip 1; without an offer of comeback, hello-again (5) wins its group
    plain = shop.evaluate(SALE, member(), 0, 0, {})
    assert plain.by_rule == [("base", 8), ("hello-again", 5), ("no-vip", 1)]
    offered = shop.evaluate(SALE, member(offers={"comeback": None}), 0, 0, {})
    assert offered.by_rule == [("base", 8), ("comeback", 40), ("no-vip", 1)]
    ledger_sums_hold(offered)


def test_an_offer_budget_gives_the_crossing_receipt_the_remainder(shop):
    # comeback would give 40 (10 % of 400.00): the offer has 25 left, so 25, spread 3:1 over the lines
    crossing = shop.evaluate(SALE, member(offers={"comeback": 25}), 0, 0, {})
    assert crossing.by_rule == [("base", 8), ("comeback", 25), ("no-vip", 1)]
    assert [pair for pair in crossing.pairs if pair[0] == "comeback"] == [("comeback", 1, 19), ("comeback", 2, 6)]
    assert crossing.by_line == [(1, 6 + 19 + 1), (2, 2 + 6)]
    ledger_sums_hold(crossing)
    # Nothing left: as if there were no offer, so the next rule of the group applies.
    spent = shop.evaluate(SALE, member(offers={"comeback": 0}), 0, 0, {})
    assert spent.by_rule == [("base", 8), ("hello-again", 5), ("no-vip", 1)]
    # Enough left: the whole reward.
    assert ("comeback", 40) in shop.evaluate(SALE, member(offers={"comeback": 40}), 0, 0, {}).by_rule


def test_the_rules_own_budget_applies_on_top_of_the_offer(shop):
    offers = {"capped": 250}
    assert ("capped", 250) in shop.evaluate(SALE, member(offers=offers), 0, 0, {}, {"capped": 1000}).by_rule
    assert ("capped", 90) in shop.evaluate(SALE, member(offers=offers), 0, 0, {}, {"capped": 90}).by_rule
    assert "capped" not in shop.evaluate(SALE, member(offers=offers), 0, 0, {}, {"capped": 0}).fired
    assert ("capped", 300) in shop.evaluate(SALE, member(offers={"capped": None}), 0, 0, {}, {"capped": 1000}).by_rule


def test_an_offer_of_a_rule_that_is_not_personal_changes_nothing(shop):
    ev = shop.evaluate(SALE, member(offers={"base": 1}), 0, 0, {})
    assert ev.by_rule == [("base", 8), ("hello-again", 5), ("no-vip", 1)]


def test_a_coupon_rule_needs_a_usable_code_and_reports_it(shop):
    ev = shop.evaluate(SALE, member(coupons={"xmas": "XMAS-7QK2"}), 0, 0, {})
    assert ev.by_rule == [("base", 8), ("hello-again", 5), ("xmas-coupon", 200), ("no-vip", 1)]
    assert ev.coupons_used == {"xmas": "XMAS-7QK2"}
    ledger_sums_hold(ev)
    none = shop.evaluate(SALE, member(), 0, 0, {})
    assert "xmas-coupon" not in none.fired and none.coupons_used == {}


def test_of_alternatives_the_campaign_written_first_is_used(shop):
    both = shop.evaluate(SALE, member(coupons={"vip": "V-1", "spring": "S-1"}), 0, 0, {})
    assert ("either", 7) in both.by_rule
    assert both.coupons_used == {"spring": "S-1"}, "vip was not needed: its code keeps its use"
    assert "no-vip" not in both.fired
    only_vip = shop.evaluate(SALE, member(coupons={"vip": "V-1"}), 0, 0, {})
    assert only_vip.coupons_used == {"vip": "V-1"}


def test_a_code_no_fired_rule_needed_is_not_used(shop):
    # Only `not: {coupon: vip}` names vip besides `either`: a negated coupon never needs a code.
    program = load_files({"program.yaml": SETTINGS, "r.yaml": textwrap.dedent("""\
        coupons: [{id: vip}, {id: xmas}]
        rules:
          - {id: base, reward: {percent: 2}}
          - {id: no-vip, when: {not: {coupon: vip}}, reward: {points: 1}}
          - {id: xmas-gold, when: {coupon: xmas, tier: gold}, reward: {points: 50}}
        """)}, TODAY)  # fmt: skip
    try:
        ev = program.evaluate(SALE, member(coupons={"vip": "V-1", "xmas": "X-1"}), 0, 0, {})
        assert ev.by_rule == [("base", 8)]
        assert ev.coupons_used == {}, "xmas-gold did not apply (not gold): its code is not needed"
    finally:
        program.close()


def test_a_held_out_member_does_not_use_the_coupon():
    text = RULES.replace("    when: {coupon: xmas}\n", "    when: {coupon: xmas}\n    holdout: 0.5\n")
    program = load_files({"program.yaml": SETTINGS, "offers.yaml": text}, TODAY)
    try:
        ids = [f"m_{n}" for n in range(40)]
        held = next(m for m in ids if program.held_out_of(m) == ["xmas-coupon"])
        treated = next(m for m in ids if program.held_out_of(m) == [])
        codes = {"xmas": "X-1"}
        ev = program.evaluate(SALE, member(coupons=codes, member_id=held), 0, 0, {})
        assert "xmas-coupon" not in ev.fired and ev.held_out == [("xmas-coupon", 200)] and ev.coupons_used == {}
        ev = program.evaluate(SALE, member(coupons=codes, member_id=treated), 0, 0, {})
        assert ("xmas-coupon", 200) in ev.by_rule and ev.coupons_used == codes
    finally:
        program.close()


def test_the_contract_case_on_the_boutique_program():
    program = load_files({"program.yaml": BOUTIQUE}, TODAY)
    try:
        staff = MemberFacts(member_id="m_1", tier="base", segments=frozenset({"staff"}), coupons={"winter": "W-1"})
        coat = receipt("2026-12-10T12:01:00+02:00", line(1, "coats", 50000), store="B01")
        first = program.evaluate(coat, staff, 0, 0, {})
        assert first.by_rule == [("base", 10), ("staff-bonus", 50), ("winter-coupon", 100)]
        assert first.accrued_points == 160 and first.coupons_used == {"winter": "W-1"}
        gloves = receipt("2026-12-10T12:02:00+02:00", line(1, "accessories", 10000), store="B01")
        used_up = MemberFacts(member_id="m_1", tier="base", segments=frozenset({"staff"}))  # the code's use is gone
        assert program.evaluate(gloves, used_up, 0, 0, {}).by_rule == [("base", 2), ("staff-bonus", 10)]
        gone = MemberFacts(member_id="m_1", tier="base")
        assert program.evaluate(gloves, gone, 0, 0, {}).by_rule == [("base", 2)]
    finally:
        program.close()


def test_coupon_campaigns_are_typed_with_their_dates(shop):
    xmas = shop.coupons["xmas"]
    assert xmas == CouponCampaign("xmas", 1, date(2026, 12, 20), date(2026, 12, 31))
    assert [xmas.valid_on(day) for day in (date(2026, 12, 19), date(2026, 12, 20), date(2026, 12, 31),
                                           date(2027, 1, 1))] == ["not_yet_valid", None, None, "expired"]
    assert shop.coupons["spring"].valid_on(date(2030, 1, 1)) is None
    assert shop.coupons["spring"].uses_per_code == 1
    assert [rule.id for rule in shop.rules if rule.personal] == ["comeback", "capped"]


def test_explain_says_why_a_personal_rule_did_not_apply(shop):
    rules = {item.id: item for item in shop.explain(SALE, member()).rules}
    assert rules["comeback"].reasons == ["personal: the member holds no offer of this rule"]
    rules = {item.id: item for item in shop.explain(SALE, member(offers={"comeback": 0})).rules}
    assert rules["comeback"].reasons == ["personal: the member's offer has no points left"]
    rules = {item.id: item for item in shop.explain(SALE, member(offers={"comeback": 25})).rules}
    assert rules["comeback"].status == "applied" and rules["comeback"].notes == ["offer: cut to the 25 points left"]
    rules = {item.id: item for item in shop.explain(SALE, member(coupons={"xmas": "X-1"})).rules}
    assert rules["xmas-coupon"].notes == ["coupon xmas: code X-1 used"]


def test_coupon_and_personal_problems_at_their_place():
    text = """\
    coupons:
      - {id: xmas, uses_per_code: 0, valid: {from: "2026-12-20", to: "2026-12-01"}}
      - {id: summer, valid: {from: "2026-06-01", to: "2026-08-31"}}
      - {id: xmas, valid: {form: "2026-12-01", to: "2026-12-31"}}
    rules:
      - id: a
        when: {coupon: xms}
        reward: {points: 5}
        personal: yes
      - id: b
        reward: {points: 5}
        holdout: 0.6
      - id: c
        reward: {points: 5}
        holdout: 0
      - id: d
        reward: {points: 5}
        holdout: 0.1234567
      - id: e
        when: {cupon: xmas}
        reward: {points: 5}
    """
    found = [str(p) for p in check_files({"program.yaml": SETTINGS, "c.yaml": textwrap.dedent(text)}, TODAY)]
    assert found == [
        "c.yaml:2:31: 'uses_per_code' must be >= 1",
        "c.yaml:2:66: 'valid' ends (2026-12-01) before it starts (2026-12-20)",
        "c.yaml:3:50: warning: coupon campaign ended on 2026-08-31, before today (2026-11-24): its codes no longer apply",
        "c.yaml:4:10: duplicate coupon campaign 'xmas' (first defined at c.yaml:2:10)",
        "c.yaml:4:23: missing required key 'from'",
        "c.yaml:4:24: unknown key 'form', did you mean 'from'?",
        "c.yaml:7:20: warning: unknown coupon campaign 'xms', did you mean 'xmas'?",
        "c.yaml:9:15: 'personal' should be true or false, not text",
        "c.yaml:12:14: 'holdout' must be > 0 and <= 0.5, got 0.6",
        "c.yaml:15:14: 'holdout' must be > 0 and <= 0.5, got 0",
        "c.yaml:18:14: 'holdout' has more than 6 decimal places",
        "c.yaml:20:12: unknown condition 'cupon', did you mean 'coupon'?",
    ]


def test_coupon_campaigns_may_be_written_beside_their_rules_in_several_files():
    xmas = "coupons: [{id: xmas}]\nrules:\n  - {id: xmas-coupon, when: {coupon: xmas}, reward: {points: 200}}\n"
    spring = "coupons:\n  - {id: spring}\n  - {id: xmas}\nrules:\n  - {id: spring-coupon, when: {coupon: sprng}, reward: {points: 5}}\n"
    found = [str(p) for p in check_files({"program.yaml": SETTINGS, "campaigns/xmas.yaml": xmas,
                                          "campaigns/spring.yaml": spring}, TODAY)]  # fmt: skip
    assert found == [  # files are read in path order: campaigns/spring.yaml first
        "campaigns/spring.yaml:5:40: warning: unknown coupon campaign 'sprng', did you mean 'spring'?",
        "campaigns/xmas.yaml:1:16: duplicate coupon campaign 'xmas' (first defined at campaigns/spring.yaml:3:10)",
    ]
    program = load_files({"program.yaml": SETTINGS, "campaigns/xmas.yaml": xmas,
                          "campaigns/spring.yaml": spring.replace("  - {id: xmas}\n", "")}, TODAY)  # fmt: skip
    try:
        assert list(program.coupons) == ["spring", "xmas"]
    finally:
        program.close()


def test_a_rule_needing_each_campaign_it_names_uses_every_code_and_alternatives_still_the_first():
    program = load_files({"program.yaml": SETTINGS, "r.yaml": textwrap.dedent("""\
        coupons: [{id: xmas}, {id: spring}, {id: vip}]
        rules:
          - id: pair
            when: {coupon: xmas, any: [{coupon: spring}], total: {gte: 100}}
            reward: {points: 20}
          - id: xmas-and-one
            when: {coupon: xmas, any: [{coupon: spring}, {coupon: vip}]}
            reward: {points: 3}
        """)}, TODAY)
    try:
        assert program.coupon_rules_needing_all == {program.rules[0].index}
        both = program.evaluate(SALE, member(coupons={"xmas": "X-1", "spring": "S-1", "vip": "V-1"}), 0, 0, {})
        assert both.by_rule == [("pair", 20), ("xmas-and-one", 3)]
        assert both.coupons_used == {"xmas": "X-1", "spring": "S-1"}, "vip was not needed"
        alone = program.evaluate(SALE, member(coupons={"xmas": "X-1", "vip": "V-1"}), 0, 0, {})
        assert alone.by_rule == [("xmas-and-one", 3)] and alone.coupons_used == {"xmas": "X-1", "vip": "V-1"}
        ledger_sums_hold(both)
    finally:
        program.close()
