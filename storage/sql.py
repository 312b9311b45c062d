"""What the storage functions ask of a connection when the two databases differ.

The functions take a connection and run the same SQL on SQLite (sqlite3) and PostgreSQL
(storage/pg/connection.py, `?` placeholders too). Where one statement cannot serve both,
the one function concerned asks is_postgresql(conn) and chooses; a unique key or foreign
key refused is recognised by is_integrity_error whichever driver raised it.

The drivers' errors an `except` names come from here (database_errors(),
unreachable_errors(), integrity_errors()), psycopg's among them only once psycopg is
imported: storage/pg imports it, and only a PostgreSQL `database.url` imports storage/pg.
So serving SQLite, and every command on it, does not pay psycopg's import (~160 ms).
"""
from __future__ import annotations

import sqlite3
import sys


def _psycopg():
    """psycopg if a PostgreSQL database is in use in this process, else None."""
    return sys.modules.get("psycopg")


def database_errors() -> tuple[type[Exception], ...]:
    """Any error either driver raises."""
    pg = _psycopg()
    return (sqlite3.Error,) if pg is None else (sqlite3.Error, pg.Error)


def unreachable_errors() -> tuple[type[Exception], ...]:
    """Either driver's OperationalError: the database cannot be opened, reached or locked,
    or the connection broke."""
    pg = _psycopg()
    return (sqlite3.OperationalError,) if pg is None else (sqlite3.OperationalError, pg.OperationalError)


def integrity_errors() -> tuple[type[Exception], ...]:
    """A constraint refused (a unique key taken, a foreign key missing), by either driver."""
    pg = _psycopg()
    return (sqlite3.IntegrityError,) if pg is None else (sqlite3.IntegrityError, pg.IntegrityError)


class WriteConflict(Exception):
    """A write found that another transaction took what its plan counted on (a coupon use,
    an offer's points) between its read and its write. With several writers (PostgreSQL)
    the write runs again from its start and plans against what the other one left; with
    SQLite's one writer it is a fault."""


class LockFirst(Exception):
    """A write holding members' locks needs the lock of a member with a lower id, which
    another transaction holds. Writers take members' locks in the order of their ids; waiting
    here could deadlock with one that holds that member and waits, in order, for a lock held
    here. Instead the write's transaction is rolled back (its locks given back) and it runs
    again from its start with these members locked first (storage/pg/connection.py), which
    does not count as one of `database.retries`. PostgreSQL only."""

    def __init__(self, member_ids) -> None:
        self.member_ids = frozenset(member_ids)
        super().__init__("needs the lock of " + ", ".join(f"m_{m}" for m in sorted(self.member_ids))
                         + ", held by another write, below a lock it holds")


def is_postgresql(conn) -> bool:
    """Whether conn is a PostgreSQL connection (storage.pg.connection.Connection)."""
    return getattr(conn, "backend", None) == "postgresql"


def stream(conn, sql: str, params=()):
    """The rows of a read as they come, for reads of a whole table: sqlite3 steps the
    statement as rows are taken; on PostgreSQL a server-side cursor fetches them in
    chunks (storage.pg.connection.Connection.stream) instead of the whole result at once."""
    if is_postgresql(conn):
        return conn.stream(sql, params)
    return conn.execute(sql, params)


def arrival(conn) -> str:
    """The column that numbers a table's rows in the order they were written: SQLite's rowid;
    on PostgreSQL the identity column `id` the tables numbered that way have there."""
    return "id" if is_postgresql(conn) else "rowid"


def json_ids(conn) -> str:
    """A FROM item of the integers of a JSON array bound to one `?` as its UTF-8 bytes (as
    msgspec encodes it; a million member ids in one parameter), its column named `value`:
    SQLite's json_each, PostgreSQL's elements of the text the bytes decode to."""
    if is_postgresql(conn):
        return ("(SELECT CAST(value AS bigint) AS value "
                "FROM json_array_elements_text(CAST(convert_from(?, 'UTF8') AS json)) AS value)")
    return "json_each(?)"


def byte_order(conn) -> str:
    """What follows a text column so that it compares and sorts by its bytes, as Python's
    str and SQLite do: PostgreSQL's database collation (en_US.UTF-8, say) orders text for
    people and would put a hash range out of order. (Then the column's index serves only a
    database created with the C collation.)"""
    return ' COLLATE "C"' if is_postgresql(conn) else ""


def is_integrity_error(error: BaseException) -> bool:
    return isinstance(error, integrity_errors())
