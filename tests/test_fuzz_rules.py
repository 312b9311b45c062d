"""The rule compiler on generated YAML: it answers with problems or a program, never with
another exception (the server calls it on every reload and on POST /v1/admin/rules/check).

Programs are made by mutating the shipped market program (so generation reaches deep
into the compiler) and from scratch out of the language's own words. FUZZ_EXAMPLES scales
the number of examples as in test_fuzz_api.py.
"""
from __future__ import annotations

import copy
import os
import tempfile
from datetime import date
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MARKET
from rules import Problem, Program, ProgramError, check_dir, load_program

pytestmark = pytest.mark.no_database

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
TODAY = date(2026, 11, 24)  # one checker's date for both calls: the same warnings
SETTINGS = dict(deadline=None, database=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck))

FILES = {str(p.relative_to(MARKET)): yaml.safe_load(p.read_text()) for p in sorted(MARKET.rglob("*.yaml"))}
WORDS = ["program", "points", "rules", "events", "id", "name", "group", "priority", "when", "period", "from",
         "to", "scope", "reward", "limit", "per_member", "count", "per", "budget", "expires_in_days", "percent",
         "per_unit", "per_amount", "every", "multiply", "by", "store", "partner", "register", "channel", "total",
         "items", "weekdays", "hours", "tier", "tags", "birthday_within_days", "enrolled_within_days",
         "receipt_number", "gte", "gt", "lte", "lt", "ne", "between", "not", "any", "categories", "skus",
         "brands", "exclude_categories", "exclude_flags", "value", "rounding", "activation_delay_days",
         "expiry_days", "exclusions", "flags", "redemption", "max_share", "min_points", "exclude", "holds",
         "ttl_minutes", "tiers", "metric", "window_days", "levels", "stores", "partners", "funding_share",
         "on", "timezone", "currency", "base", "dairy", "mon", "day", "week", "month", "segments", "rfm",
         "define", "list", "r", "f", "m", "segment", "coupons", "coupon", "uses_per_code", "valid", "personal",
         "holdout", "days_since_last_purchase", "receipts_in_window", "spend_in_window", "enrolled_days"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.sampled_from(WORDS), st.text(max_size=20),
                    st.sampled_from(["2026-11-20", "2026-13-40", "07:00-10:00", "25:00-99:99", "Europe/Kyiv",
                                     "Mars/Base", "floor", "half_up", "0.5", "1e400", "-0", "*", "&a", "!!python"]))
trees = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=8)), kids,
                                                max_size=5)), max_leaves=25)


@st.composite
def mutated_programs(draw) -> dict[str, str]:
    files = copy.deepcopy(FILES)
    for _ in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(sorted(files)))
        paths = list(_paths(files[name]))
        path = draw(st.sampled_from(paths))
        files[name] = _set(files[name], path, draw(st.one_of(trees, st.just(_DELETE))))
    return {name: yaml.safe_dump(doc, allow_unicode=True) for name, doc in files.items()}


_DELETE = object()


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return None if value is _DELETE else value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


raw_texts = st.one_of(st.text(max_size=300), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True)),
                      st.sampled_from(["a: &x [*x]", "a: *nope", "? [a]\n: b", "%YAML 9.9\n---\na: 1",
                                       "a: !!binary zzz", "a:\n\t- b", "- ]", "a: " + "[" * 500]))


def compile_dir(files: dict[str, str]):
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", errors="surrogatepass")
        problems = check_dir(Path(tmp), TODAY)
        assert isinstance(problems, list) and all(isinstance(p, Problem) for p in problems)
        errors = [p for p in problems if not p.warning]
        try:
            program = load_program(Path(tmp), TODAY)
        except ProgramError as e:
            assert e.problems and all(not p.warning for p in e.problems)
            assert errors, "check_dir found no error but load_program refused"
            return
        assert isinstance(program, Program) and not errors
        assert program.warnings == problems
        program.close()


@settings(max_examples=EXAMPLES * 5, **SETTINGS)
@given(files=mutated_programs())
def test_mutated_programs_give_problems_or_a_program(files):
    compile_dir(files)


@settings(max_examples=EXAMPLES * 5, **SETTINGS)
@given(text=raw_texts, extra=st.one_of(st.none(), raw_texts))
def test_generated_yaml_gives_problems_or_a_program(text, extra):
    files = {"program.yaml": text}
    if extra is not None:
        files["more/extra.yaml"] = extra
    compile_dir(files)


def test_the_shipped_program_still_loads():
    compile_dir({name: yaml.safe_dump(doc) for name, doc in FILES.items()})
