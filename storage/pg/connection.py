"""PostgreSQL connections for the storage functions, through psycopg 3's sync API.

The storage functions take a connection and call execute/executemany with `?`
placeholders, the sqlite3 surface. Connection offers that surface over a psycopg
connection, so the functions whose SQL both databases accept run on either unchanged; the
statements that differ have their PostgreSQL form in this package. A write runs in its own
transaction (transaction()), run again from its start when PostgreSQL refuses it for a
conflict another transaction caused: a unique key taken meanwhile (the same receipt sent
to two processes), a deadlock, a serialization failure.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
from psycopg import errors, pq
from psycopg.types.numeric import NumericLoader

from storage.sql import LockFirst, WriteConflict

T = TypeVar("T")

log = logging.getLogger(__name__)

# A write that lost to another transaction is run again at most this often (config.yaml's
# `database.retries`); a function that keeps failing the same way is a fault, not a race.
RETRIES_DEFAULT = 3
# Rows a streamed read (Connection.stream) fetches per round trip: enough that the trips
# cost little beside the rows, few enough that a read of every posting holds a few MB.
STREAM_ROWS = 10_000
# Translated statements kept per connection: the storage functions' SQL is a fixed set,
# apart from IN lists, whose length varies.
SQL_CACHE_MAX = 2_048
# Conflicts that running the write again from its start resolves: it then sees what the
# other transaction committed (a stored receipt answers as a replay).
RETRIED = (errors.UniqueViolation, errors.DeadlockDetected, errors.SerializationFailure, WriteConflict)
# Members a write may ask to hold first (LockFirst) over its runs: each run that asks adds
# one it did not hold, so a write runs again for this at most this often.
LOCK_FIRST_MAX = 8


class IntegralNumericLoader(NumericLoader):
    """numeric as int when it has no fraction, else Decimal. The tables hold no numeric
    column: numeric comes from SUM over bigint (PostgreSQL widens it), and points and
    amounts must come back as the ints SQLite gives, never as Decimal or float."""

    def load(self, data) -> int | Decimal:
        value = super().load(data)
        return int(value) if value == value.to_integral_value() else value


def connect(url: str, connect_timeout_s: int | None = None, retries: int = RETRIES_DEFAULT) -> Connection:
    """A connection for `database.url` (libpq's URL: a Unix socket folder as host=); its
    transactions run again at most `retries` times after a conflict."""
    # autocommit: transactions are opened and closed by transaction(), never implicitly
    # by a first statement, so a read outside one does not hold a snapshot.
    extra = {} if connect_timeout_s is None else {"connect_timeout": connect_timeout_s}
    raw = psycopg.connect(url, autocommit=True, **extra)
    raw.adapters.register_loader("numeric", IntegralNumericLoader)
    return Connection(raw, retries)


class Connection:
    """execute/executemany with `?` placeholders over a psycopg connection."""

    backend = "postgresql"

    def __init__(self, raw: psycopg.Connection, retries: int = RETRIES_DEFAULT) -> None:
        self.raw = raw
        self.retries = retries
        self._sql: dict[str, str] = {}
        self._streams = 0
        # The members whose row locks the transaction() running holds, as storage.ledger
        # took them: a lock needed below one of them is taken only if free (LockFirst).
        # None outside transaction(): a preview's batches, begun by hand, keep no count.
        self.members_locked: set[int] | None = None

    def _pg(self, sql: str) -> str:
        # psycopg reads `%` as its placeholder's start, so a literal one (LIKE 'member:%') is
        # doubled; a `?` inside a literal would be taken for a placeholder, and the storage
        # functions' SQL has none.
        pg = self._sql.get(sql)
        if pg is None:
            pg = sql.replace("%", "%%").replace("?", "%s")
            if len(self._sql) < SQL_CACHE_MAX:
                self._sql[sql] = pg
        return pg

    def execute(self, sql: str, params: Any = ()) -> psycopg.Cursor:
        cur = self.raw.cursor()
        # Without parameters psycopg sends the text as it is: no placeholders to translate.
        cur.execute(self._pg(sql), params) if params else cur.execute(sql)
        return cur

    def stream(self, sql: str, params: Any = ()) -> Iterator[tuple]:
        """The rows of a read fetched STREAM_ROWS at a time through a server-side cursor,
        where execute() holds the statement's whole result in this process: for the reads
        of a whole table (`audit verify`'s). Outside a transaction a cursor would not
        outlive its statement, so there it is execute()."""
        if self.raw.info.transaction_status == pq.TransactionStatus.IDLE:
            return iter(self.execute(sql, params))
        self._streams += 1
        cur = self.raw.cursor(name=f"stream_{self._streams}")
        cur.itersize = STREAM_ROWS
        cur.execute(self._pg(sql), params) if params else cur.execute(sql)
        return iter(cur)

    def executemany(self, sql: str, rows) -> psycopg.Cursor:
        cur = self.raw.cursor()
        cur.executemany(self._pg(sql), list(rows))
        return cur

    def transaction(self, fn: Callable[[Connection], T], retries: int | None = None) -> T:
        """fn(self) inside one transaction, committed when it returns; run again from its
        start after a conflict (RETRIED), at most `retries` times (default: the
        connection's), so fn must have no effects outside the database. 0: one try. A run
        that needs a member's lock out of id order (LockFirst) runs again with that member
        locked first, without counting as a retry."""
        if retries is None:
            retries = self.retries
        first: set[int] = set()
        attempt = 0
        while True:
            try:
                with self.raw.transaction():
                    self.members_locked = set()
                    if first:
                        ids = sorted(first)
                        self.execute(f"SELECT 1 FROM members WHERE id IN ({', '.join('?' * len(ids))}) "
                                     "ORDER BY id FOR UPDATE", ids)
                        self.members_locked.update(ids)
                    return fn(self)
            except LockFirst as e:
                if not e.member_ids <= first and len(first) < LOCK_FIRST_MAX:
                    log.debug("write needs m_%s locked first, running it again", sorted(e.member_ids))
                    first |= e.member_ids
                    continue
                if attempt == retries:
                    raise
            except RETRIED as e:
                if attempt == retries:
                    raise
                log.debug("write conflicted (%s), running it again", type(e).__name__)
            finally:
                self.members_locked = None
            attempt += 1

    def close(self) -> None:
        self.raw.close()
