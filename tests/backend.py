"""Which database the suite's tests run on: SQLite files (the default) or, with
LOYALTY_TEST_BACKEND=postgresql (`make test-postgresql`), databases of one throwaway
PostgreSQL cluster per session.

A test names its database by the SQLite path it would use (tmp_path / "loyalty.db"); on
PostgreSQL that path maps to one database name, so a server restarted or a command run on
"the same file" opens the same database. Each database is copied from a template migrated
once per session: CREATE DATABASE ... TEMPLATE copies files, far quicker than running every
migration per test.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import psycopg

from pg_cluster import Cluster, bin_dir
from storage.pg.connection import Connection
from storage.sql import is_postgresql

BACKENDS = ("sqlite", "postgresql")
BACKEND = os.environ.get("LOYALTY_TEST_BACKEND", "sqlite")
if BACKEND not in BACKENDS:
    raise RuntimeError(f"LOYALTY_TEST_BACKEND={BACKEND!r}: expected one of {', '.join(BACKENDS)}")
POSTGRESQL = BACKEND == "postgresql"

TEMPLATE = "loyalty_template"
# The suite never kills this cluster (tests/test_pg_crash_safety.py does, on its own), so
# flushing to disk buys nothing here and costs every test's commits and database copies.
SUITE_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# Every test's servers keep up to database.connections each; a test's are let go at its end.
SUITE_MAX_CONNECTIONS = 400


class SessionDatabases:
    """The session's cluster, started at the first database asked for; the databases it
    made, and which of them the running test made (dropped at its end)."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self._admin: psycopg.Connection | None = None
        self._made: set[str] = set()
        self._test_made: list[str] | None = None

    def absent_reason(self) -> str | None:
        return None if bin_dir() is not None else \
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)"

    def _start(self) -> None:
        from storage.pg.database import PgDatabase
        cluster = Cluster(bin_dir(), {**SUITE_SETTINGS, "max_connections": str(SUITE_MAX_CONNECTIONS)})
        cluster.start()
        self.cluster = cluster
        self._admin = psycopg.connect(cluster.url("postgres"), autocommit=True)
        self._admin.execute(f"CREATE DATABASE {TEMPLATE}")
        with PgDatabase(cluster.url(TEMPLATE)):
            pass        # opening applies the migrations
        # A copy needs the template without connections; the migrations' session is gone.

    def url_for(self, path: Path | str) -> str:
        """The database of the SQLite path a test would have used, made on first use."""
        if self.cluster is None:
            self._start()
        name = database_name(path)
        if name not in self._made:
            self._admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
            self._made.add(name)
            if self._test_made is not None:
                self._test_made.append(name)
        return self.cluster.url(name)

    def test_started(self) -> None:
        self._test_made = []

    def test_ended(self) -> None:
        """Drops what the test made (databases a module's fixture made stay): a suite's
        worth of copies would fill the disk. FORCE ends connections a test left open."""
        made, self._test_made = self._test_made or [], None
        for name in made:
            self._admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            self._made.discard(name)

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
        if self.cluster is not None:
            self.cluster.stop()


SESSION = SessionDatabases()


def database_name(path: Path | str) -> str:
    """A PostgreSQL name for a path: the same path, the same database."""
    return "t_" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]


def database_section(path: Path) -> dict:
    """config.yaml's `database` section for the test's database at the SQLite path `path`
    (tmp_path / "loyalty.db")."""
    if POSTGRESQL:
        return {"url": SESSION.url_for(path)}
    return {"path": str(path)}


def connect(path: Path):
    """A connection to the test's database at `path` (as database_section) to read (or, in a test playing an
    attacker, change) its rows: sqlite3's, or storage.pg.connection's, which takes the same
    `?` SQL. Both commit with commit() and end with close(); PostgreSQL's runs each statement
    in its own transaction."""
    if POSTGRESQL:
        from storage.pg.connection import connect as pg_connect
        return _TestConnection(pg_connect(SESSION.url_for(path)).raw)
    return sqlite3.connect(path)


class _TestConnection(Connection):
    """storage.pg.connection's Connection with sqlite3's commit() and `with`: each statement
    has committed already (autocommit)."""

    def commit(self) -> None:
        pass

    def __enter__(self) -> _TestConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def storage_database(path: Path):
    """storage's database object (not opened) for the test's database at `path`: the SQLite
    Database with every migration, or PgDatabase, whose open() finds them applied."""
    if POSTGRESQL:
        from storage.pg.database import PgDatabase
        return PgDatabase(SESSION.url_for(path))
    from storage.db import Database
    from storage.schema import migrations
    return Database(path, migrations=migrations)


def add_members(db, count: int) -> None:
    """Members 1 to count, bare rows (no card, no lots), through db.write_sync."""
    db.write_sync(lambda conn: conn.executemany(
        "INSERT INTO members (id, tags, enrolled_at, updated_at) VALUES (?, '[]', '2026-01-01', '2026-01-01')",
        [(i,) for i in range(1, count + 1)]))


def tamper(conn, table: str, sql: str, params=()) -> None:
    """Runs sql (an UPDATE or DELETE of `table`) as an attacker with write access to the
    database would, past its append-only guard, and commits: on SQLite by dropping the
    table's update and delete triggers; on PostgreSQL by turning this session's triggers off
    (session_replication_role = replica, which a superuser may), the schema left as it was."""
    if is_postgresql(conn):
        conn.execute("SET session_replication_role = replica")
        try:
            conn.execute(sql, params)
        finally:
            conn.execute("SET session_replication_role = DEFAULT")
        return
    conn.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_update")
    conn.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_delete")
    conn.execute(sql, params)
    conn.commit()


def migrated_connection(path: Path):
    """connect()'s connection to a new database at `path` with every migration applied and
    each statement committed on its own (SQLite's autocommit), for tests of the storage
    functions that need no server."""
    if POSTGRESQL:
        return connect(path)
    from sqlite_utils import Database as UtilsDatabase

    from storage.schema import migrations
    conn = sqlite3.connect(path, isolation_level=None)
    migrations.apply(UtilsDatabase(conn))
    return conn
