"""Reloading a program many times reuses the engine's rulesets and keeps memory flat."""
from __future__ import annotations

import gc
import pathlib
import weakref
from datetime import datetime, timezone

import pytest
from test_rules_arithmetic import line, receipt

from rules import MemberFacts, engine, load_program

pytestmark = pytest.mark.no_database

MARKET = pathlib.Path(__file__).parent / "programs" / "market"


@pytest.fixture
def rulesets(monkeypatch):
    """Counts rulesets created and deleted in the C engine during the test."""
    counts = {"created": 0, "deleted": 0}
    create, delete = engine._engine.create_ruleset, engine._engine.delete_ruleset

    def counting_create(*args):
        handle = create(*args)
        counts["created"] += 1
        return handle

    def counting_delete(handle):
        delete(handle)
        counts["deleted"] += 1

    monkeypatch.setattr(engine._engine, "create_ruleset", counting_create)
    monkeypatch.setattr(engine._engine, "delete_ruleset", counting_delete)
    return counts


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(row.split()[1]) for row in status if row.startswith("VmRSS:"))


def test_a_reloaded_program_reuses_the_rulesets_the_closed_one_gave_back(rulesets):
    program = load_program(MARKET)
    first = rulesets["created"]
    for _ in range(200):
        new = load_program(MARKET)
        program.close()
        program = new
    program.close()
    # the first program and the one loaded beside it before it was closed: no more
    assert rulesets["created"] <= 2 * max(first, 1)
    assert rulesets["deleted"] == 0


def test_a_dropped_program_gives_its_rulesets_back_when_collected(rulesets):
    for _ in range(50):
        load_program(MARKET)  # dropped at once, never closed
    gc.collect()
    created = rulesets["created"]
    for _ in range(50):
        load_program(MARKET)
    gc.collect()
    assert rulesets["created"] == created


def test_the_pool_is_bounded_and_deletes_what_it_drops(rulesets, monkeypatch):
    monkeypatch.setattr(engine, "POOLED_RULESETS_MAX", 3)
    engines = [engine.Engine([{"$gte": {"total": n}}], [1]) for n in range(10)]
    for each in engines:
        each.close()
    assert rulesets["created"] == 10 and rulesets["deleted"] >= 7


def test_a_pooled_ruleset_matches_as_a_new_one():
    conditions = [{"$gte": {"total": 100}}, {"$lt": {"total": 50}}]
    first = engine.Engine(conditions, [1, 1])
    assert first.match({"total": 120}) == {0}
    first.close()
    again = engine.Engine(conditions, [1, 1])
    assert again.match({"total": 120}) == {0}
    assert again.match({"total": 10}) == {1}
    assert again.match({"total": 70}) == set()
    again.close()


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_stays_flat_over_many_reloads():
    for _ in range(20):
        load_program(MARKET).close()
    gc.collect()
    before = rss_kib()
    program = load_program(MARKET)
    for _ in range(500):
        new = load_program(MARKET)
        program.close()
        program = new
    program.close()
    gc.collect()
    # measured: about +60 KiB over 1,000 reloads (benchmarks/rules_reload_memory.py), while a
    # market ruleset never deleted keeps about 140 KiB: 500 of them would be some 70 MiB
    assert rss_kib() - before < 8 * 1024


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_stays_flat_over_programs_that_matched_receipts():
    """A ruleset that matched a fact holds the engine's session state, which deleting the
    ruleset leaves behind (about 90 KB each): a backtest or a check compiles, uses and
    closes programs all day, so closed rulesets are reused, not deleted."""
    sale = receipt("2026-11-24T12:00:00+02:00", line(1, "dairy", 9100))
    member = MemberFacts(member_id="m_1", tier="base")

    def used_and_closed() -> None:
        program = load_program(MARKET, datetime(2026, 11, 24, tzinfo=timezone.utc))
        assert program.evaluate(sale, member, 0, 0, {}, None).accrued_points > 0
        program.close()

    for _ in range(20):
        used_and_closed()
    gc.collect()
    before = rss_kib()
    for _ in range(500):
        used_and_closed()
    gc.collect()
    # 500 programs each leaving their sessions behind grew it by some 70 MiB
    assert rss_kib() - before < 8 * 1024


def test_a_replaced_program_is_freed_without_the_cyclic_collector():
    """The server freezes what it holds at start-up (server/app.py: a full collection then
    never walks it), the first program too. A program replaced by a reload must therefore go
    by its reference count alone: one that needed the cyclic collector would be kept, with
    its engine ruleset, for the life of the process."""
    sale = receipt("2026-11-24T12:00:00+02:00", line(1, "dairy", 9100))
    member = MemberFacts(member_id="m_1", tier="base")
    program = load_program(MARKET, datetime(2026, 11, 24, tzinfo=timezone.utc))
    assert program.evaluate(sale, member, 0, 0, {}, None).accrued_points > 0
    gc.collect()
    gc.disable()
    gc.freeze()
    try:
        served = weakref.ref(program)
        program = load_program(MARKET, datetime(2026, 11, 24, tzinfo=timezone.utc))  # install(): not closed
        assert served() is None
    finally:
        gc.unfreeze()
        gc.enable()
    program.close()
