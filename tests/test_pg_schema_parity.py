"""The two backends' schemas are one description: every table, column, index, key and trigger
SQLite's migrations make (storage/schema.py) has its twin in PostgreSQL's (storage/pg/schema.py),
apart from the differences the PostgreSQL design chose (schema.INTENDED_DIFFERENCES), and a
SQLite migration without its twin fails here by name. PostgreSQL's migrations only add, and
processes that migrate at once take turns.

The PostgreSQL tests get a fresh database of a throwaway cluster (tests/pg_cluster.py) and
skip, saying why, without PostgreSQL.
"""
from __future__ import annotations

import re
import sqlite3
import threading

import psycopg
import pytest
import sqlite_utils
from sqlite_utils.migrations import Migrations

from storage import ledger as sqlite_ledger
from storage.ledger import NewPosting
from storage.pg import ledger as pg_ledger
from storage.pg import parity
from storage.pg import schema as pg_schema
from storage.pg.connection import connect
from storage.pg.schema import (INTENDED_DIFFERENCES, MIGRATIONS, SMALL_INTEGER_COLUMNS, SQLITE_TWINS, Concurrently,
                               MigrationsBusy, applied, migrate)
from storage.schema import migrations as sqlite_migrations

# The tables whose rows are never updated or deleted on either backend (api_keys: only
# revoked, once), stated here so that a guard lost on both sides fails too.
APPEND_ONLY = {"postings": {"UPDATE", "DELETE"}, "posting_rules": {"UPDATE", "DELETE"},
               "audit_log": {"UPDATE", "DELETE"}, "api_keys": {"UPDATE", "DELETE"},
               "program_versions": {"UPDATE", "DELETE"}, "program_loads": {"UPDATE", "DELETE"}}
THREADS = 3
JOIN_S = 120        # generous: the machine is shared
# Transactional migrations that create an index on a table an earlier migration made
# (PostgreSQL then blocks its writes while the index is built), each with why it may.
LOCKING_INDEXES_ALLOWED = {("p002_chain_anchors", "chain_heads"): "written before any release served from PostgreSQL"}
# Statements that take away, each with why it may.
REMOVALS_ALLOWED = {("p004_posting_rules", "DROP TRIGGER postings_rule_totals"):
                    "replaced at once by one counting reversals only (accruals count by their split); no version "
                    "serving from PostgreSQL was released with the trigger it replaces"}


def sqlite_database(migrations: Migrations = sqlite_migrations) -> sqlite3.Connection:
    db = sqlite_utils.Database(sqlite3.connect(":memory:"))
    migrations.apply(db)
    return db.conn


@pytest.fixture
def pg(pg_url):
    conn = connect(pg_url)
    migrate(conn)
    yield conn
    conn.close()


def parity_problems(migrations: Migrations, pg_conn) -> list[str]:
    """What keeps the PostgreSQL schema from being the twin of what `migrations` make, each
    naming the SQLite migration that lacks its twin."""
    names = [step.name for step in migrations.pending(sqlite_utils.Database(sqlite3.connect(":memory:")))]
    problems = [f"{name} has no PostgreSQL twin: add the PostgreSQL migration that gives its tables, columns, "
                "indexes and triggers theirs (storage/pg/schema.py) and name it in SQLITE_TWINS"
                for name in names if name not in SQLITE_TWINS]
    origins = parity.sqlite_origins(migrations)
    found = parity.differences(parity.sqlite_shape(sqlite_database(migrations)), parity.pg_shape(pg_conn),
                               SMALL_INTEGER_COLUMNS)
    for difference in found:
        if difference in INTENDED_DIFFERENCES:
            continue
        origin = parity.origin_of(difference, origins)
        twins = ", ".join(SQLITE_TWINS.get(origin, ())) or "none"
        problems.append(difference + (f" (made by {origin}; its PostgreSQL twins: {twins})" if origin else ""))
    problems += [f"listed in INTENDED_DIFFERENCES but no longer a difference: {gone}"
                 for gone in INTENDED_DIFFERENCES if gone not in found]
    return problems


def test_each_sqlite_migration_names_postgresql_migrations_that_exist():
    sqlite_names = [s.name for s in sqlite_migrations.pending(sqlite_utils.Database(sqlite3.connect(":memory:")))]
    pg_names = {name for name, _ in MIGRATIONS}
    assert [n for n in sqlite_names if n not in SQLITE_TWINS] == []
    assert [n for n in SQLITE_TWINS if n not in sqlite_names] == [], "SQLITE_TWINS names a SQLite migration gone"
    assert {(s, p) for s, twins in SQLITE_TWINS.items() for p in twins if p not in pg_names} == set()


def test_the_postgresql_schema_is_the_twin_of_sqlites(pg):
    assert parity_problems(sqlite_migrations, pg) == []


def test_both_backends_guard_the_same_tables_as_append_only(pg):
    lite, postgres = parity.sqlite_shape(sqlite_database()), parity.pg_shape(pg)
    assert {t: table.guarded for t, table in lite.items() if table.guarded} == APPEND_ONLY
    # PostgreSQL's own anchors (tables SQLite has no twin of) are append-only as well.
    assert {t: table.guarded for t, table in postgres.items() if table.guarded} == {
        **APPEND_ONLY, "chain_anchors": {"UPDATE", "DELETE"}, "chain_anchor_heads": {"UPDATE", "DELETE"}}


def test_a_sqlite_migration_without_its_twin_is_named(pg):
    """A later SQLite migration (a column and a table) with no PostgreSQL migration beside it."""
    extended = Migrations("loyalty")
    for step in sqlite_migrations.pending(sqlite_utils.Database(sqlite3.connect(":memory:"))):
        extended(name=step.name)(step.fn)

    @extended()
    def m099_nicknames(db):
        db.execute("ALTER TABLE members ADD COLUMN nickname TEXT")
        db.execute("CREATE TABLE nickname_history (member_id INTEGER NOT NULL, nickname TEXT NOT NULL)")

    problems = parity_problems(extended, pg)
    assert problems[0].startswith("m099_nicknames has no PostgreSQL twin")
    assert "table nickname_history: only on SQLite (made by m099_nicknames; its PostgreSQL twins: none)" in problems
    assert "column members.nickname: only on SQLite (made by m099_nicknames; its PostgreSQL twins: none)" in problems
    assert len(problems) == 3, problems


def test_a_changed_column_is_named_with_the_migration_that_made_it(pg):
    pg.execute("ALTER TABLE segment_spans ALTER COLUMN valid_from DROP NOT NULL")
    assert parity_problems(sqlite_migrations, pg) == [
        "column segment_spans.valid_from: NOT NULL only on SQLite "
        "(made by m028_segment_spans; its PostgreSQL twins: p007_segments_offers_coupons)"]


def test_postgresql_refuses_what_sqlites_guards_refuse(pg):
    member = pg.transaction(lambda c: sqlite_ledger.insert_member(
        c, card="hmac-1", card_last4="0001", phone_hmac=None, phone_last4=None, birthday=None, tags="[]",
        referred_by=None, store_id="S001", now="2026-11-01T10:00:00.000000Z"))
    pg.execute("INSERT INTO api_keys (id, name, role, sha256, created_at, created_by) "
               "VALUES ('person-1', 'Olena', 'support', 'ab', 't0', 'admin')")
    pg.execute("INSERT INTO adjustments (adjustment_id, body_sha256, member_id, points, reason, key_id, result, "
               "created_at) VALUES ('a1', 'x', ?, 5, 'goodwill', 'person-1', ?, 't1')", (member, b"{}"))
    assert pg.execute("SELECT key_name FROM adjustments").fetchone() == ("Olena",)
    pg.execute("UPDATE api_keys SET revoked_at = 't2', revoked_by = 'admin' WHERE id = 'person-1'")
    for statement in ("UPDATE api_keys SET revoked_at = 't3' WHERE id = 'person-1'",
                      "UPDATE api_keys SET name = 'Other' WHERE id = 'person-1'",
                      "DELETE FROM api_keys", "TRUNCATE api_keys", "TRUNCATE audit_log CASCADE"):
        with pytest.raises(psycopg.errors.IntegrityError, match="revoked|append-only"):
            pg.execute(statement)
    assert pg.execute("SELECT revoked_at, name FROM api_keys").fetchall() == [("t2", "Olena")]


def test_the_same_postings_leave_the_same_rule_totals_on_both(pg):
    """Accruals count by their split by rule, reversals by themselves, on both backends; on
    PostgreSQL in the member's shard."""
    def write(conn, new_member, new_lot, append):
        member = new_member(conn)
        lot = new_lot(conn, member)
        dates = ("2026-11-01", "2027-11-01")
        append(conn, [NewPosting(member, lot, dates, "accrual", 7, "issue:program", "t", "t", None, "v", None, None,
                                 True, (("base", 4), ("dairy-x2", 3))),
                      NewPosting(member, lot, dates, "accrual", 2, "issue:program", "t", "t", "base", "v", None,
                                 None, False, (("base", 2),)),
                      NewPosting(member, lot, dates, "reversal", -3, "issue:program", "t", "t", "dairy-x2", "v",
                                 None, None, False)])
    member_args = dict(card="hmac-1", card_last4="0001", phone_hmac=None, phone_last4=None, birthday=None,
                       tags="[]", referred_by=None, store_id="S001", now="t0")
    lite = sqlite_database()
    with lite:
        write(lite, lambda c: sqlite_ledger.insert_member(c, **member_args),
              lambda c, m: sqlite_ledger.new_lots(c, [(m, "2026-11-01", "2027-11-01", 7)])[0],
              sqlite_ledger.append_postings)
    pg.transaction(lambda c: write(c, lambda c: sqlite_ledger.insert_member(c, **member_args),
                                   lambda c, m: pg_ledger.new_lots(c, [(m, "2026-11-01", "2027-11-01", 7)])[0],
                                   pg_ledger.append_postings))
    totals = "SELECT rule_id, SUM(points) FROM rule_totals GROUP BY rule_id ORDER BY rule_id"
    assert lite.execute(totals).fetchall() == [("base", 6), ("dairy-x2", 0)]
    assert pg.execute(totals).fetchall() == [("base", 6), ("dairy-x2", 0)]
    assert pg.execute("SELECT DISTINCT shard FROM rule_totals").fetchall() == [(1 % pg_schema.RULE_TOTAL_SHARDS,)]


def test_processes_migrating_at_once_take_turns_and_a_second_run_changes_nothing(pg_url):
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def start():
        conn = connect(pg_url)
        try:
            barrier.wait(timeout=JOIN_S)
            results.append(migrate(conn))
        except BaseException as e:      # reported below, with the others' results
            errors.append(e)
        finally:
            conn.close()
    threads = [threading.Thread(target=start) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert errors == []
    assert sorted(results) == [[]] * (THREADS - 1) + [[name for name, _ in MIGRATIONS]]
    conn = connect(pg_url)
    try:
        before = parity.pg_shape(conn)
        assert migrate(conn) == []
        assert parity.pg_shape(conn) == before
        assert applied(conn) == [name for name, _ in MIGRATIONS]
    finally:
        conn.close()


def test_an_index_build_that_was_interrupted_is_built_again(pg_url, monkeypatch):
    """CREATE INDEX CONCURRENTLY that fails leaves an invalid index; the next start drops
    it and builds it again."""
    conn = connect(pg_url)
    lookups = [name for name, _ in MIGRATIONS].index("p008_lookups")    # builds members_crm_id
    try:
        monkeypatch.setattr(pg_schema, "MIGRATIONS", MIGRATIONS[:lookups])
        migrate(conn)
        for crm in ("crm-1", "crm-1"):
            conn.execute("INSERT INTO members (crm_id, enrolled_at, updated_at) VALUES (?, 't', 't')", (crm,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY members_crm_id ON members(crm_id) WHERE crm_id IS NOT NULL")
        conn.execute("DELETE FROM members WHERE id = (SELECT MAX(id) FROM members)")
        monkeypatch.setattr(pg_schema, "MIGRATIONS", MIGRATIONS)
        assert migrate(conn) == [name for name, _ in MIGRATIONS[lookups:]]
        assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'members_crm_id'::regclass"
                            ).fetchone() == (True,)
    finally:
        conn.close()


def test_a_process_waiting_too_long_for_anothers_migrations_says_who_holds_them(pg_url):
    holder, waiter = connect(pg_url), connect(pg_url)
    try:
        pid = holder.execute("SELECT pg_backend_pid(), pg_advisory_lock(?)", (pg_schema.MIGRATIONS_LOCK_KEY,)
                             ).fetchone()[0]
        with pytest.raises(MigrationsBusy, match=f"another process \\(PostgreSQL backend pid {pid}"):
            migrate(waiter, wait_seconds=0.5)
    finally:
        holder.close()
        waiter.close()


def test_postgresql_migrations_only_add():
    """What the previous version still reads stays: no table, column or index dropped or
    renamed, no column's type changed or made NOT NULL, a new column nullable or with a
    default, and an index on a table that may hold rows built CONCURRENTLY."""
    forbidden = re.compile(r"\bDROP\s+(?:TABLE|COLUMN|INDEX|TRIGGER|FUNCTION)\s+\w+|\bRENAME\b"
                           r"|\bALTER\s+COLUMN\s+\w+\s+(?:SET\s+DATA\s+)?TYPE\b|\bSET\s+NOT\s+NULL\b", re.IGNORECASE)
    for name, step in MIGRATIONS:
        if isinstance(step, Concurrently):
            assert all("CONCURRENTLY" in statement for _, statement in step.indexes), name
            continue
        if callable(step):      # a repair of rows: the schema test above holds it to changing no shape
            continue
        removals = {(name, found) for found in forbidden.findall(step)}
        assert removals <= set(REMOVALS_ALLOWED), f"{name} takes away: {sorted(removals - set(REMOVALS_ALLOWED))}"
        for column in re.findall(r"ADD\s+COLUMN\s+([^,;]+)", step, re.IGNORECASE):
            assert "NOT NULL" not in column.upper() or "DEFAULT" in column.upper(), f"{name}: {column}"
        created = set(re.findall(r"CREATE\s+TABLE\s+(\w+)", step, re.IGNORECASE))
        for table in re.findall(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+\w+\s+ON\s+(\w+)", step, re.IGNORECASE):
            assert table in created or (name, table) in LOCKING_INDEXES_ALLOWED, \
                f"{name}: an index on {table}, which an earlier migration made, must be built CONCURRENTLY"
