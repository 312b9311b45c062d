"""The durable-rules engine behind conditions: it must agree with the plain meaning.

The C engine has hard limits and surprising behaviour (an `$or` fires once per true
branch, facts that match too many rules fail), so the module around it is tested
against a plain-Python reading of the same condition trees on random facts.
"""

from __future__ import annotations

import gc
import random

import pytest

from rules import RuleEngineError, load_files
from rules.conditions import Cmp, Group, group, holds, max_paths, negate, to_engine
from rules.engine import Engine
from rules.matching import Matcher

pytestmark = pytest.mark.no_database

FIELDS = {
    "store": ["S001", "S002", "F001", "Київ \"центр\""],
    "tier": ["base", "silver", "gold"],
    "weekday": ["mon", "tue", "sat"],
    "total": [0, 5000, 100000, 3_000_000_000],
    "minute": [0, 420, 600, 1320],
    "date": [20261120, 20261130],
    "t0": [True],
}


def random_node(rng: random.Random, depth: int = 0) -> Cmp | Group:
    if depth >= 2 or rng.random() < 0.5:
        field = rng.choice(list(FIELDS))
        value = rng.choice(FIELDS[field])
        ops = ["eq", "ne"] if isinstance(value, (str, bool)) else ["eq", "ne", "lt", "lte", "gt", "gte"]
        return Cmp(field, rng.choice(ops), value)
    node = group(rng.choice(["and", "or"]), [random_node(rng, depth + 1) for _ in range(rng.randint(2, 3))])
    return negate(node) if rng.random() < 0.3 else node


def random_fact(rng: random.Random) -> dict:
    fact = {}
    for field, values in FIELDS.items():
        value = rng.choice(values)
        if isinstance(value, bool):
            fact[field] = rng.random() < 0.5
        elif isinstance(value, int):
            fact[field] = value + rng.choice([-1, 0, 0, 1])
        else:
            fact[field] = value if rng.random() < 0.8 else "other"
    return fact


def test_engine_agrees_with_plain_meaning_on_random_conditions_and_facts():
    rng = random.Random(20261124)
    conditions = [random_node(rng) for _ in range(120)]
    conditions = [node for node in conditions if max_paths(node) <= 8]
    matcher = Matcher(conditions, cache_entries=64)
    try:
        for _ in range(400):
            fact = random_fact(rng)
            expected = frozenset(i for i, node in enumerate(conditions) if holds(node, fact))
            assert matcher.ask_engine(dict(fact)) == expected
            assert matcher.match(dict(fact)) == expected  # through the cache
        assert matcher.engine_calls < 800  # the cache answered some
    finally:
        matcher.close()


def test_or_with_several_true_branches_counts_once_and_identical_facts_repeat():
    node = Group("or", [Cmp("total", "gte", 1), Cmp("total", "gte", 2), Cmp("store", "eq", "S001")])
    engine = Engine([to_engine(node)], [max_paths(node)])
    try:
        for _ in range(3):
            assert engine.match({"total": 5, "store": "S001"}) == {0}
        assert engine.match({"total": 0, "store": "S002"}) == set()
    finally:
        engine.close()


def test_many_conditions_all_holding_at_once():
    # One ruleset fails once a fact makes more than 64 matches, and hangs beyond 512
    # rules: conditions are spread over several rulesets.
    conditions = [Cmp("total", "gte", n) for n in range(600)]
    matcher = Matcher(conditions, cache_entries=0)
    try:
        assert matcher.match({"total": 10**6}) == frozenset(range(600))
        assert matcher.match({"total": 299}) == frozenset(range(300))
    finally:
        matcher.close()


def test_identical_conditions_are_asked_once():
    node = Cmp("tier", "eq", "gold")
    matcher = Matcher([node, Cmp("tier", "eq", "gold"), Cmp("tier", "eq", "base")])
    try:
        assert len(matcher._engine._sources) == 1
        assert matcher.match({"tier": "gold"}) == {0, 1}
    finally:
        matcher.close()


def test_closed_engine_refuses_and_close_is_idempotent():
    engine = Engine([{"tier": "gold"}], [1])
    engine.close()
    engine.close()
    with pytest.raises(RuleEngineError):
        engine.match({"tier": "gold"})


def test_engine_refusals_become_rule_engine_errors():
    with pytest.raises(RuleEngineError):
        Engine([{"$or": [{"store": f"S{n}"} for n in range(60)]}], [60])
    too_many_groups = {"$or": [{"$and": [{"total": n}, {"store": "x"}]} for n in range(20)]}
    with pytest.raises(RuleEngineError):
        Engine([too_many_groups], [1])


def test_loader_refuses_conditions_beyond_the_engine_limits():
    settings = "program: {id: t, currency: UAH, timezone: UTC}\npoints: {value: 1}\n"
    blocks = ", ".join(f"{{total: {n}, items: {n}}}" for n in range(16))
    rules = f"rules:\n  - {{id: huge, when: {{any: [{blocks}]}}, reward: {{points: 1}}}}\n"
    from rules import check_files

    problems = [str(problem) for problem in check_files({"p.yaml": settings, "r.yaml": rules})]
    assert problems == [
        "r.yaml:2:22: conditions too complex for the rule engine (17 and/or groups, up to 16 alternatives "
        "holding at once, 32 comparisons; at most 15, 32 and 256): split the rule"
    ]


def test_program_frees_its_engine_when_collected():
    settings = "program: {id: t, currency: UAH, timezone: UTC}\npoints: {value: 1}\n"
    program = load_files({"p.yaml": settings, "r.yaml": "rules:\n  - {id: g, when: {tier: base}, reward: {points: 1}}\n"})
    finalizer = program._finalizer
    assert finalizer.alive
    del program
    gc.collect()
    assert not finalizer.alive
