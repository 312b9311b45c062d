"""Receipt arithmetic: redemption, exact points per rule and line, one rounding, attribution.

The first tests are the worked examples of the conformance cases, evaluated directly
against the shipped program; the rest pin down each rule of rules.md on small
programs written here.
"""

from __future__ import annotations

import pathlib
from datetime import date, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest

from rules import MemberFacts, largest_remainder, load_files, load_program

pytestmark = pytest.mark.no_database

MARKET = pathlib.Path(__file__).parent / "programs" / "market"

SETTINGS = """\
program: {id: t, name: Test, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: ROUNDING, activation_delay_days: 14, expiry_days: 365}
exclusions: {categories: [tobacco], flags: [no_loyalty]}
redemption: {max_share: 0.5, min_points: 10, exclude: {categories: [alcohol]}}
tiers: {levels: [{id: base, from: 0}, {id: silver, from: 500000}, {id: gold, from: 2000000}]}
stores: [{id: S001, tags: [kyiv]}, {id: S002, tags: [lviv]}, {id: F001, partner: fuelco}]
partners: [{id: fuelco, name: Fuel Co}]
"""


def line(no, category, amount, qty="1", sku=None, brand=None, flags=()):
    qty = Decimal(qty)
    return SimpleNamespace(line_no=no, sku=sku or f"sku-{no}", category=category, brand=brand, qty=qty,
                           price=int(amount / qty), amount=amount, flags=list(flags))  # fmt: skip


def receipt(ts, *lines, store="S001", register="K01", channel="pos"):
    return SimpleNamespace(store_id=store, register_id=register, channel=channel, ts=datetime.fromisoformat(ts),
                           total=sum(item.amount for item in lines), lines=list(lines))  # fmt: skip


def member(tier="base", **facts):
    facts.setdefault("enrolled_on", date(2026, 1, 1))
    return MemberFacts(member_id="m1", tier=tier, **facts)


@pytest.fixture(scope="module")
def market():
    program = load_program(MARKET)
    yield program
    program.close()


@pytest.fixture
def make():
    made = []

    def build(rules_yaml: str, rounding: str = "floor", settings: str = SETTINGS):
        program = load_files({"program.yaml": settings.replace("ROUNDING", rounding), "rules.yaml": rules_yaml})
        made.append(program)
        return program

    yield build
    for program in made:
        program.close()


TUESDAY_NOON = "2026-11-24T12:00:00+02:00"


# The conformance cases ------------------------------------------------------


def test_case_01_base_accrual_double_dairy_and_tobacco_excluded(market):
    sale = receipt(
        TUESDAY_NOON,
        line(1, "dairy", 9100, qty="2", sku="4820000000011"),
        line(2, "bakery", 3000, sku="4820000000028"),
        line(3, "tobacco", 10000, sku="4820000000035"),
    )
    result = market.evaluate(sale, member(), 0, 0, {})
    assert result.accrued_points == 4
    assert result.by_rule == [("base", 2), ("dairy-x2", 2)]
    assert result.by_line == [(1, 4), (2, 0)]
    assert result.pairs == [("base", 1, 2), ("dairy-x2", 1, 2)]
    assert result.available_from == date(2026, 12, 8)
    assert result.expires_on == date(2027, 11, 24)
    assert result.lots == [(date(2026, 12, 8), date(2027, 11, 24), 4)]
    assert (result.redeemed_points, result.discount, result.redeem_refusal) == (0, 0, None)


def test_case_02_gold_member_pays_part_with_points(market):
    sale = receipt(
        "2026-11-28T09:00:00+02:00",
        line(1, "alcohol", 30000, sku="wine-1"),
        line(2, "dairy", 20000, sku="cheese-1"),
        line(3, "grocery", 50000, sku="coffee-1"),
    )
    result = market.evaluate(sale, member("gold"), 1000, 4900, {})
    assert (result.redeemed_points, result.discount) == (350, 35000)
    assert result.redeemed_by_line == [(2, 100, 10000), (3, 250, 25000)]
    assert result.accrued_points == 87
    assert result.by_rule == [("base-gold", 32), ("dairy-x2", 5), ("big-basket", 50)]
    assert result.by_line == [(1, 38), (2, 18), (3, 31)]
    assert result.pairs == [
        ("base-gold", 1, 15), ("base-gold", 2, 5), ("base-gold", 3, 12), ("dairy-x2", 2, 5),
        ("big-basket", 1, 23), ("big-basket", 2, 8), ("big-basket", 3, 19),
    ]  # fmt: skip
    assert (result.available_from, result.expires_on) == (date(2026, 12, 12), date(2027, 11, 28))


def test_case_03_redemption_limited_by_balance_then_by_request(market):
    tv = receipt("2026-11-25T18:00:00+02:00", line(1, "electronics", 200000, sku="tv-1"))
    first = market.evaluate(tv, member(), 600, 900, {})
    assert (first.redeemed_points, first.discount, first.redeem_refusal) == (600, 60000, None)
    assert first.accrued_points == 78
    assert first.by_rule == [("base", 28), ("big-basket", 50)]
    second = market.evaluate(tv, member(), 600, 400, {})
    assert second.redeemed_points == 400


def test_fuel_per_litre_at_the_partner_station(market):
    fuel = receipt("2026-11-26T15:00:00+02:00", line(1, "fuel", 202500, qty="40.5"), store="F001")
    result = market.evaluate(fuel, member(), 0, 0, {})
    # base 40.5 + fuel 40.5 + big-basket 50 = 131 exactly; the .5 tie goes to the earlier rule
    assert result.by_rule == [("base", 41), ("big-basket", 50), ("fuel", 40)]
    grocery = receipt("2026-11-26T15:00:00+02:00", line(1, "fuel", 20250, qty="4.05"), store="S001")
    assert "fuel" not in market.evaluate(grocery, member(), 0, 0, {}).fired


def test_morning_bonus_on_weekdays_only(market):
    basket = line(1, "bakery", 10000)
    assert "morning" in market.evaluate(receipt("2026-11-26T07:00:00+02:00", basket), member(), 0, 0, {}).fired
    assert "morning" not in market.evaluate(receipt("2026-11-26T10:00:00+02:00", basket), member(), 0, 0, {}).fired
    assert "morning" not in market.evaluate(receipt("2026-11-28T08:00:00+02:00", basket), member(), 0, 0, {}).fired
    # the receipt's time is read in the program's timezone, not the offset it was sent with
    assert "morning" in market.evaluate(receipt("2026-11-26T06:30:00+00:00", basket), member(), 0, 0, {}).fired


def test_big_basket_once_a_day(market):
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 150000))
    assert "big-basket" in market.evaluate(sale, member(), 0, 0, {}).fired
    assert "big-basket" not in market.evaluate(sale, member(), 0, 0, {"big-basket": 1}).fired
    assert market.limit_windows(date(2026, 11, 24)) == {"big-basket": (date(2026, 11, 24), date(2026, 11, 24))}


def test_anonymous_receipt_earns_and_redeems_nothing(market):
    sale = receipt(TUESDAY_NOON, line(1, "dairy", 150000), line(2, "tobacco", 1000))
    result = market.evaluate(sale, None, 500, 1000, {})
    assert (result.accrued_points, result.redeemed_points, result.fired, result.pairs) == (0, 0, [], [])
    assert result.by_line == [(1, 0)]


# Rounding and attribution -------------------------------------------------------


@pytest.mark.parametrize(
    ("rounding", "amounts", "total", "by_line"),
    [
        ("floor", (9100, 3000), 2, [(1, 2), (2, 0)]),  # 1.82 + 0.60 = 2.42
        ("half_up", (9100, 3000), 2, [(1, 2), (2, 0)]),
        ("ceil", (9100, 3000), 3, [(1, 2), (2, 1)]),
        ("floor", (9500, 3000), 2, [(1, 2), (2, 0)]),  # 1.90 + 0.60 = 2.50
        ("half_up", (9500, 3000), 3, [(1, 2), (2, 1)]),
        ("ceil", (10000, 5000), 3, [(1, 2), (2, 1)]),  # exactly 3: nothing to round
    ],
)
def test_rounding_once_per_receipt(make, rounding, amounts, total, by_line):
    program = make("rules:\n  - {id: base, reward: {percent: 2}}\n", rounding)
    sale = receipt(TUESDAY_NOON, *(line(n, "grocery", amount) for n, amount in enumerate(amounts, 1)))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.accrued_points == total
    assert result.by_line == by_line


def test_attribution_sums_exactly_and_ties_go_to_earlier_rule_then_lower_line(make):
    program = make(
        """\
        rules:
          - {id: a, reward: {percent: 1}}
          - {id: b, reward: {percent: 1}}
        """.replace("        ", "")
    )
    # each pair is exactly 0.5: two integers to hand out over four equal remainders
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 5000), line(2, "grocery", 5000))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.accrued_points == 2
    assert result.pairs == [("a", 1, 1), ("a", 2, 1)]
    assert result.by_rule == [("a", 2), ("b", 0)]
    assert result.fired == ["a", "b"]


def test_line_order_on_receipt_does_not_change_tie_break(make):
    program = make("rules:\n  - {id: a, reward: {percent: 1}}\n")
    sale = receipt(TUESDAY_NOON, line(7, "grocery", 5000), line(3, "grocery", 5000), line(5, "grocery", 5000))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.pairs == [("a", 3, 1)]  # 1.5 -> 1, the single point to the lowest line_no
    assert result.by_line == [(7, 0), (3, 1), (5, 0)]


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2), (2, 3, 1)])
def test_points_left_go_to_the_largest_remainders_then_earlier_rule_and_lower_line(make, order):
    program = make(
        """\
        rules:
          - {id: a, reward: {percent: 1}}
          - {id: b, reward: {percent: 1}}
        """.replace("        ", "")
    )
    # each rule: 0.5, 1.5 and 0.25 on lines 1 to 3; 4.5 rounds to 4, floors give 2, and the
    # two left tie at 0.5 on four pairs: rule a's, lines 1 and 2, in whatever order sent
    amounts = {1: 5000, 2: 15000, 3: 2500}
    sale = receipt(TUESDAY_NOON, *(line(n, "grocery", amounts[n]) for n in order))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.by_rule == [("a", 3), ("b", 1)]
    assert sorted(result.pairs) == [("a", 1, 1), ("a", 2, 2), ("b", 2, 1)]
    assert sorted(result.by_line) == [(1, 1), (2, 3), (3, 0)]


# Reward kinds ---------------------------------------------------------------


def test_fixed_points_spread_by_paid_amount(make):
    program = make("rules:\n  - {id: gift, reward: {points: 10}}\n")
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 20000), line(2, "grocery", 10000), line(3, "grocery", 10000))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.pairs == [("gift", 1, 5), ("gift", 2, 3), ("gift", 3, 2)]  # 5, 2.5, 2.5


def test_fixed_points_of_several_rules_on_the_same_lines_each_spread_by_paid_amount(make):
    program = make(
        """\
        rules:
          - {id: gift, reward: {points: 10}}
          - {id: dairy-gift, scope: {categories: [dairy]}, reward: {points: 6}}
          - {id: more, reward: {points: 4}}
        """.replace("        ", "")
    )
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 20000), line(2, "dairy", 10000), line(3, "grocery", 10000))
    result = program.evaluate(sale, member(), 0, 0, {})
    # gift 5, 2.5, 2.5; more 2, 1, 1; dairy-gift 6: the one point left goes to gift's line 2
    assert result.pairs == [("gift", 1, 5), ("gift", 2, 3), ("gift", 3, 2), ("dairy-gift", 2, 6),
                            ("more", 1, 2), ("more", 2, 1), ("more", 3, 1)]
    assert result.by_line == [(1, 7), (2, 10), (3, 3)]


def test_per_amount_counts_full_steps_of_the_paid_amount(make):
    program = make("rules:\n  - {id: steps, reward: {per_amount: {every: 10000, points: 5}}}\n")
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 15000), line(2, "grocery", 10000))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.by_rule == [("steps", 10)]  # two full 100.00 of 250.00
    assert result.by_line == [(1, 6), (2, 4)]
    # paying 50.00 with points leaves 200.00 paid: still two steps; 19,999 paid would be one
    paid_less = program.evaluate(sale, member(), 50, 1000, {})
    assert paid_less.redeemed_points == 50 and paid_less.by_rule == [("steps", 10)]
    small = receipt(TUESDAY_NOON, line(1, "grocery", 9999))
    assert program.evaluate(small, member(), 0, 0, {}).fired == []


def test_per_unit_with_fractional_quantity(make):
    program = make("rules:\n  - {id: units, reward: {per_unit: 1.5}}\n")
    sale = receipt(TUESDAY_NOON, line(1, "produce", 3000, qty="0.75"), line(2, "produce", 4000, qty="2"))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.accrued_points == 4  # 1.125 + 3 = 4.125
    assert result.by_line == [(1, 1), (2, 3)]


def test_multiply_adds_only_to_lines_in_its_scope(make):
    program = make(
        """\
rules:
  - {id: base, group: base, reward: {percent: 2}}
  - {id: dairy-half, scope: {categories: [dairy]}, reward: {multiply: base, by: 1.5}}
"""
    )
    sale = receipt(TUESDAY_NOON, line(1, "dairy", 10000), line(2, "bakery", 10000))
    result = program.evaluate(sale, member(), 0, 0, {})
    assert result.by_rule == [("base", 4), ("dairy-half", 1)]
    assert result.by_line == [(1, 3), (2, 2)]


def test_multiply_follows_the_group_winner(make):
    program = make(
        """\
rules:
  - {id: base, group: base, reward: {percent: 2}}
  - {id: gold, group: base, priority: 5, when: {tier: gold}, reward: {percent: 10}}
  - {id: x3, reward: {multiply: base, by: 3}}
"""
    )
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 10000))
    assert program.evaluate(sale, member("gold"), 0, 0, {}).by_rule == [("gold", 10), ("x3", 20)]
    assert program.evaluate(sale, member("base"), 0, 0, {}).by_rule == [("base", 2), ("x3", 4)]


def test_multiply_without_points_from_its_group_does_not_fire(make):
    program = make(
        """\
rules:
  - {id: base, group: base, scope: {categories: [dairy]}, reward: {percent: 2}}
  - {id: x2, scope: {categories: [bakery]}, reward: {multiply: base, by: 2}}
"""
    )
    sale = receipt(TUESDAY_NOON, line(1, "dairy", 10000), line(2, "bakery", 10000))
    assert program.evaluate(sale, member(), 0, 0, {}).fired == ["base"]


def test_points_are_not_earned_on_the_part_paid_with_points(make):
    settings = SETTINGS.replace("max_share: 0.5", "max_share: 1")
    program = make("rules:\n  - {id: base, reward: {percent: 10}}\n  - {id: gift, reward: {points: 5}}\n", settings=settings)
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 10000))
    all_points = program.evaluate(sale, member(), 100, 100, {})
    assert (all_points.redeemed_points, all_points.accrued_points, all_points.fired) == (100, 0, [])
    half = program.evaluate(sale, member(), 50, 100, {})
    assert half.by_rule == [("base", 5), ("gift", 5)]


# Stacking, limits, budgets -------------------------------------------------------


def test_group_highest_priority_wins_and_ties_go_to_the_first_defined(make):
    program = make(
        """\
rules:
  - {id: first, group: g, priority: 1, reward: {percent: 1}}
  - {id: second, group: g, priority: 1, reward: {percent: 7}}
  - {id: gold-only, group: g, priority: 9, when: {tier: gold}, reward: {percent: 3}}
  - {id: ungrouped, reward: {points: 1}}
"""
    )
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 10000))
    assert program.evaluate(sale, member(), 0, 0, {}).fired == ["first", "ungrouped"]
    assert program.evaluate(sale, member("gold"), 0, 0, {}).fired == ["gold-only", "ungrouped"]


def test_a_rule_with_nothing_in_scope_leaves_its_group_to_the_next(make):
    program = make(
        """\
rules:
  - {id: plain, group: g, reward: {percent: 1}}
  - {id: dairy-best, group: g, priority: 5, scope: {categories: [dairy]}, reward: {percent: 9}}
"""
    )
    assert program.evaluate(receipt(TUESDAY_NOON, line(1, "bakery", 10000)), member(), 0, 0, {}).fired == ["plain"]
    assert program.evaluate(receipt(TUESDAY_NOON, line(1, "dairy", 10000)), member(), 0, 0, {}).fired == [
        "dairy-best"
    ]


def test_a_used_up_limit_lets_the_next_rule_of_the_group_win(make):
    program = make(
        """\
rules:
  - {id: base, group: base, reward: {percent: 2}}
  - id: weekly-boost
    group: base
    priority: 10
    reward: {percent: 10}
    limit: {per_member: {count: 2, per: week}}
  - id: launch
    period: {from: "2026-11-01", to: "2026-11-30"}
    reward: {points: 5}
    limit: {per_member: {count: 1, per: period}}
  - {id: monthly, reward: {points: 1}, limit: {per_member: {count: 3, per: month}}}
"""
    )
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 10000))
    assert program.evaluate(sale, member(), 0, 0, {"weekly-boost": 1}).fired == ["weekly-boost", "launch", "monthly"]
    used = {"weekly-boost": 2, "launch": 1, "monthly": 3}
    assert program.evaluate(sale, member(), 0, 0, used).fired == ["base"]
    assert program.limit_windows(date(2026, 11, 26)) == {
        "weekly-boost": (date(2026, 11, 23), date(2026, 11, 29)),
        "launch": (date(2026, 11, 1), date(2026, 11, 30)),
        "monthly": (date(2026, 11, 1), date(2026, 11, 30)),
    }
    assert program.limited_rule_ids == {"weekly-boost", "launch", "monthly"}


def test_budget_gives_the_remainder_then_nothing(make):
    program = make(
        """\
rules:
  - {id: base, group: base, reward: {percent: 2}}
  - {id: promo, group: base, priority: 1, reward: {points: 30}, budget: {points: 1000}}
"""
    )
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 20000), line(2, "grocery", 10000))
    assert program.budgets == {"promo": 1000}
    assert program.evaluate(sale, member(), 0, 0, {}, {"promo": 500}).by_rule == [("promo", 30)]
    cut = program.evaluate(sale, member(), 0, 0, {}, {"promo": 7})
    assert (cut.by_rule, cut.by_line, cut.accrued_points) == ([("promo", 7)], [(1, 5), (2, 2)], 7)
    assert program.evaluate(sale, member(), 0, 0, {}, {"promo": 0}).by_rule == [("base", 6)]


# Conditions -----------------------------------------------------------------


def fired_for(program, sale, who=None):
    return program.evaluate(sale, who or member(), 0, 0, {}).fired


def test_not_any_and_operators(make):
    program = make(
        """\
rules:
  - {id: not-kyiv, when: {not: {store: [S001]}}, reward: {points: 1}}
  - {id: gold-or-big, when: {any: [{tier: gold}, {total: {gte: 50000}}]}, reward: {points: 1}}
  - {id: mid, when: {total: {between: [10000, 20000]}, items: {ne: 3}}, reward: {points: 1}}
  - {id: not-mid, when: {not: {total: {between: [10000, 20000]}}}, reward: {points: 1}}
  - {id: small, when: {total: {lt: 10000}, items: [1, 2]}, reward: {points: 1}}
  - {id: strict, when: {total: {gt: 20000, lte: 30000}}, reward: {points: 1}}
  - {id: not-both, when: {not: {tier: gold, store: S002}}, reward: {points: 1}}
  - {id: online, when: {channel: web, register: {ne: [K01, K02]}}, reward: {points: 1}}
"""
    )
    kyiv_small = receipt(TUESDAY_NOON, line(1, "grocery", 5000))
    assert fired_for(program, kyiv_small) == ["not-mid", "small", "not-both"]
    lviv_mid = receipt(TUESDAY_NOON, line(1, "grocery", 20000), store="S002")
    assert fired_for(program, lviv_mid) == ["not-kyiv", "mid", "not-both"]
    assert fired_for(program, lviv_mid, member("gold")) == ["not-kyiv", "gold-or-big", "mid"]
    three = receipt(TUESDAY_NOON, line(1, "grocery", 5000), line(2, "grocery", 5000), line(3, "grocery", 5000))
    assert fired_for(program, three) == ["not-both"]
    big = receipt(TUESDAY_NOON, line(1, "grocery", 60000), register="K09", channel="web")
    assert fired_for(program, big) == ["gold-or-big", "not-mid", "not-both", "online"]
    edge = receipt(TUESDAY_NOON, line(1, "grocery", 30000))
    assert fired_for(program, edge) == ["not-mid", "strict", "not-both"]


def test_hours_wrap_past_midnight(make):
    program = make('rules:\n  - {id: night, when: {hours: "22:00-02:00"}, reward: {points: 1}}\n')
    sale = line(1, "grocery", 1000)
    for clock, fires in [("21:59", False), ("22:00", True), ("23:30", True), ("01:59", True), ("02:00", False)]:
        day = "2026-11-25" if clock < "12" else "2026-11-24"
        assert (fired_for(program, receipt(f"{day}T{clock}:00+02:00", sale)) == ["night"]) is fires, clock


def test_member_conditions(make):
    program = make(
        """\
rules:
  - {id: bday, when: {birthday_within_days: 3}, reward: {points: 1}}
  - {id: newcomer, when: {enrolled_within_days: 30}, reward: {points: 1}}
  - {id: first-purchase, when: {receipt_number: 1}, reward: {points: 1}}
  - {id: staff, when: {tags: [staff, vip]}, reward: {points: 1}}
  - {id: not-staff, when: {not: {tags: staff}}, reward: {points: 1}}
  - {id: in-kyiv, when: {store_tags: kyiv}, reward: {points: 1}}
  - {id: fuel, when: {partner: fuelco}, reward: {points: 1}}
"""
    )
    sale = receipt("2026-12-31T12:00:00+02:00", line(1, "grocery", 1000))
    regular = member(birthday=date(1990, 6, 1), enrolled_on=date(2025, 1, 1), receipt_number=7)
    assert fired_for(program, sale, regular) == ["not-staff", "in-kyiv"]
    newcomer = member(birthday=date(1990, 1, 2), enrolled_on=date(2026, 12, 1), receipt_number=1)
    assert fired_for(program, sale, newcomer) == ["bday", "newcomer", "first-purchase", "not-staff", "in-kyiv"]
    tagged = member(tags=frozenset({"vip"}), birthday=date(2000, 12, 27), receipt_number=2)
    fuel = receipt("2026-12-31T12:00:00+02:00", line(1, "grocery", 1000), store="F001")
    assert fired_for(program, fuel, tagged) == ["staff", "not-staff", "fuel"]
    assert fired_for(program, fuel, member(tags=frozenset({"staff"}), receipt_number=2)) == ["staff", "fuel"]


def test_leap_day_birthday_is_celebrated_on_28_february(make):
    program = make("rules:\n  - {id: bday, when: {birthday_within_days: 0}, reward: {points: 1}}\n")
    leapling = member(birthday=date(2000, 2, 29))
    assert fired_for(program, receipt("2027-02-28T12:00:00+02:00", line(1, "x", 100)), leapling) == ["bday"]
    assert fired_for(program, receipt("2027-03-01T12:00:00+02:00", line(1, "x", 100)), leapling) == []


def test_period_is_inclusive_local_dates(make):
    program = make('rules:\n  - {id: p, period: {from: "2026-11-20", to: "2026-11-30"}, reward: {points: 1}}\n')
    sale = line(1, "grocery", 1000)
    assert fired_for(program, receipt("2026-11-19T23:59:00+02:00", sale)) == []
    assert fired_for(program, receipt("2026-11-19T22:00:00+00:00", sale)) == ["p"]  # already the 20th in Kyiv
    assert fired_for(program, receipt("2026-11-30T23:59:00+02:00", sale)) == ["p"]
    assert fired_for(program, receipt("2026-12-01T00:00:00+02:00", sale)) == []


# Exclusions and redemption -----------------------------------------------------


def test_exclusions_and_redemption_exclusions(make):
    program = make("rules:\n  - {id: base, reward: {percent: 10}}\n  - {id: wine, scope: {exclude_flags: [promo]}, reward: {points: 3}}\n")
    sale = receipt(
        TUESDAY_NOON,
        line(1, "grocery", 10000),
        line(2, "grocery", 10000, flags=["no_loyalty"]),
        line(3, "tobacco", 10000),
        line(4, "alcohol", 10000, flags=["promo"]),
    )
    result = program.evaluate(sale, member(), 1000, 1000, {})
    # only line 1 can be paid with points: half of 100.00 is 50 points
    assert (result.redeemed_points, result.redeemed_by_line) == (50, [(1, 50, 5000)])
    assert result.by_line == [(1, 8), (4, 10)]  # 5 + 3 on the half still paid; alcohol earns in full
    assert result.by_rule == [("base", 15), ("wine", 3)]


def test_redemption_refusals(make):
    program = make("rules:\n  - {id: base, reward: {percent: 1}}\n")
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 100000))
    below_request = program.evaluate(sale, member(), 5, 1000, {})
    assert (below_request.redeem_refusal, below_request.redeemed_points) == ("below_min_redemption", 0)
    assert below_request.redeem_most is None    # the request was what fell short
    assert below_request.accrued_points == 10  # a refused redemption still earns on the full amount
    small = program.evaluate(receipt(TUESDAY_NOON, line(1, "grocery", 1500)), member(), 100, 1000, {})
    assert small.redeem_refusal == "below_min_redemption"  # half of 15.00 is 7 points < 10
    assert small.redeem_most == 7       # the receipt, not the request, fell short
    poor = program.evaluate(sale, member(), 100, 9, {})
    assert poor.redeem_refusal == "insufficient_points"
    partial = program.evaluate(sale, member(), 100, 40, {})
    assert (partial.redeem_refusal, partial.redeemed_points) == (None, 40)
    alcohol_only = program.evaluate(receipt(TUESDAY_NOON, line(1, "alcohol", 100000)), member(), 100, 1000, {})
    assert (alcohol_only.redeem_refusal, alcohol_only.redeem_most) == ("below_min_redemption", 0)


def test_discount_and_points_split_exactly_over_lines(make):
    program = make("rules:\n  - {id: base, reward: {percent: 1}}\n")
    sale = receipt(TUESDAY_NOON, line(1, "grocery", 3333), line(2, "grocery", 3333), line(3, "grocery", 3334))
    result = program.evaluate(sale, member(), 20, 1000, {})
    # 6.666 / 6.666 / 6.668 points and 666.6 / 666.6 / 666.8 kopecks, each split on its own
    assert result.redeemed_by_line == [(1, 7, 667), (2, 6, 666), (3, 7, 667)]
    assert sum(points for _, points, _ in result.redeemed_by_line) == 20
    assert sum(money for _, _, money in result.redeemed_by_line) == result.discount == 2000


# Expiry, tiers, events -----------------------------------------------------------


def test_rule_expiry_makes_its_own_lot(make):
    program = make(
        "rules:\n  - {id: base, reward: {percent: 2}}\n  - {id: flash, reward: {points: 7}, expires_in_days: 30}\n"
    )
    result = program.evaluate(receipt(TUESDAY_NOON, line(1, "grocery", 10000)), member(), 0, 0, {})
    assert result.lots == [
        (date(2026, 12, 8), date(2026, 12, 24), 7),
        (date(2026, 12, 8), date(2027, 11, 24), 2),
    ]
    assert program.rule_dates("flash", date(2026, 11, 24)) == (date(2026, 12, 8), date(2026, 12, 24))
    assert program.rule_dates("base", date(2026, 11, 24)) == (date(2026, 12, 8), date(2027, 11, 24))


def test_tiers_and_events(market):
    assert market.tier_for(0) == ("base", "silver", 500000)
    assert market.tier_for(499999) == ("base", "silver", 1)
    assert market.tier_for(500000) == ("silver", "gold", 1500000)
    assert market.tier_for(2500000) == ("gold", None, None)
    assert market.tier_for(-10) == ("base", "silver", 500010)
    assert [(e.id, e.points, e.expires_in_days) for e in market.events_on("enrolled")] == [("welcome", 100, None)]
    assert market.events_on("birthday") == []


def test_program_settings_the_server_reads(market):
    assert (market.point_value, market.rounding, market.activation_delay_days, market.expiry_days) == (100, "floor", 14, 365)
    assert (market.hold_ttl_minutes, market.redemption_min_points, market.currency) == (15, 10, "UAH")
    assert (market.tier_metric, market.tier_window_days, market.timezone_name) == ("spend", 365, "Europe/Kyiv")
    assert market.stores["F001"].partner == "fuelco"
    assert market.partners["fuelco"].funding_share == Decimal("1.0")


# largest_remainder ----------------------------------------------------------------


def test_largest_remainder():
    assert largest_remainder(350, [20000, 50000]) == [100, 250]
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]  # tie: lower index first
    assert largest_remainder(2, [1, 0, 1]) == [1, 0, 1]
    assert largest_remainder(-10, [1, 1, 1]) == [-4, -3, -3]
    assert largest_remainder(0, [0, 0]) == [0, 0]
    with pytest.raises(ValueError):
        largest_remainder(5, [0, 0])
    with pytest.raises(ValueError):
        largest_remainder(5, [1, -1])
    for total in range(0, 60):
        parts = largest_remainder(total, [3, 7, 11, 0, 13])
        assert sum(parts) == total and parts[3] == 0
        assert all(abs(part - total * weight / 34) < 1 for part, weight in zip(parts, [3, 7, 11, 0, 13]))
