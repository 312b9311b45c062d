"""`loyalty jobs run` far from the server's clock: refused without --force (expiry cannot be
taken back), and `--dry-run` prints what it would post while writing nothing, also beside a
serving server."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
import yaml

from conftest import KEYS, MARKET, POSTGRESQL, connect, database_section, line, receipt
from server import admin_cli, jobs
from server.cli import main as cli
from storage.sql import is_postgresql
from test_crash_safety import NOW as SERVER_NOW, Server

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-11-24T12:00:05+02:00"
FAR = "2028-01-01T03:00:00+02:00"       # 402 days and 15 hours after NOW: every lot of NOW has expired
# For a test running a job's batch itself: the server's own round would run the same batch
# whenever it came to it, on a loaded machine after the test made its members (a birthday
# paid before the merge the test sends, lots expired before its batch reads them).
NO_JOBS = {"enabled": False}
MEMBERS = 25
BIRTHDAY_MEMBERS = 3                    # born on 1 January: the birthday event fires at FAR


def birthday_program(tmp_path: Path) -> Path:
    program = tmp_path / "program"
    shutil.copytree(MARKET, program)
    (program / "birthday.yaml").write_text(
        "events:\n  - {id: bday, on: birthday, reward: {points: 70}, expires_in_days: 14}\n")
    return program


def write_config(tmp_path: Path, program: Path = MARKET, clock: str | None = NOW) -> str:
    cfg = {"database": database_section(tmp_path / "loyalty.db"), "rules": {"dir": str(program), "watch": False}}
    if clock:
        cfg["clock"] = {"start": clock}
    else:
        cfg["privacy"] = {"hmac_key": "tests-hmac-key-0123456789"}
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def state(db: Path) -> tuple:
    """Everything a job run writes: postings (count, sum, chain head), fired events, open
    holds, lots marked expired."""
    with closing(connect(db)) as conn:
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(points), 0), (SELECT hash FROM postings ORDER BY id DESC LIMIT 1), "
            "(SELECT COUNT(*) FROM event_fires), (SELECT COUNT(*) FROM holds WHERE status = 'open'), "
            "(SELECT COUNT(*) FROM lots WHERE expiry_done = 1) FROM postings").fetchone()
        return (*row[:2], bytes(row[2]) if row[2] is not None else None, *row[3:])


def previewed(out: str) -> dict[str, tuple[int, int, int]]:
    """{job: (rows, postings, points)} from a dry run's output (holds: (holds, 0, points held))."""
    jobs_ = {m[0]: (int(m[1]), int(m[2]), int(m[3]))
             for m in re.findall(r"^(\w+): (\d+), (\d+) postings, ([+-]\d+) points$", out, re.M)}
    holds = re.search(r"^released_holds: (\d+), (\d+) held points available again$", out, re.M)
    jobs_["released_holds"] = (int(holds[1]), 0, int(holds[2]))
    return jobs_


async def loyalty(argv: list[str]) -> int:
    """The command line from an async test: it runs an event loop of its own."""
    return await asyncio.to_thread(cli, argv)


def ran(out: str) -> dict[str, int]:
    """What `jobs run` printed it did, but PostgreSQL's anchoring of the chain heads
    (storage/pg/anchors.py), which SQLite has no job for and a dry run does not preview."""
    done = {k: int(v) for k, v in (part.split(": ") for part in out.strip().split(", "))}
    done.pop("anchored_heads", None)
    return done


async def test_a_far_now_is_refused_naming_the_clock_then_runs_with_force(make_api, tmp_path, capsys):
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})          # 100 welcome points, expire 2027-11-24
    config, db = write_config(tmp_path), tmp_path / "loyalty.db"
    before = state(db)
    assert await loyalty(["jobs", "run", "--config", config, "--now", FAR]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"refusing --now {FAR}: it is 402 days and 15 hours after the server's clock "
                          f"(clock.start: {NOW}); lots due by then would expire for good."), err
    assert "--dry-run" in err and "--force" in err
    assert state(db) == before

    assert await loyalty(["jobs", "run", "--config", config, "--now", "2026-11-20T00:00:00+02:00"]) == 2
    assert "it is 4 days and 12 hours before the server's clock" in capsys.readouterr().err
    assert state(db) == before

    assert await loyalty(["jobs", "run", "--config", config, "--now", FAR, "--force"]) == 0
    out, err = capsys.readouterr()
    assert ran(out)["expired_lots"] == 1
    assert f"--force: running as of {FAR}, 402 days and 15 hours after the server's clock" in err
    _, member = await api.get("/v1/members/1")
    assert member["balance"]["available"] == 0
    _, statement = await api.get("/v1/members/1/statement")
    assert statement["postings"][0]["kind"] == "expiry" and statement["postings"][0]["points"] == -100


def test_without_clock_start_the_system_clock_is_named(tmp_path, capsys):
    config = write_config(tmp_path, clock=None)
    assert cli(["jobs", "run", "--config", config, "--now", "2000-01-01T00:00:00+00:00"]) == 2
    err = capsys.readouterr().err
    assert "before the server's clock (the system clock: " in err, err
    assert not (tmp_path / "loyalty.db").exists()          # refused before the database is opened


def test_a_now_within_a_day_needs_no_force(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli(["jobs", "run", "--config", config, "--now", "2026-11-25T11:00:00+02:00"]) == 0
    assert ran(capsys.readouterr().out) == {"expired_lots": 0, "released_holds": 0, "birthday_events": 0,
                                            "expiring_lots": 0}


@pytest.mark.parametrize("now, message", [
    ("tomorrow", "--now must be an ISO date and time with a UTC offset, e.g. 2027-01-01T03:00:00+02:00, "
                 "got 'tomorrow'"),
    ("2027-01-01T03:00:00", "--now needs a UTC offset, e.g. 2027-01-01T03:00:00+02:00"),
    # The program's day of such a moment is not a date; even --force cannot run there.
    ("9999-12-31T23:59:59-12:00", "--now must be from 1900-01-01 to 9000-12-31, got '9999-12-31T23:59:59-12:00'"),
    ("0001-01-01T00:00:00+14:00", "--now must be from 1900-01-01 to 9000-12-31, got '0001-01-01T00:00:00+14:00'")])
def test_a_now_that_is_not_a_moment_is_one_line(tmp_path, capsys, now, message):
    assert cli(["jobs", "run", "--config", write_config(tmp_path), "--now", now, "--force"]) == 2
    assert capsys.readouterr().err == message + "\n"


def test_ctrl_c_stops_after_the_batch_in_flight_saying_what_was_done(tmp_path, capsys, monkeypatch):
    config, db = write_config(tmp_path), tmp_path / "loyalty.db"
    members = tmp_path / "members.csv"
    members.write_text("card,opening_points,opening_expires_on\n" +
                       "".join(f"70000000{i:05d},{i},2027-06-30\n" for i in range(1, MEMBERS + 1)))
    assert cli(["import", "members", "--csv", str(members), "--config", config]) == 0
    expire = jobs.JOBS[0][0]

    def ctrl_c_during_the_first_batch(conn, *args):
        if not conn.execute("SELECT COUNT(*) FROM lots WHERE expiry_done = 1").fetchone()[0]:
            os.kill(os.getpid(), signal.SIGINT)
        return expire(conn, *args)
    monkeypatch.setattr(jobs, "BATCH_ROWS_MAX", 10)
    monkeypatch.setattr(jobs, "JOBS", ((ctrl_c_during_the_first_batch, *jobs.JOBS[0][1:]), *jobs.JOBS[1:]))
    capsys.readouterr()
    assert cli(["jobs", "run", "--config", config, "--now", FAR, "--force"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == (
        "jobs run: interrupted (Ctrl-C) after expired_lots: 10, released_holds: 0, birthday_events: 0, "
        "expiring_lots: 0; these batches stay done, run it again to finish")
    assert state(db)[5] == 10
    monkeypatch.undo()
    assert cli(["jobs", "run", "--config", config, "--now", FAR, "--force"]) == 0
    assert ran(capsys.readouterr().out)["expired_lots"] == MEMBERS - 10
    assert state(db)[5] == MEMBERS
    assert cli(["audit", "verify", "--config", config]) == 0


@pytest.mark.sqlite_only(reason="a missing SQLite file; a PostgreSQL database is made by its administrator")
def test_a_dry_run_needs_an_existing_database(tmp_path, capsys):
    assert cli(["jobs", "run", "--config", write_config(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'loyalty.db'}: no database\n"
    assert not (tmp_path / "loyalty.db").exists()


def commits(conn) -> int | None:
    """How many transactions other connections have committed to SQLite's file (a commit,
    even of unchanged pages, costs a server beside it its page cache); None on PostgreSQL,
    whose servers keep their cache through others' commits."""
    return None if is_postgresql(conn) else conn.execute("PRAGMA data_version").fetchone()[0]


async def test_a_dry_run_writes_nothing_and_previews_exactly_what_the_run_posts(make_api, tmp_path, capsys,
                                                                              monkeypatch):
    # Batches of 3: the preview's cursor must carry it past batches whose writes were undone.
    monkeypatch.setattr(jobs, "BATCH_ROWS_MAX", 3)
    program = birthday_program(tmp_path)
    api = await make_api(now=NOW, program_dir=program)
    for n in range(MEMBERS):
        body = {"card": f"c{n}"} | ({"birthday": "1990-01-01"} if n < BIRTHDAY_MEMBERS else {})
        assert (await api.post("/v1/members", body))[0] == 201
    await api.post("/v1/admin/adjustments", {"card": "c0", "points": 500, "reason": "r", "adjustment_id": "a"})
    _, calc = await api.post("/v1/receipts/calculate", receipt("H-1", [line(1, "grocery", 100000)], card="c0",
                                                               redeem=50), as_="register")
    assert calc["hold"]["points"] == 50
    config, db = write_config(tmp_path, program), tmp_path / "loyalty.db"
    before = state(db)
    watch = connect(db)
    commits_seen = commits(watch)

    assert await loyalty(["jobs", "run", "--config", config, "--now", FAR, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert state(db) == before                              # nothing written, the chain head unchanged
    # Not even a commit of unchanged pages (it would cost a server beside it its page cache).
    assert commits(watch) == commits_seen
    watch.close()
    assert out.startswith(f"dry run as of {FAR} (402 days and 15 hours after the server's clock (clock.start: "
                          f"{NOW}), so running it needs --force): nothing was written\n"), out
    preview = previewed(out)
    # 25 welcome lots and the adjustment's lot expire (the held points still count as the lot's).
    assert preview["expired_lots"] == (MEMBERS + 1, MEMBERS + 1, -(MEMBERS * 100 + 500))
    assert preview["birthday_events"] == (BIRTHDAY_MEMBERS, BIRTHDAY_MEMBERS, BIRTHDAY_MEMBERS * 70)
    assert preview["released_holds"] == (1, 0, 50)
    assert "  m_1 lot 1: expiry -100 points (lot expires_on 2027-11-24)\n" in out
    assert re.search(r"^  m_1 lot \d+: event \+70 points, bday \(lot expires_on 2028-01-15\)$", out, re.M)
    # The hold's expiry as its calculate answered it (the test clock runs on while members enrol).
    expired = datetime.fromisoformat(calc["hold"]["expires_at"]).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    assert f"  m_1 hold S001/K01/H-1: 50 points (expired {expired}" in out, out
    shown = re.findall(r"^  m_\d+ lot \d+: expiry", out, re.M)
    assert len(shown) == jobs.PREVIEW_LINES_MAX
    assert f"  ... and {MEMBERS + 1 - jobs.PREVIEW_LINES_MAX} more\n" in out
    total = -(MEMBERS * 100 + 500) + BIRTHDAY_MEMBERS * 70
    assert out.endswith(f"total: {MEMBERS + 1 + BIRTHDAY_MEMBERS} postings, changing the outstanding liability "
                        f"by {total:+d} points\n"), out

    assert await loyalty(["jobs", "run", "--config", config, "--now", FAR, "--force"]) == 0
    assert ran(capsys.readouterr().out) == {job: rows for job, (rows, _, _) in preview.items()}
    after = state(db)
    assert after[0] - before[0] == MEMBERS + 1 + BIRTHDAY_MEMBERS
    assert after[1] - before[1] == total
    assert await loyalty(["audit", "verify", "--config", config]) == 0


@pytest.mark.sqlite_only(reason="SQLite's write lock held by a sqlite3 shell")
async def test_a_dry_run_that_cannot_get_the_write_lock_says_so(make_api, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(admin_cli, "PREVIEW_BUSY_WAIT_SECONDS", 0.2)
    api = await make_api(now=NOW)
    await api.post("/v1/members", {"card": "1"})
    config, db = write_config(tmp_path), tmp_path / "loyalty.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")            # a sqlite3 shell in a transaction
    try:
        assert await loyalty(["jobs", "run", "--config", config, "--dry-run"]) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert capsys.readouterr().err == f"{db}: cannot preview the jobs: database is locked\n"


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry-run-beside")
    server = Server(tmp, rules={"dir": str(birthday_program(tmp))})
    server.start()
    try:
        for n in range(3):
            body = {"card": f"c{n}"} | ({"birthday": "1990-01-01"} if n == 0 else {})
            post(server, "/v1/members", body)
        yield server
    finally:
        server.kill()


def post(server: Server, path: str, body: dict, role: str = "manager") -> dict:
    resp = requests.post(server.url(path), json=body, headers={"Authorization": f"Bearer {KEYS[role]}"},
                         timeout=10)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def test_a_dry_run_beside_a_serving_server(serving):
    server = serving
    before = state(server.db)
    done = subprocess.run([sys.executable, "-m", "server.cli", "jobs", "run", "--config", str(server.config),
                           "--now", FAR, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"(clock.start: {SERVER_NOW})" in done.stdout
    assert previewed(done.stdout)["expired_lots"] == (3, 3, -300)
    assert previewed(done.stdout)["birthday_events"] == (1, 1, 70)
    assert state(server.db) == before
    # The server goes on writing, and the ledger it writes on is whole.
    enrolled = post(server, "/v1/members", {"card": "c-after"})
    assert enrolled["balance"]["available"] == 100
    audit = subprocess.run([sys.executable, "-m", "server.cli", "audit", "verify", "--config", str(server.config)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout


# A fresh file (rollback journal) and one already in WAL mode: SQLite locks each differently.
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
@pytest.mark.sqlite_only(reason="SQLite's write lock held by a sqlite3 shell, in either journal mode")
def test_a_run_that_cannot_get_the_write_lock_is_one_line_naming_the_holder(tmp_path, journal_mode):
    db = tmp_path / "loyalty.db"
    config = tmp_path / "locked.yaml"
    config.write_text(yaml.safe_dump({"database": {**database_section(db), "busy_wait_seconds": 0.5},
                                      "rules": {"dir": str(MARKET), "watch": False}, "clock": {"start": NOW}}))
    command = [sys.executable, "-m", "server.cli", "jobs", "run", "--config", str(config)]
    holder = sqlite3.connect(db, isolation_level=None)      # a sqlite3 shell in a transaction
    holder.execute(f"PRAGMA journal_mode={journal_mode}")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert locked.returncode == 1, locked.stderr
    assert locked.stderr.startswith(f"jobs run: the database {db} is locked by pid {os.getpid()} ("), locked.stderr
    assert locked.stderr.endswith(" for longer than database.busy_wait_seconds (0.5s); batches already done "
                                  "stay done, run it again once the lock is released\n"), locked.stderr
    assert locked.stderr.count("\n") == 1 and locked.stdout == ""
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stdout) == (0, "expired_lots: 0, released_holds: 0, birthday_events: 0, "
                                                   "expiring_lots: 0\n"), \
        again.stderr


def test_a_dry_run_against_a_postgresql_that_does_not_answer_is_one_line(tmp_path, capsys):
    pytest.importorskip("psycopg")
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump({
        "database": {"url": f"postgresql://loyalty@/loyalty?host={tmp_path / 'no-socket'}&port=5432"},
        "rules": {"dir": str(MARKET), "watch": False}, "clock": {"start": NOW}}))
    assert cli(["jobs", "run", "--config", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("on PostgreSQL (database.url): cannot preview the jobs: connection") and err.count("\n") == 1, err


class _MergedAfterTheRead:
    """A connection on which `then` runs (a merge committed by another connection) right
    after the birthday job's look-up of whose birthday it is."""

    def __init__(self, conn, then):
        self._conn, self._then = conn, then

    def execute(self, sql, params=()):
        cursor = self._conn.execute(sql, params)
        if self._then is not None and "substr(birthday" in sql:
            rows, then, self._then = cursor.fetchall(), self._then, None
            then()
            return _Rows(rows)
        return cursor

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _Rows(list):
    def fetchall(self):
        return list(self)

    def fetchone(self):
        return self[0] if self else None


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "runs the job's batch and a merge one after the other")
async def test_a_birthday_reward_is_not_paid_to_a_member_merged_after_the_job_read_the_birthdays(
        make_api, tmp_path):
    """A member whose birthday it is, merged into another just after the job's batch read
    whose birthday it is: the reward was credited to the member merged away, where no card
    reaches it. Now the batch reads again under the members' locks and leaves it out."""
    from server.keys import CLOCK, DATABASE, PROGRAMS
    from storage import ledger
    api = await make_api(now=NOW, program_dir=birthday_program(tmp_path), jobs=NO_JOBS)
    status, born = await api.post("/v1/members", {"card": "7000000000001", "birthday": "1990-11-24"})
    assert status == 201, born
    status, keep = await api.post("/v1/members", {"card": "7000000000002"})
    assert status == 201, keep
    app, loop = api.client.server.app, asyncio.get_running_loop()
    before = (await api.get("/v1/members/7000000000002"))[1]["balance"]["available"]

    def merge():
        merged = asyncio.run_coroutine_threadsafe(api.post("/v1/admin/members/merge", {
            "merge_id": "MG-1", "from_member_id": born["member_id"], "into_member_id": keep["member_id"],
            "reason": "one customer"}), loop).result(timeout=30)
        assert merged[0] == 201, merged

    program, now = app[PROGRAMS].current, app[CLOCK].now()
    await app[DATABASE].write(lambda conn: jobs.birthday_batch(_MergedAfterTheRead(conn, merge), program, now),
                              off_loop=True)
    merged_away = int(born["member_id"][2:])
    left = await app[DATABASE].read(lambda conn: [lot.remaining for lot in ledger.lots_of(conn, merged_away)])
    assert not any(left), left      # nothing credited where no card reaches it
    assert (await api.get("/v1/members/7000000000002"))[1]["balance"]["available"] == before + 100


class _ErasedAfterTheNaming:
    """A connection on which an erasure is started right after an event read the member's
    card and CRM fields, and given up to `wait_s` to finish (it cannot while the batch holds
    the member's lock)."""

    def __init__(self, conn, erase, wait_s: float = 1.5):
        self._conn, self._erase, self._wait_s, self.erasure = conn, erase, wait_s, None

    def execute(self, sql, params=()):
        cursor = self._conn.execute(sql, params)
        if self.erasure is None and "SELECT card_last4 FROM cards" in sql:
            row = cursor.fetchone()
            self.erasure = self._erase()
            try:
                self.erasure.result(timeout=self._wait_s)
            except TimeoutError:
                pass
            return _Rows([row])
        return cursor

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL; SQLite's one writer "
                                           "runs the job's batch and an erasure one after the other")
async def test_a_points_expiring_event_written_as_its_member_is_erased_names_no_one(make_api, tmp_path):
    """The job's announcement of points about to expire, written while the member is erased:
    the event read the member's card and CRM id before the erasure committed, and the
    erasure found no such event to scrub, so the event named the erased member for good."""
    from server.keys import CLOCK, DATABASE, PROGRAMS
    api = await make_api(now=NOW, jobs=NO_JOBS)
    status, member = await api.post("/v1/members", {"card": "7000000000001"})
    assert status == 201, member
    assert (await api.patch("/v1/members/7000000000001", {"crm_id": "CRM-1"}))[0] == 200
    app, loop = api.client.server.app, asyncio.get_running_loop()
    member_id = int(member["member_id"][2:])
    (expires_on,) = await app[DATABASE].read(lambda conn: conn.execute(
        "SELECT expires_on FROM lots WHERE member_id = ?", (member_id,)).fetchone())
    program = app[PROGRAMS].current
    when = datetime.fromisoformat(f"{expires_on}T12:00:00").replace(tzinfo=program.timezone) - timedelta(days=3)
    conn_of = {}

    def erase():
        return asyncio.run_coroutine_threadsafe(
            api.post(f"/v1/admin/members/{member['member_id']}/erase", {"reason": "asked"}), loop)

    def batch(conn):
        conn_of["proxy"] = _ErasedAfterTheNaming(conn, erase)
        return jobs.expiring_batch(conn_of["proxy"], program, when)

    assert (await app[DATABASE].write(batch, off_loop=True)).rows == 1
    status, erased = await asyncio.wrap_future(conn_of["proxy"].erasure)
    assert status == 200, erased
    named = await app[DATABASE].read(lambda conn: [tuple(r) for r in conn.execute(
        "SELECT card_last4, crm_id FROM events WHERE member_id = ? AND type = 'points.expiring'", (member_id,))])
    assert named == [(None, None)], named


class _Locks:
    """A connection that records the members each statement locking members' rows names."""

    def __init__(self, conn):
        self._conn, self.taken = conn, []

    def execute(self, sql, params=()):
        if "FROM members WHERE id" in sql and "FOR UPDATE" in sql:
            self.taken.append(list(params))
        return self._conn.execute(sql, params)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.skipif(not POSTGRESQL, reason="members are locked by row only on PostgreSQL")
async def test_an_expiry_batch_locks_its_members_in_the_order_of_their_ids(make_api):
    """The lots of a batch come in the order of their dates: locked one by one in that order,
    a batch holding a later member while it waited for an earlier one could deadlock with a
    merge of the two, which takes them in the order of their ids (as every writer does)."""
    from server.keys import CLOCK, DATABASE, PROGRAMS
    api = await make_api(now=NOW, jobs=NO_JOBS)
    for card in ("7000000000001", "7000000000002"):
        assert (await api.post("/v1/members", {"card": card}))[0] == 201
    app = api.client.server.app
    # The second member's points expire first.
    await app[DATABASE].write(lambda conn: conn.execute(
        "UPDATE lots SET expires_on = CASE member_id WHEN 2 THEN '2026-11-01' ELSE '2026-11-02' END"))
    program, now, locks = app[PROGRAMS].current, app[CLOCK].now(), []

    def batch(conn):
        locks[:] = [_Locks(conn)]
        return jobs.expire_batch(locks[0], program, now)

    assert (await app[DATABASE].write(batch, off_loop=True)).rows == 2
    assert locks[0].taken[0] == [1, 2], locks[0].taken
    for card in ("7000000000001", "7000000000002"):
        assert (await api.get(f"/v1/members/{card}"))[1]["balance"]["available"] == 0
