"""The rule language items of rules.md not pinned down elsewhere, and the problem report.

tests/test_rules_arithmetic.py covers most conditions and rewards on small programs;
this file adds register, partner and channel, operators on member numbers, `not`
inside `any`, limits and expiry on per_amount rules, budgets next to limits, names
that appear nowhere else, and the wording of the problems a manager sees.
"""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest

from rules import MemberFacts, check_files, load_files

pytestmark = pytest.mark.no_database

SETTINGS = """\
program: {id: t, name: Test, currency: EUR, timezone: Europe/Berlin}
points: {value: 100, rounding: floor, activation_delay_days: 7, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}, {id: gold, from: 100}]}
stores: [{id: S1, tags: [city]}, {id: P1, partner: gasco}]
partners: [{id: gasco, name: Gas Co}]
"""
TUESDAY = "2026-11-24T12:00:00+01:00"


def line(no, category, amount, qty="1", sku=None, brand=None, flags=()):
    return SimpleNamespace(line_no=no, sku=sku or f"sku-{no}", category=category, brand=brand, qty=Decimal(qty),
                           price=amount, amount=amount, flags=list(flags))


def receipt(*lines, ts=TUESDAY, store="S1", register="R1", channel="pos"):
    return SimpleNamespace(store_id=store, register_id=register, channel=channel, ts=datetime.fromisoformat(ts),
                           total=sum(item.amount for item in lines), lines=list(lines))


def member(tier="base", receipt_number=2, **facts):
    facts.setdefault("enrolled_on", date(2026, 1, 1))
    return MemberFacts(member_id="m", tier=tier, receipt_number=receipt_number, **facts)


@pytest.fixture
def make():
    made = []

    def build(rules_yaml: str):
        program = load_files({"program.yaml": SETTINGS, "rules.yaml": rules_yaml})
        made.append(program)
        return program

    yield build
    for program in made:
        program.close()


def fired(program, sale, who=None, usage=None, budget_left=None):
    return program.evaluate(sale, who or member(), 0, 0, usage or {}, budget_left).fired


def test_register_partner_and_channel(make):
    program = make("""\
rules:
  - {id: till-1, when: {register: R1}, reward: {points: 1}}
  - {id: self-checkout, when: {register: [SC1, SC2]}, reward: {points: 1}}
  - {id: at-gasco, when: {partner: gasco}, reward: {points: 1}}
  - {id: not-gasco, when: {partner: {ne: gasco}}, reward: {points: 1}}
  - {id: web, when: {channel: web}, reward: {points: 1}}
""")
    sale = line(1, "x", 1000)
    assert fired(program, receipt(sale)) == ["till-1", "not-gasco"]
    assert fired(program, receipt(sale, register="SC2", channel="web")) == ["self-checkout", "not-gasco", "web"]
    assert fired(program, receipt(sale, store="P1", register="R9")) == ["at-gasco"]


def test_operators_on_member_numbers_and_item_counts(make):
    program = make("""\
rules:
  - {id: early, when: {receipt_number: {lte: 3}}, reward: {points: 1}}
  - {id: loyal, when: {receipt_number: {gt: 10}}, reward: {points: 1}}
  - {id: not-first, when: {receipt_number: {ne: 1}}, reward: {points: 1}}
  - {id: few, when: {items: {lt: 3}}, reward: {points: 1}}
  - {id: fifth-to-ninth, when: {receipt_number: {between: [5, 9]}}, reward: {points: 1}}
""")
    sale = receipt(line(1, "x", 1000), line(2, "x", 1000))
    assert fired(program, sale, member(receipt_number=1)) == ["early", "few"]
    assert fired(program, sale, member(receipt_number=3)) == ["early", "not-first", "few"]
    assert fired(program, sale, member(receipt_number=5)) == ["not-first", "few", "fifth-to-ninth"]
    assert fired(program, sale, member(receipt_number=9)) == ["not-first", "few", "fifth-to-ninth"]
    assert fired(program, sale, member(receipt_number=11)) == ["loyal", "not-first", "few"]
    three = receipt(line(1, "x", 1000), line(2, "x", 1000), line(3, "x", 1000))
    assert fired(program, three, member(receipt_number=10)) == ["not-first"]


def test_not_inside_any_and_any_inside_not(make):
    program = make("""\
rules:
  - id: gold-or-not-city
    when: {any: [{tier: gold}, {not: {store_tags: city}}]}
    reward: {points: 1}
  - id: neither-vip-nor-weekend
    when: {not: {any: [{tags: vip}, {weekdays: [sat, sun]}]}}
    reward: {points: 1}
""")
    sale = line(1, "x", 1000)
    assert fired(program, receipt(sale)) == ["neither-vip-nor-weekend"]
    assert fired(program, receipt(sale, store="P1")) == ["gold-or-not-city", "neither-vip-nor-weekend"]
    assert fired(program, receipt(sale), member("gold", tags=frozenset({"vip"}))) == ["gold-or-not-city"]
    saturday = receipt(sale, ts="2026-11-28T12:00:00+01:00")
    assert fired(program, saturday) == []


def test_per_amount_with_a_weekly_limit_and_its_own_expiry(make):
    program = make("""\
rules:
  - id: steps
    reward: {per_amount: {every: 2500, points: 3}}
    limit: {per_member: {count: 2, per: week}}
    expires_in_days: 30
""")
    sale = receipt(line(1, "x", 6000), line(2, "x", 3000))
    # 9000 // 2500 = 3 steps of 3 points = 9, spread 6000:3000 -> 6, 3
    result = program.evaluate(sale, member(), 0, 0, {"steps": 1})
    assert (result.by_rule, result.by_line) == ([("steps", 9)], [(1, 6), (2, 3)])
    assert result.lots == [(date(2026, 12, 1), date(2026, 12, 24), 9)]  # 7 days pending, 30 days to expiry
    assert program.evaluate(sale, member(), 0, 0, {"steps": 2}).fired == []
    assert program.limit_windows(date(2026, 11, 24)) == {"steps": (date(2026, 11, 23), date(2026, 11, 29))}


def test_a_budgeted_rule_with_a_monthly_limit(make):
    program = make("""\
rules:
  - {id: base, group: base, reward: {percent: 1}}
  - id: november
    group: base
    priority: 5
    reward: {percent: 5}
    limit: {per_member: {count: 3, per: month}}
    budget: {points: 100}
""")
    sale = receipt(line(1, "x", 10000))
    assert fired(program, sale, budget_left={"november": 100}) == ["november"]
    cut = program.evaluate(sale, member(), 0, 0, {}, {"november": 2})
    assert (cut.by_rule, cut.accrued_points) == ([("november", 2)], 2)  # 5 points cut to the 2 left
    assert fired(program, sale, usage={"november": 3}, budget_left={"november": 50}) == ["base"]
    assert fired(program, sale, budget_left={"november": 0}) == ["base"]
    # without budget_left (a caller that does not track budgets) the rule is not capped
    assert fired(program, sale) == ["november"]


def test_names_that_appear_nowhere_else_are_fine(make):
    program = make("""\
rules:
  - {id: kombucha, scope: {categories: [kombucha], brands: [Fizz]}, reward: {percent: 10}}
  - {id: not-lottery, scope: {exclude_categories: [lottery], exclude_skus: ["0042"]}, reward: {points: 2}}
  - {id: kiosk, when: {store: K99, register: Z1}, reward: {points: 1}}
""")
    sale = receipt(line(1, "kombucha", 5000, brand="Fizz"), line(2, "lottery", 1000), line(3, "x", 2000, sku="0042"))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.by_rule == [("kombucha", 5), ("not-lottery", 2)]
    assert result.by_line == [(1, 7), (2, 0), (3, 0)]


def problems(files: dict[str, str]) -> list[str]:
    return [str(problem) for problem in check_files({"program.yaml": SETTINGS, **files}, date(2026, 11, 24))]


def test_typos_get_the_nearest_valid_key_at_every_level():
    found = problems({"rules.yaml": """\
rules:
  - {id: a, scope: {categores: [x]}, reward: {points: 1}}
  - {id: b, when: {tagz: [vip]}, reward: {points: 1}}
  - {id: c, when: {total: {bewteen: [1, 2]}}, reward: {points: 1}}
  - {id: d, limit: {per_member: {count: 1, per: weak}}, reward: {points: 1}}
  - {id: e, reward: {per_amount: {every: 100, point: 1}}}
  - {id: f, when: {recipt_number: 1}, reward: {points: 1}}
  - {id: g, reward: {points: 1}, expire_in_days: 5}
"""})
    assert found == [
        "rules.yaml:2:21: unknown key 'categores', did you mean 'categories'?",
        "rules.yaml:3:20: unknown condition 'tagz', did you mean 'tags'?",
        "rules.yaml:4:28: unknown operator 'bewteen', did you mean 'between'?",
        "rules.yaml:5:49: unknown value 'weak' for 'per', did you mean 'week'?",
        # the broken per_amount is reported once, not again as "a reward needs one of ..."
        "rules.yaml:6:34: missing required key 'points'",
        "rules.yaml:6:47: unknown key 'point', did you mean 'points'?",
        "rules.yaml:7:20: unknown condition 'recipt_number', did you mean 'receipt_number'?",
        "rules.yaml:8:34: unknown key 'expire_in_days', did you mean 'expires_in_days'?",
    ]


def test_program_wide_problems_across_files():
    found = problems({
        "a.yaml": "rules:\n  - {id: base, group: base, reward: {percent: 1}}\n",
        "b.yaml": "events:\n  - {id: base, on: birthday, reward: {points: 5}}\n",
        "c.yaml": """\
rules:
  - {id: x2, reward: {multiply: promo, by: 2}}
  - {id: x3, reward: {multiply: zzz, by: 3}}
  - {id: late, period: {from: "2026-12-02", to: "2026-12-01"}, reward: {points: 1}}
  - {id: one-day, period: {from: "2026-12-01", to: "2026-12-01"}, reward: {points: 1}}
  - {id: base, reward: {points: 1}}
""",
    })
    assert found == [
        "b.yaml:2:10: duplicate id 'base' (first defined at a.yaml:2:10)",
        "c.yaml:2:33: no rule has group 'promo'",
        "c.yaml:3:33: no rule has group 'zzz'",
        "c.yaml:4:49: period ends (2026-12-01) before it starts (2026-12-02)",
        "c.yaml:6:10: duplicate id 'base' (first defined at a.yaml:2:10)",
    ]
