"""`when` segments are decided by the daily job over every member and stored; a receipt
reads the last finished run's membership, so a member whose facts change enters or leaves
at the next run, not before."""
from __future__ import annotations

import asyncio
import sqlite3
from datetime import date, datetime, timezone

import pytest
from conftest import Api, serve_program, storage_database

from rules import load_files
from server import rfm
from server.jobs import run_all
from server.keys import CLOCK, DATABASE, PROGRAMS
from server.member_state import segments_now
from storage import segments
from storage.db import Database
from storage.schema import migrations

# 23:30 UTC on 30 November is 1 December in Kyiv: the job's local day.
NOW = datetime(2026, 11, 30, 23, 30, tzinfo=timezone.utc)
NEXT_DAY = datetime(2026, 12, 1, 23, 30, tzinfo=timezone.utc)
SHOP = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {metric: spend, window_days: 365, levels: [{id: base, from: 0}, {id: gold, from: 100000}]}
stores: [{id: S001}]
segments:
  rfm: {window_days: 180}
  define:
    - {id: lapsing, when: {days_since_last_purchase: {between: [60, 180]}}}
    - {id: gold-regulars, when: {tier: gold, receipts_in_window: {gte: 2}}}
    - {id: big, when: {spend_in_window: {gte: 50000}}}
    - {id: newcomers, when: {enrolled_days: {lt: 30}, not: {tags: [staff]}}}
    - {id: staff, list: true}
rules:
  - {id: base, reward: {percent: 2}}
"""


@pytest.fixture
def db(tmp_path):
    database = storage_database(tmp_path / "segments.db")
    database.open()
    yield database
    database.close()


@pytest.fixture
def shop():
    program = load_files({"program.yaml": SHOP}, date(2026, 12, 1))
    yield program
    program.close()


def member(db: Database, mid: int, enrolled: str = "2026-01-01", tags: str = "[]", manual: str | None = None):
    db.write_sync(lambda conn: conn.execute(
        "INSERT INTO members (id, tags, enrolled_at, updated_at, manual_tier, manual_tier_until) "
        "VALUES (?, ?, ?, ?, ?, ?)", (mid, tags, f"{enrolled}T10:00:00.000000Z", enrolled, manual,
                                      "2027-01-01" if manual else None)))


def bought(db: Database, key: str, mid: int, day: str, total: int, returned: int = 0) -> None:
    def write(conn):
        conn.execute(
            "INSERT INTO receipts (store_id, register_id, receipt_id, body_sha256, member_id, ts, local_date, total, "
            "rules_version, status, body, result, created_at) VALUES ('S001', 'K01', ?, ?, ?, ?, ?, ?, 'v', "
            "'confirmed', ?, ?, ?)", (key, b"\0", mid, f"{day}T10:00:00.000000Z", day, total, b"{}", b"{}",
                                      f"{day}T10:00:00.000000Z"))
        if returned:
            conn.execute(
                "INSERT INTO return_lines (receipt_store, receipt_register, receipt_id, line_no, return_store, "
                "return_register, return_id, qty, amount, points_reversed, points_refunded, discount_refunded, "
                "by_rule, created_at) VALUES ('S001', 'K01', ?, 1, 'S001', 'K01', ?, '1', ?, 0, 0, 0, ?, ?)",
                (key, "R" + key, returned, b"[]", f"{day}T11:00:00.000000Z"))
    db.write_sync(write)


def population(db: Database) -> None:
    member(db, 1)
    bought(db, "1a", 1, "2026-09-01", 10000)        # 91 days ago: lapsing
    member(db, 2)
    bought(db, "2a", 2, "2026-11-20", 60000)        # gold by spend (110,000), two receipts, big
    bought(db, "2b", 2, "2026-11-25", 50000)
    member(db, 3)
    bought(db, "3a", 3, "2026-11-25", 120000, returned=70000)   # net 50,000: big, but not gold
    member(db, 4, enrolled="2026-11-20")            # day 11: a newcomer
    member(db, 5, enrolled="2026-11-20", tags='["staff"]')      # staff are no newcomers
    member(db, 6)
    bought(db, "6a", 6, "2026-06-04", 5000)         # 180 days ago, the day before the window: lapsing
    member(db, 7, manual="gold")                    # gold by hand, two small receipts
    bought(db, "7a", 7, "2026-11-01", 1000)
    bought(db, "7b", 7, "2026-11-02", 1000)


def members(db: Database, program) -> dict[str, list[int]]:
    def read(conn):
        out: dict[str, list[int]] = {}
        for mid in range(1, 8):
            for sid in segments_now(conn, program, mid):
                out.setdefault(sid, []).append(mid)
        return out
    return db.read_sync(read)


def test_the_job_decides_every_members_when_segments_from_their_facts(db, shop):
    population(db)
    assert members(db, shop) == {}, "nothing is decided before the first run"
    done = asyncio.run(rfm.run(db, 180, shop.timezone, NOW, program=shop))
    assert (done.opened, done.closed) == (7, 0)
    assert members(db, shop) == {"lapsing": [1, 6], "gold-regulars": [2, 7], "big": [2, 3], "newcomers": [4]}
    assert db.read_sync(lambda conn: segments.members_of(conn, segments.SegmentDefinition("big", when=True))) == [2, 3]


def test_facts_changed_after_a_run_count_from_the_next_run(db, shop):
    population(db)
    asyncio.run(rfm.run(db, 180, shop.timezone, NOW, program=shop))
    bought(db, "1b", 1, "2026-11-30", 40000)        # no longer lapsing; 50,000 in the window: big
    db.write_sync(lambda conn: conn.execute("UPDATE members SET tags = '[\"staff\"]' WHERE id = 4"))
    before = {"lapsing": [1, 6], "gold-regulars": [2, 7], "big": [2, 3], "newcomers": [4]}
    assert members(db, shop) == before
    assert asyncio.run(rfm.run(db, 180, shop.timezone, NOW, program=shop)) is None, "done today already"
    assert members(db, shop) == before
    done = asyncio.run(rfm.run(db, 180, shop.timezone, NEXT_DAY, program=shop))
    # Member 1 bought, member 4 became staff, and member 6's purchase is 181 days old now.
    assert (done.opened, done.closed) == (1, 3)
    assert members(db, shop) == {"gold-regulars": [2, 7], "big": [1, 2, 3]}
    # The spans keep who was in when: member 1 lapsing until the second run, big from it.
    def at(sid, moment):
        return sorted(db.read_sync(lambda conn: segments.members_at(conn, sid, False, moment)))
    between = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
    assert (at("lapsing", between), at("lapsing", NEXT_DAY)) == ([1, 6], [])
    assert (at("big", between), at("big", NEXT_DAY)) == ([2, 3], [1, 2, 3])
    assert at("big", datetime(2026, 11, 30, tzinfo=timezone.utc)) == [], "before the first run: nobody"


def test_a_run_being_written_is_not_seen_until_it_is_finished(db, shop):
    population(db)
    asyncio.run(rfm.run(db, 180, shop.timezone, NOW, program=shop))
    bought(db, "1b", 1, "2026-11-30", 40000)
    # Half a run: its changes written under a run id that is not finished.
    changes = db.read_sync(lambda conn: segments.changes(
        rfm.membership(conn, shop, rfm.computed_segments(shop), segments.window_facts(
            conn, date(2026, 12, 2), 180, shop.timezone), [], NEXT_DAY), segments.open_spans(conn)))
    run_id = db.write_sync(lambda conn: segments.start_run(conn, date(2026, 12, 2), 180, NEXT_DAY))
    db.write_sync(lambda conn: segments.write_changes(conn, run_id, NEXT_DAY, changes))
    assert members(db, shop)["lapsing"] == [1, 6] and members(db, shop)["big"] == [2, 3]
    db.write_sync(lambda conn: segments.finish_run(conn, run_id, 0, NEXT_DAY))
    assert "lapsing" not in members(db, shop) and members(db, shop)["big"] == [1, 2, 3]


def test_a_changed_segment_definition_gets_a_new_run_the_same_day(db, shop):
    population(db)
    assert asyncio.run(run_all(db, shop, NOW))["rfm_members_scored"] == 4
    assert asyncio.run(run_all(db, shop, NOW))["rfm_members_scored"] == 0
    bigger = load_files({"program.yaml": SHOP.replace("{gte: 50000}", "{gte: 100000}")}, date(2026, 12, 1))
    try:
        assert asyncio.run(run_all(db, bigger, NOW))["rfm_members_scored"] == 4
        assert members(db, bigger)["big"] == [2]
        assert asyncio.run(run_all(db, bigger, NOW))["rfm_members_scored"] == 0
    finally:
        bigger.close()


def test_a_segment_the_program_drops_is_closed_by_the_next_run(db, shop):
    population(db)
    asyncio.run(rfm.run(db, 180, shop.timezone, NOW, program=shop))
    fewer = load_files({"program.yaml": SHOP.replace(
        "    - {id: big, when: {spend_in_window: {gte: 50000}}}\n", "")}, date(2026, 12, 1))
    try:
        done = asyncio.run(rfm.run(db, 180, fewer.timezone, NOW, program=fewer))   # the same day: new definitions
    finally:
        fewer.close()
    assert done.closed == 2
    assert db.read_sync(lambda conn: segments.open_spans(conn)).get("big") is None


# ------------------------------------------------------------------ through the API

BIG = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
segments:
  define:
    - {id: big, when: {spend_in_window: {gte: 50000}}}
rules:
  - {id: base, reward: {percent: 2}}
  - {id: big-bonus, when: {segment: big}, reward: {points: 100}}
"""


@pytest.fixture
def api(aiohttp_client, tmp_path):
    async def make() -> Api:
        a = await serve_program(aiohttp_client, tmp_path, "2026-12-10T12:00:00+02:00", BIG, jobs={"enabled": False})
        assert (await a.post("/v1/members", {"card": "c1"}))[0] == 201
        return a
    return make


async def segment_job(a: Api) -> None:
    program = a.app[PROGRAMS].current
    await rfm.run(a.app[DATABASE], program.segment_window_days, program.timezone, a.app[CLOCK].now(), force=True,
                  program=program)


async def points(a: Api, rid: str, amount: int) -> dict[str, int]:
    status, answer = await a.post("/v1/receipts", {
        "receipt_id": rid, "store_id": "S001", "register_id": "K1", "ts": "2026-12-10T12:00:00+02:00", "card": "c1",
        "lines": [{"line_no": 1, "sku": "x", "category": "coats", "qty": 1, "price": amount, "amount": amount}],
        "total": amount}, as_="register")
    assert status == 201, answer
    return {r["rule"]: r["points"] for r in answer["accrued"]["by_rule"]}


async def test_a_receipt_uses_the_membership_the_last_run_left(api):
    a = await api()
    assert await points(a, "r1", 60000) == {"base": 12}
    assert await points(a, "r2", 10000) == {"base": 2}, "70,000 spent, but no run has seen it yet"
    await segment_job(a)
    assert await points(a, "r3", 10000) == {"base": 2, "big-bonus": 100}
    assert (await a.get("/v1/members/c1"))[1]["segments"] == ["big"]
    status, _ = await a.post("/v1/returns", {
        "return_id": "t1", "store_id": "S001", "register_id": "K1",
        "receipt": {"store_id": "S001", "register_id": "K1", "receipt_id": "r1"},
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201
    assert await points(a, "r4", 10000) == {"base": 2, "big-bonus": 100}, "30,000 net now, still in until the run"
    await segment_job(a)
    assert await points(a, "r5", 10000) == {"base": 2}
    assert (await a.get("/v1/members/c1"))[1]["segments"] == []


# ------------------------------------------------------------------ the upgrade

def test_a_database_from_before_segment_spans_keeps_its_list_members(tmp_path, shop):
    path = tmp_path / "old.db"
    db = Database(path, migrations=migrations)
    db.open()
    member(db, 1)
    member(db, 2)
    db.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        DROP TABLE segment_spans;
        ALTER TABLE rfm_runs DROP COLUMN definitions_sha256;
        DELETE FROM _sqlite_migrations WHERE name = 'm028_segment_spans';
        INSERT INTO segment_members VALUES ('staff', 2, '2026-11-01T08:00:00.000000Z');
    """)
    conn.close()
    db = Database(path, migrations=migrations)
    db.open()
    try:
        assert members(db, shop) == {"staff": [2]}
        assert db.read_sync(lambda conn: segments.members_at(
            conn, "staff", True, datetime(2026, 11, 2, tzinfo=timezone.utc))) == {2}
        assert db.read_sync(lambda conn: segments.members_at(
            conn, "staff", True, datetime(2026, 10, 31, tzinfo=timezone.utc))) == set()
        db.write_sync(lambda conn: segments.remove_members(conn, "staff", [2], NOW))
        assert members(db, shop) == {}
        assert db.read_sync(lambda conn: segments.members_at(
            conn, "staff", True, datetime(2026, 11, 2, tzinfo=timezone.utc))) == {2}, "the history stays"
    finally:
        db.close()


def test_the_compiled_condition_answers_as_the_plain_reading(shop):
    from itertools import product

    from rules.conditions import compile_test, holds
    grid = product(("base", "gold"), (0, 59, 60, 180, 181, 100_000), (0, 1, 2, 3), (0, 49_999, 50_000), (0, 29, 30),
                   (False, True))
    for tier, days, receipts, spend, enrolled, staff in grid:
        for segment in shop.segments.values():
            if segment.condition is None:
                continue
            fact = {"tier": tier, "days_since_last_purchase": days, "receipts_in_window": receipts,
                    "spend_in_window": spend, "enrolled_days": enrolled,
                    **{field: staff for field in segment.tag_fields.values()}}
            assert compile_test(segment.condition)(fact) == holds(segment.condition, fact), (segment.id, fact)


def test_one_pass_over_the_receipts_reads_the_window_and_the_tiers_as_two_would(db, shop):
    from server.member_state import tier_since
    population(db)
    bought(db, "2c", 2, "2025-12-20", 7000, returned=2000)      # in the tier window only
    since = tier_since(shop, NOW)
    day = date(2026, 12, 1)
    both = db.read_sync(lambda conn: segments.window_and_tier_facts(conn, day, 180, shop.timezone, since))
    apart = db.read_sync(lambda conn: (segments.window_facts(conn, day, 180, shop.timezone),
                                       segments.tier_metrics(conn, since, None)))
    assert both == apart
    assert both[1][2] == (3, 115000)


def test_jobs_run_says_how_many_members_it_scored_and_which_segments_it_renewed(db, tmp_path, capsys):
    import yaml
    from conftest import database_section
    from server.cli import main
    population(db)
    program = tmp_path / "shop"
    program.mkdir()
    (program / "program.yaml").write_text(SHOP)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "segments.db"),
                                      "rules": {"dir": str(program), "watch": False},
                                      "clock": {"start": NOW.isoformat()}}))
    assert main(["jobs", "run", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("rfm: a run scores every member with a confirmed receipt in the last 180 days and decides 4 "
            "segment(s) (lapsing, gold-regulars, big, newcomers); the dry run does not compute them\n") in out
    assert main(["jobs", "run", "--config", str(config)]) == 0
    # lapsing 1 and 6, gold-regulars 2 and 7, big 2 and 3, newcomers 4
    assert capsys.readouterr().out.endswith(
        "rfm_members_scored: 4, segments_decided: 4, segment_memberships_begun: 7, segment_memberships_ended: 0\n")
    # asked for again the same day: decided again, nothing changed
    assert main(["jobs", "run", "--config", str(config)]) == 0
    assert capsys.readouterr().out.endswith(
        "rfm_members_scored: 4, segments_decided: 4, segment_memberships_begun: 0, segment_memberships_ended: 0\n")
