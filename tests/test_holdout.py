"""Control groups (`holdout: h`): who is held out, and what a held-out member's receipt gives.

The assignment is sha256("<program id>:<rule id>:<member_id>"): its first 8 hex digits
over 2^32, compared with h. It must not depend on anything else (the program's other
rules, its version, the process), so the campaign report can rebuild the groups later.
"""

from __future__ import annotations

import math
import textwrap
from datetime import date
from decimal import Decimal
from fractions import Fraction

import pytest
from test_rules_arithmetic import line, receipt

from rules import MemberFacts, load_files
from rules.segments import holdout_member

pytestmark = pytest.mark.no_database

SETTINGS = """\
program: {id: boutique, name: Boutique, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: B01}]
"""

RULES = """\
rules:
  - id: base
    reward: {percent: 2}
  - id: scarf-week
    group: scarves
    priority: 10
    scope: {categories: [scarves]}
    reward: {percent: 5}
    limit: {per_member: {count: 1, per: day}}
    budget: {points: 1000}
    holdout: 0.2
  - id: scarf-plain
    group: scarves
    scope: {categories: [scarves]}
    reward: {percent: 1}
"""

# sha256("boutique:scarf-week:<id>")[:8] of fixed ids, worked out once by hand.
FIXED = {"m_1": 0x1BA53D8F, "m_2": 0x393C36C8, "m_3": 0x43C82D75, "m_42": 0x6A714B44}


def load(rules_text: str = RULES, settings: str = SETTINGS):
    return load_files({"program.yaml": settings, "rules.yaml": textwrap.dedent(rules_text)}, date(2026, 12, 1))


@pytest.fixture
def boutique():
    program = load()
    yield program
    program.close()


def who(member_id: str) -> MemberFacts:
    return MemberFacts(member_id=member_id, tier="base")


def test_the_formula_on_fixed_ids():
    for member_id, value in FIXED.items():
        at = Fraction(value, 2**32)
        assert not holdout_member("boutique", "scarf-week", member_id, at), "the comparison is strict: < h"
        assert holdout_member("boutique", "scarf-week", member_id, at + Fraction(1, 2**32))
    # m_1 is at 0.10799..., m_2 at 0.22357...: a 20 % control group has m_1 and not m_2.
    assert holdout_member("boutique", "scarf-week", "m_1", Decimal("0.2"))
    assert not holdout_member("boutique", "scarf-week", "m_2", Decimal("0.2"))
    assert holdout_member("boutique", "scarf-week", "m_2", Decimal("0.5"))
    assert not holdout_member("boutique", "scarf-week", "m_42", Decimal("0.4"))
    # Each part of the text counts: another program or rule id draws another group.
    ids = [f"m_{n}" for n in range(1000)]

    def group(program_id: str, rule_id: str) -> set[str]:
        return {m for m in ids if holdout_member(program_id, rule_id, m, Decimal("0.2"))}

    assert group("boutique", "scarf-week") != group("market", "scarf-week")
    assert group("boutique", "scarf-week") != group("boutique", "scarf-week2")


def test_the_groups_are_stable_across_loads_and_versions(boutique):
    ids = [f"m_{n}" for n in range(2000)]
    first = {member_id: boutique.held_out_of(member_id) for member_id in ids}
    assert first == {member_id: boutique.held_out_of(member_id) for member_id in ids}
    edited = load(RULES + "  - id: newcomer\n    reward: {points: 1}\n    holdout: 0.3\n")
    try:
        assert edited.version != boutique.version
        again = {member_id: [r for r in edited.held_out_of(member_id) if r == "scarf-week"] for member_id in ids}
        assert again == first, "adding a rule must not move members between groups of another"
        assert edited.held_out_of("m_1")[0] == "scarf-week"
    finally:
        edited.close()


def test_the_proportion_is_within_a_binomial_bound():
    n = 100_000
    for share in (Decimal("0.1"), Decimal("0.2"), Decimal("0.5")):
        held = sum(holdout_member("shop", "coffee", f"m_{k}", share) for k in range(n))
        p = float(share)
        sd = math.sqrt(n * p * (1 - p))
        assert abs(held - n * p) < 5 * sd, (share, held)


def test_groups_of_two_rules_are_independent():
    n = 20_000
    both = sum(
        holdout_member("shop", "a", f"m_{k}", Decimal("0.5")) and holdout_member("shop", "b", f"m_{k}", Decimal("0.5"))
        for k in range(n)
    )
    assert abs(both - n / 4) < 5 * math.sqrt(n * 0.25 * 0.75)


def test_a_control_member_gets_the_next_rule_of_the_group(boutique):
    sale = receipt("2026-12-10T12:00:00+02:00", line(1, "scarves", 30000), line(2, "coats", 20000), store="B01")
    treated = boutique.evaluate(sale, who("m_2"), 0, 0, {}, {"scarf-week": 1000})
    assert treated.by_rule == [("base", 10), ("scarf-week", 15)]
    assert treated.held_out == []

    held = boutique.evaluate(sale, who("m_1"), 0, 0, {}, {"scarf-week": 1000})
    # 2 % of 500.00 = 10; scarf-plain 1 % of 300.00 = 3; scarf-week would have given 5 % of 300.00
    assert held.by_rule == [("base", 10), ("scarf-plain", 3)]
    assert held.fired == ["base", "scarf-plain"]
    assert "scarf-week" not in {rule for rule, _, _ in held.pairs}
    assert held.held_out == [("scarf-week", 15)]
    assert held.accrued_points == 13 and sum(points for _, points in held.by_line) == 13


def test_a_control_member_uses_no_limit_and_what_it_would_have_is_capped_like_a_treated_one(boutique):
    sale = receipt("2026-12-10T12:00:00+02:00", line(1, "scarves", 30000), store="B01")
    # A limit already used: the rule would not have applied, so nothing is recorded as held out.
    used = boutique.evaluate(sale, who("m_1"), 0, 0, {"scarf-week": 1}, {"scarf-week": 1000})
    assert used.held_out == [] and used.by_rule == [("base", 6), ("scarf-plain", 3)]
    # A budget nearly spent cuts what it would have given, as it would cut a treated member's.
    short = boutique.evaluate(sale, who("m_1"), 0, 0, {}, {"scarf-week": 4})
    assert short.held_out == [("scarf-week", 4)]


def test_a_control_member_of_a_rule_that_would_be_outranked_records_nothing():
    program = load(RULES.replace("priority: 10", "priority: -10"))
    try:
        sale = receipt("2026-12-10T12:00:00+02:00", line(1, "scarves", 30000), store="B01")
        assert program.evaluate(sale, who("m_1"), 0, 0, {}).held_out == []
    finally:
        program.close()


def test_explain_says_the_member_is_held_out(boutique):
    sale = receipt("2026-12-10T12:00:00+02:00", line(1, "scarves", 30000), store="B01")
    rules = {item.id: item for item in boutique.explain(sale, who("m_1")).rules}
    assert rules["scarf-week"].status == "not applicable"
    assert rules["scarf-week"].reasons == [
        "holdout: the member is in the control group (0.2 of members); would have given 15 point(s)"
    ]
    assert rules["scarf-plain"].status == "applied"
