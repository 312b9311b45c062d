"""A server keeps each member's segments in memory (storage/segments.py MembershipCache), so a
receipt of a member whose segments it read before reads no spans; it never serves what the
database no longer holds: a list segment's PUT or removal, the daily job, a write by another
connection, process or server, and a rolled-back batch are each seen by the next receipt."""
from __future__ import annotations

import asyncio
import re
import sqlite3
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
import yaml
from backend import POSTGRESQL
from conftest import Api, database_section, serve_program, storage_database, test_config

from server import rfm
from server.app import create_app
from server.cli import main as cli
from server.config import DatabaseConfig
from server.keys import CLOCK, DATABASE, OPS, PROGRAMS
from storage import segments
from storage.db import Database
from test_segment_spans_current import PROGRAM, job_changes
from test_segment_spans_current import half_a_run as unfinished_run
from test_storage_writer import WriterGate, wait_until

NOW = "2026-12-10T12:00:00+02:00"


async def enrolled(a: Api, *cards: str) -> Api:
    for card in cards:
        assert (await a.post("/v1/members", {"card": card}))[0] == 201
    return a


@pytest.fixture
def api(aiohttp_client, tmp_path):
    async def make() -> Api:
        a = await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, jobs={"enabled": False})
        return await enrolled(a, "c1", "c2")
    return make


async def paid(a: Api, card: str, rid: str, amount: int = 10000) -> list[str]:
    """The segment rules that paid on a confirmed receipt of the card."""
    status, answer = await a.post("/v1/receipts", {
        "receipt_id": rid, "store_id": "S001", "register_id": "K1", "ts": NOW, "card": card,
        "lines": [{"line_no": 1, "sku": "x", "category": "coats", "qty": 1, "price": amount, "amount": amount}],
        "total": amount}, as_="register")
    assert status == 201, answer
    return sorted(r["rule"] for r in answer["accrued"]["by_rule"] if r["rule"] != "base")


async def staff(a: Api, method: str, *cards: str) -> None:
    status, answer = await a.call(method, "/v1/admin/segments/staff/members", {"cards": list(cards)})
    assert status == 200, answer


async def daily_job(a: Api) -> None:
    program = a.app[PROGRAMS].current
    await rfm.run(a.app[DATABASE], program.segment_window_days, program.timezone, a.app[CLOCK].now(), force=True,
                  program=program)


async def test_a_list_segment_put_and_removal_are_paid_as_they_are_by_the_next_receipt(api):
    a = await api()
    assert await paid(a, "c1", "r1") == []
    assert len(a.app[OPS].segments) == 0, "no span or run written yet: no generation to keep segments under"
    await staff(a, "PUT", "c1")
    assert await paid(a, "c1", "r2") == ["staff-bonus"]
    assert await paid(a, "c1", "r3") == ["staff-bonus"], "kept in memory: still in"
    assert len(a.app[OPS].segments) == 1
    await staff(a, "DELETE", "c1")
    assert await paid(a, "c1", "r4") == []
    assert await paid(a, "c2", "r5") == []
    await staff(a, "PUT", "c2")
    assert await paid(a, "c1", "r6") == []
    assert await paid(a, "c2", "r7") == ["staff-bonus"]


async def test_the_daily_job_between_two_receipts_changes_which_rule_pays(api):
    a = await api()
    assert await paid(a, "c1", "r1", 60000) == []
    assert await paid(a, "c1", "r2") == []
    await daily_job(a)
    assert await paid(a, "c1", "r3") == ["big-bonus"]
    assert await paid(a, "c1", "r4") == ["big-bonus"]
    status, _ = await a.post("/v1/returns", {
        "return_id": "t1", "store_id": "S001", "register_id": "K1",
        "receipt": {"store_id": "S001", "register_id": "K1", "receipt_id": "r1"},
        "lines": [{"line_no": 1, "qty": 1}]}, as_="register")
    assert status == 201
    assert await paid(a, "c1", "r5") == ["big-bonus"], "until the job runs again"
    await daily_job(a)
    assert await paid(a, "c1", "r6") == []


async def test_a_run_still_writing_leaves_the_kept_segments_and_its_finish_drops_them(api):
    a = await api()
    assert await paid(a, "c1", "r1", 60000) == [] and await paid(a, "c2", "r2") == []
    await daily_job(a)
    assert await paid(a, "c1", "r3") == ["big-bonus"] and await paid(a, "c2", "r4") == []
    before = await generation(a)
    run_id = await half_a_run(a, spend=("c2", 60000))
    assert await paid(a, "c1", "r6") == ["big-bonus"] and await paid(a, "c2", "r7") == []
    if not POSTGRESQL:      # PostgreSQL sets it once for every transaction that writes spans
        assert await generation(a) == before, "the run's spans are not seen yet: what was kept stays"
    await a.app[DATABASE].write(lambda conn: segments.finish_run(conn, run_id, 0, a.app[CLOCK].now()))
    assert await generation(a) != before
    assert await paid(a, "c2", "r8") == ["big-bonus"]
    assert await paid(a, "c1", "r9") == ["big-bonus"]


async def test_spans_a_run_writes_after_a_newer_run_finished_are_seen_by_the_next_receipt(api):
    """The server's job and `loyalty jobs run` at once: the older run's spans are current as
    soon as they are written."""
    a = await api()
    c1, db, now = await member_id(a, "c1"), a.app[DATABASE], a.app[CLOCK].now()
    older = await db.write(lambda conn: segments.start_run(conn, now.date(), 365, now))
    newer = await db.write(lambda conn: segments.start_run(conn, now.date(), 365, now))
    await db.write(lambda conn: segments.finish_run(conn, newer, 0, now))
    assert await paid(a, "c1", "r1") == [] and await paid(a, "c1", "r2") == []
    await db.write(lambda conn: segments.write_changes(conn, older, now, segments.Changes([("big", c1)], [])))
    assert await paid(a, "c1", "r3") == ["big-bonus"]


async def generation(a: Api) -> int:
    row = await a.app[DATABASE].read(lambda conn: conn.execute("SELECT value FROM segments_generation").fetchone())
    return row[0]


async def half_a_run(a: Api, spend: tuple[str, int]) -> int:
    """A receipt of `spend` (card, amount), then the daily job's changes written under a run
    that has not finished (still writing); its id."""
    assert await paid(a, spend[0], "r5", spend[1]) == []
    changes = await job_changes(a)
    assert changes.opened
    return await unfinished_run(a, changes)


@pytest.mark.sqlite_only(reason="traces the statements of SQLite's one write connection")
async def test_a_members_next_receipt_reads_no_spans_while_none_changed(api):
    a = await api()
    await staff(a, "PUT", "c1")
    db: Database = a.app[DATABASE]
    statements: list[str] = []
    await db.write(lambda conn: conn.set_trace_callback(statements.append))
    try:
        assert await paid(a, "c1", "r1") == ["staff-bonus"]
        first = [s for s in statements if "segment_spans" in s]
        statements.clear()
        assert await paid(a, "c1", "r2") == ["staff-bonus"]
        again = [s for s in statements if "segment_spans" in s]
    finally:
        await db.write(lambda conn: conn.set_trace_callback(None))
    assert len(first) == 1 and again == []


async def member_id(a: Api, card: str) -> int:
    status, member = await a.get(f"/v1/members/{card}")
    assert status == 200
    return int(member["member_id"].removeprefix("m_"))


async def test_spans_written_by_another_connection_are_seen_by_the_next_receipt(api, tmp_path):
    a = await api()
    assert await paid(a, "c1", "r1") == []
    c1 = await member_id(a, "c1")
    # Its own connection, used off the loop as a command would from another thread.
    other = storage_database(tmp_path / "loyalty.db")
    await asyncio.to_thread(other.open)
    try:
        now = a.app[CLOCK].now()
        await asyncio.to_thread(other.write_sync, lambda conn: segments.add_members(conn, "staff", [c1], now))
        assert await paid(a, "c1", "r2") == ["staff-bonus"]
        await asyncio.to_thread(other.write_sync, lambda conn: segments.remove_members(
            conn, "staff", [c1], now + timedelta(seconds=1)))
        assert await paid(a, "c1", "r3") == []
    finally:
        await asyncio.to_thread(other.close)


async def test_loyalty_jobs_run_from_the_command_line_is_seen_by_the_servers_next_receipt(api, tmp_path):
    a = await api()
    assert await paid(a, "c1", "r1", 60000) == []
    assert await paid(a, "c1", "r2") == []
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                      "rules": {"dir": str(tmp_path / "program"), "watch": False},
                                      "clock": {"start": NOW}}))
    assert await asyncio.to_thread(cli, ["jobs", "run", "--config", str(config), "--now", NOW]) == 0
    assert await paid(a, "c1", "r3") == ["big-bonus"]


async def test_every_loyalty_jobs_run_recomputes_the_segments_even_the_same_day(api, tmp_path):
    a = await api()
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"database": database_section(tmp_path / "loyalty.db"),
                                      "rules": {"dir": str(tmp_path / "program"), "watch": False},
                                      "clock": {"start": NOW}}))
    assert await asyncio.to_thread(cli, ["jobs", "run", "--config", str(config), "--now", NOW]) == 0
    assert await paid(a, "c1", "r1", 60000) == []     # today's run found nobody big
    assert await asyncio.to_thread(cli, ["jobs", "run", "--config", str(config), "--now", NOW]) == 0
    assert await paid(a, "c1", "r2") == ["big-bonus"]


async def test_two_servers_on_one_postgresql_database_see_each_others_segment_writes(aiohttp_client, tmp_path,
                                                                                        pg_url):
    program = tmp_path / "program"
    program.mkdir()
    (program / "program.yaml").write_text(PROGRAM)
    servers = []
    for _ in range(2):
        config = test_config(tmp_path, NOW, program_dir=program, jobs={"enabled": False})
        app = create_app(msgspec.structs.replace(config, database=DatabaseConfig(url=pg_url)))
        server = Api(await aiohttp_client(app))
        server.app = app
        servers.append(server)
    one, two = servers
    await enrolled(one, "c1")
    assert await paid(two, "c1", "r1") == []
    await staff(one, "PUT", "c1")
    assert await paid(two, "c1", "r2") == ["staff-bonus"]
    assert await paid(one, "c1", "r3") == ["staff-bonus"]
    await staff(two, "DELETE", "c1")
    assert await paid(one, "c1", "r4") == []
    assert await paid(two, "c1", "r5") == []


# ------------------------------------------------------------------ a batch rolled back


@pytest.mark.sqlite_only(reason="SQLite's one writer runs a batch of writes in one transaction; on PostgreSQL "
                                "each request has its own")
async def test_a_batch_rolled_back_after_a_receipt_read_its_uncommitted_segments_leaves_nothing_kept(api, tmp_path):
    a = await api()
    c1, c2 = await member_id(a, "c1"), await member_id(a, "c2")
    assert await paid(a, "c1", "r1") == [] and await paid(a, "c2", "r2") == []
    poison = sqlite3.connect(tmp_path / "loyalty.db")
    poison.executescript("CREATE TABLE poison (x); CREATE TRIGGER poison_ends_it BEFORE INSERT ON poison "
                         "BEGIN SELECT RAISE(ROLLBACK, 'ends the batch'); END;")
    poison.close()
    db: Database = a.app[DATABASE]
    now = a.app[CLOCK].now()
    calls = []

    def add_to_staff(conn):
        # The first time c1, then (the batch running again) c2: with a counted generation
        # both would leave the same value, and c1's receipt would find what it read kept.
        calls.append(None)
        segments.add_members(conn, "staff", [c1 if len(calls) == 1 else c2], now)

    gate = WriterGate()
    held = await gate.close_on(db)
    adding = asyncio.create_task(db.write(add_to_staff))
    await wait_until(lambda: db.queue_depth() == 1)
    receipt = asyncio.create_task(paid(a, "c1", "r3"))
    await wait_until(lambda: db.queue_depth() == 2)
    ending = asyncio.create_task(db.write(lambda conn: conn.execute("INSERT INTO poison VALUES (1)")))
    await wait_until(lambda: db.queue_depth() == 3)
    gate.release.set()
    await held
    await adding
    with pytest.raises(sqlite3.IntegrityError):
        await ending
    assert len(calls) == 2, "the batch ran again without the write that ended it"
    assert await receipt == [], "c1's receipt ran again, on the segments committed"
    assert await paid(a, "c1", "r4") == []
    assert await paid(a, "c2", "r5") == ["staff-bonus"]


# ------------------------------------------------------------------ the upgrade


@pytest.mark.sqlite_only(reason="a SQLite file made by the version before m034")
async def test_a_database_from_before_the_generation_keeps_its_segments_and_follows_writes(aiohttp_client,
                                                                                           tmp_path):
    before = await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, jobs={"enabled": False})
    await enrolled(before, "c1", "c2")
    await staff(before, "PUT", "c1")
    await before.client.close()
    conn = sqlite3.connect(tmp_path / "loyalty.db", isolation_level=None)
    conn.executescript("""
        DROP TABLE segments_generation; DROP TRIGGER rfm_runs_generation_insert;
        DROP TRIGGER rfm_runs_generation_update; DROP TRIGGER rfm_runs_generation_delete;
        DELETE FROM _sqlite_migrations WHERE name = 'm034_segments_generation';
    """)
    conn.close()
    a = await serve_program(aiohttp_client, tmp_path, NOW, PROGRAM, jobs={"enabled": False})
    rows = await a.app[DATABASE].read(lambda c: c.execute("SELECT COUNT(*) FROM segments_generation").fetchone())
    assert tuple(rows) == (1,), "a database with spans starts with a generation"
    assert await paid(a, "c1", "r1") == ["staff-bonus"]
    assert await paid(a, "c1", "r2") == ["staff-bonus"]
    assert len(a.app[OPS].segments) == 1
    await staff(a, "PUT", "c2")
    await staff(a, "DELETE", "c1")
    assert await paid(a, "c1", "r3") == []
    assert await paid(a, "c2", "r4") == ["staff-bonus"]


# ------------------------------------------------------------------ every writer of spans


def test_every_write_of_spans_is_one_that_sets_a_new_generation():
    """SQLite has no trigger on segment_spans (m034): its writers in storage/segments.py set
    the generation, so a statement writing spans anywhere else would leave kept segments
    stale on SQLite."""
    root = Path(__file__).resolve().parent.parent
    writes = re.compile(r"(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+segment_spans\b", re.I)
    found = {str(path.relative_to(root)) for folder in ("server", "storage", "rules")
             for path in (root / folder).rglob("*.py") if writes.search(path.read_text())}
    assert found == {"storage/segments.py", "storage/schema.py"}      # schema: m028 fills it from the lists
    functions = re.split(r"^def ", (root / "storage" / "segments.py").read_text(), flags=re.M)[1:]
    writers = [f for f in functions if writes.search(f)]
    assert len(writers) == 3        # write_changes, add_members, remove_members
    for function in writers:
        assert "new_generation(conn)" in function, function.split("(")[0]


async def test_a_member_on_a_list_is_not_in_a_computed_segment_the_program_now_gives_that_id(api):
    """A stored span counts only as the kind the serving program defines its segment: once
    `staff` is computed (here: a spend no member reaches), the list kept for it pays nothing."""
    a = await api()
    await staff(a, "PUT", "c1")
    assert await paid(a, "c1", "r1") == ["staff-bonus"]
    holder = a.app[PROGRAMS]
    computed = PROGRAM.replace("{id: staff, list: true}", "{id: staff, when: {spend_in_window: {gte: 999999999}}}")
    holder.current = holder.compile({"program.yaml": computed.encode()})
    assert await paid(a, "c1", "r2") == [], "kept in memory as a list member of staff"
    assert await paid(a, "c2", "r3") == []
