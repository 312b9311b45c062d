"""A receipt reads its member's segments from the spans a reader takes as current (the
segment_spans_member_current index, m033), in the one statement that also reads their
offers and the receipt's codes: as the last finished run of the daily job left them while
the next one is being written, at a cost that does not grow with the member's history, and
the same on a database upgraded from before the index."""
from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta, timezone

import pytest
from conftest import Api, add_members, serve_program, storage_database

from server import rfm
from server.keys import CLOCK, DATABASE, PROGRAMS
from storage import customer_value, segments
from storage.db import Database
from storage.schema import migrations

NOW = datetime(2026, 12, 10, 10, tzinfo=timezone.utc)
PROGRAM = """\
program: {id: shop, name: Shop, currency: UAH, timezone: Europe/Kyiv}
points: {value: 100, rounding: floor, activation_delay_days: 0, expiry_days: 365}
tiers: {levels: [{id: base, from: 0}]}
stores: [{id: S001}]
segments:
  define:
    - {id: big, when: {spend_in_window: {gte: 50000}}}
    - {id: staff, list: true}
rules:
  - {id: base, reward: {percent: 2}}
  - {id: big-bonus, when: {segment: big}, reward: {points: 100}}
  - {id: staff-bonus, when: {segment: staff}, reward: {points: 7}}
"""


@pytest.fixture
def api(aiohttp_client, tmp_path):
    async def make() -> Api:
        a = await serve_program(aiohttp_client, tmp_path, "2026-12-10T12:00:00+02:00", PROGRAM,
                                jobs={"enabled": False})
        for card in ("c1", "c2"):
            assert (await a.post("/v1/members", {"card": card}))[0] == 201
        return a
    return make


async def bonuses(a: Api, card: str, rid: str, amount: int = 10000) -> list[str]:
    """The segment rules that paid on a receipt of the card."""
    status, answer = await a.post("/v1/receipts", {
        "receipt_id": rid, "store_id": "S001", "register_id": "K1", "ts": "2026-12-10T12:00:00+02:00", "card": card,
        "lines": [{"line_no": 1, "sku": "x", "category": "coats", "qty": 1, "price": amount, "amount": amount}],
        "total": amount}, as_="register")
    assert status == 201, answer
    return sorted(r["rule"] for r in answer["accrued"]["by_rule"] if r["rule"] != "base")


async def job_changes(a: Api) -> segments.Changes:
    """The spans the daily job would open and close now."""
    program, now = a.app[PROGRAMS].current, a.app[CLOCK].now()
    return await a.app[DATABASE].read(lambda conn: segments.changes(
        rfm.membership(conn, program, rfm.computed_segments(program), segments.window_facts(
            conn, now.astimezone(program.timezone).date(), program.segment_window_days, program.timezone), [], now),
        segments.open_spans(conn)))


async def half_a_run(a: Api, changes: segments.Changes | None = None) -> int:
    """The daily job's changes (job_changes unless given) written under a run that has not
    finished (killed half-way, or still writing); its id."""
    changes = changes if changes is not None else await job_changes(a)
    program, db, now = a.app[PROGRAMS].current, a.app[DATABASE], a.app[CLOCK].now()
    run_id = await db.write(lambda conn: segments.start_run(conn, now.date(), program.segment_window_days, now))
    await db.write(lambda conn: segments.write_changes(conn, run_id, now, changes))
    return run_id


async def test_a_receipt_takes_segments_from_the_last_finished_run_while_the_next_is_written(api):
    a = await api()
    assert await bonuses(a, "c1", "r1", 60000) == []
    program = a.app[PROGRAMS].current
    await rfm.run(a.app[DATABASE], program.segment_window_days, program.timezone, a.app[CLOCK].now(), force=True,
                  program=program)
    status, _ = await a.post("/v1/returns", {
        "return_id": "t1", "store_id": "S001", "register_id": "K1",
        "receipt": {"store_id": "S001", "register_id": "K1", "receipt_id": "r1"},
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201
    assert await bonuses(a, "c2", "r2", 60000) == []
    run_id = await half_a_run(a)      # c1 leaves big (all returned), c2 enters it (60,000 spent)
    assert await bonuses(a, "c1", "r3") == ["big-bonus"], "closed by a run not finished: still in"
    assert await bonuses(a, "c2", "r4") == [], "opened by a run not finished: not in yet"
    await a.app[DATABASE].write(lambda conn: segments.finish_run(conn, run_id, 0, a.app[CLOCK].now()))
    assert await bonuses(a, "c1", "r5") == []
    assert await bonuses(a, "c2", "r6") == ["big-bonus"]
    status, _ = await a.put("/v1/admin/segments/staff/members", {"cards": ["c2"]})
    assert status == 200
    assert await bonuses(a, "c2", "r7") == ["big-bonus", "staff-bonus"]
    assert await bonuses(a, "c1", "r8") == []


# ------------------------------------------------------------------ the cost of a long history

@pytest.fixture
def db(tmp_path):
    database = storage_database(tmp_path / "spans.db")
    database.open()
    add_members(database, 2)
    yield database
    database.close()


def on_and_off(db: Database, member_id: int, times: int, stay: bool) -> None:
    """The member added to the staff list and removed again `times` times (a span each), then
    added once more when `stay`."""
    def write(conn):
        for i in range(times):
            at = NOW - timedelta(days=times - i)
            segments.add_members(conn, "staff", [member_id], at)
            segments.remove_members(conn, "staff", [member_id], at + timedelta(hours=1))
        if stay:
            segments.add_members(conn, "staff", [member_id], NOW)
    db.write_sync(write)


def steps_of_the_read(db: Database, member_id: int) -> tuple[set[str], int]:
    """The member's list segments as a receipt reads them, and the SQLite VM steps it took
    (once the connection has read the schema and prepared the statement)."""
    def read(conn):
        customer_value.read(conn, member_id, True, date(2026, 12, 10), [])
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0
        conn.set_progress_handler(step, 1)
        try:
            rows = customer_value.read(conn, member_id, True, date(2026, 12, 10), [])
        finally:
            conn.set_progress_handler(None, 1)
        return rows.listed, steps[0]
    return db.read_sync(read)


@pytest.mark.sqlite_only(reason="counts the steps of SQLite's virtual machine (set_progress_handler)")
def test_a_long_history_of_spans_costs_the_receipts_read_nothing_more(db):
    on_and_off(db, 1, 1, stay=True)
    on_and_off(db, 2, 500, stay=True)
    short, long_ = steps_of_the_read(db, 1), steps_of_the_read(db, 2)
    assert short[0] == long_[0] == {"staff"}
    assert long_[1] <= short[1] + 20, (short, long_)
    db.write_sync(lambda conn: segments.remove_members(conn, "staff", [2], NOW + timedelta(hours=1)))
    assert steps_of_the_read(db, 2)[0] == set()


# ------------------------------------------------------------------ the upgrade

def to_before_m033(path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        DROP INDEX segment_spans_member_current;
        CREATE INDEX segment_spans_member ON segment_spans(member_id);
        DELETE FROM _sqlite_migrations WHERE name = 'm033_segment_spans_current';
    """)
    conn.close()


def indexes(db: Database) -> set[str]:
    return {name for (name,) in db.read_sync(lambda conn: conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'segment_spans'"))}


def test_a_database_from_before_the_index_gets_it_and_reads_the_same(tmp_path):
    path = tmp_path / "old.db"
    db = Database(path, migrations=migrations)
    db.open()
    add_members(db, 3)
    on_and_off(db, 1, 3, stay=True)
    on_and_off(db, 2, 3, stay=False)

    def a_run(conn):
        run_id = segments.start_run(conn, date(2026, 12, 10), 365, NOW)
        segments.write_changes(conn, run_id, NOW, segments.Changes([("big", 3), ("big", 1)], []))
        segments.finish_run(conn, run_id, 2, NOW)
    db.write_sync(a_run)
    db.close()
    to_before_m033(path)
    db = Database(path, migrations=migrations)
    db.open()
    try:
        assert "segment_spans_member_current" in indexes(db) and "segment_spans_member" not in indexes(db)
        got = db.read_sync(lambda conn: [customer_value.read(conn, m, True, None, [])[:2] for m in (1, 2, 3)])
        assert got == [({"staff"}, {"big"}), (set(), set()), (set(), {"big"})]
        assert got == db.read_sync(lambda conn: [segments.membership_of(conn, m) for m in (1, 2, 3)])
    finally:
        db.close()
