"""storage.db.Database's interface on PostgreSQL: write, write_grouped, write_sync, read,
lookup, read_sync and close, for functions that take a connection and return. Each runs on
a pool thread, never on the event loop's: a host that does not answer holds up the request
that waits for it, not every request (there is no read_now()).

There is no single writer to batch for: each write is its own transaction, on a worker
thread with a connection of its own (one per thread, `connections` of them), committed
before the caller hears of it; PostgreSQL groups concurrent commits into one WAL flush
itself. A grouped write (storage.db.Grouped) is planned and applied alone: the member's
row lock does what planning a batch one after another did on SQLite. A read runs in a
read-only REPEATABLE READ transaction, so all of it sees one snapshot.

A connection found broken (the server restarted, a failover) is dropped and the function
runs once more on a new one, unless its COMMIT had been sent: that one may have committed,
so it fails with StorageUnavailable (503 storage_unavailable) and the client's retry finds
it or writes it. Connections idle in the pool since the database restarted are all broken,
and the first function on each would otherwise be refused with the database back. A
thread connects at most once per RECONNECT_GAP_S across the threads, so a database that
is down is not hammered and requests fail fast meanwhile. /readyz says
storage_unavailable from a refused function (a failed connect, a connection that broke)
until a connect or a function succeeds again: storage.health's Faults logs it and counts
what it refused, as for SQLite's faults, through the same hooks (on_storage_error, and
on_commit for each write committed).

What the SQLite Database has for its file (the WAL, checkpoints, the salvage of a lost
file, free disk space, preloading its page cache, backups) PostgreSQL does itself; the
server asks `backend` and skips those here. The background jobs run in one process of
all those sharing the database: runs_jobs() says whether this one holds the jobs' lock.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import pq

from storage.db import Grouped, StorageClosed
from storage.health import Faults, StorageUnavailable
from storage.pg.connection import RETRIES_DEFAULT, Connection, connect
from storage.pg.leader import JobsLock
from storage.pg.schema import MIGRATIONS_WAIT_SECONDS, migrate

T = TypeVar("T")

log = logging.getLogger(__name__)

CONNECTIONS_DEFAULT = 8
# After a failed connect, the next attempt waits this long; writes meanwhile fail at once.
RECONNECT_GAP_S = 1.0
# A function whose connection broke before its COMMIT runs on a new one; a second break
# means the database is going away, not that the connection was an old one.
BROKEN_RUNS_MAX = 2
# libpq's own limit on one connect (a host that does not answer).
CONNECT_TIMEOUT_S = 5
DEFAULT_SYNC_TIMEOUT_S = 60.0


# The webhooks' dispatcher asks whether this process runs the jobs every poll (0.25 s): the
# lock is asked about at most this often.
JOBS_CHECK_GAP_S = 1.0


class PgDatabase:
    backend = "postgresql"

    def __init__(self, url: str, *, connections: int = CONNECTIONS_DEFAULT, retries: int = RETRIES_DEFAULT,
                 migrations_wait_s: float = MIGRATIONS_WAIT_SECONDS,
                 on_commit: Callable[[int, float], None] | None = None,
                 on_storage_error: Callable[[str, int], None] | None = None) -> None:
        self._url = url
        self._connections = connections
        self._retries = retries
        self._migrations_wait_s = migrations_wait_s
        self._local = threading.local()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._next_connect_s = 0.0
        self._open: list[Connection] = []
        self._state = "new"
        self._faults = Faults("PostgreSQL", on_storage_error)
        self._on_commit = on_commit
        self._busy = 0                  # functions submitted and not finished
        self._reads: dict[int, float] = {}      # thread id: when its read transaction began
        self._jobs = JobsLock(url)
        self._jobs_turn = threading.Lock()
        self._runs_jobs, self._jobs_checked_at = False, -JOBS_CHECK_GAP_S

    @classmethod
    def from_config(cls, database: Any, **hooks: Callable[..., None] | None) -> PgDatabase:
        """For config.yaml's `database` section (server/config.py DatabaseConfig); hooks:
        on_commit, on_storage_error (the server's metrics)."""
        return cls(database.url, connections=database.connections, retries=database.retries,
                   migrations_wait_s=database.start_wait_seconds, **hooks)

    def open(self) -> list[str]:
        """Connects once (a wrong URL fails here, not at the first request) and applies the
        migrations the database lacks, taking turns with other processes; their names.
        MigrationsBusy when another process keeps the turn past migrations_wait_s."""
        conn = self._connect()
        try:
            applied = migrate(conn, self._migrations_wait_s)
        finally:
            conn.close()
        self._pool = concurrent.futures.ThreadPoolExecutor(self._connections, thread_name_prefix="pg")
        self._state = "open"
        return applied

    def close(self, timeout_s: float | None = None) -> None:
        """Waits for the functions submitted to finish (timeout_s is the SQLite Database's
        bound on its checkpoint; a transaction here ends with its statement's answer)."""
        self._state = "closed"
        with self._jobs_turn:
            self._jobs.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for conn in self._open:
                try:
                    conn.close()
                except psycopg.Error:
                    pass        # a broken connection is being let go anyway
            self._open.clear()

    def __enter__(self) -> PgDatabase:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the server asks of any database ---------------------------------------

    def queue_depth(self) -> int:
        """Writes and reads submitted and not yet finished (/readyz's write_queue)."""
        return self._busy

    def oldest_read_seconds(self) -> float:
        started = list(self._reads.values())
        return time.monotonic() - min(started) if started else 0.0

    def fault(self) -> StorageUnavailable | None:
        """storage_unavailable from a refused function until a connect or a function succeeds."""
        return self._faults.current

    def check_ready(self) -> None:
        if self._state != "open":
            raise StorageClosed(f"the PostgreSQL database is {self._state}")
        fault = self._faults.current
        if fault is not None:
            raise StorageUnavailable(str(fault))

    def runs_jobs(self) -> bool:
        """Whether this process runs the background jobs (and delivers the webhooks) now
        (storage/pg/leader.py): of the processes sharing the database, the one holding the
        jobs' lock. Asked from several threads: the lock's connection is used by one at a time."""
        with self._jobs_turn:
            now = time.monotonic()
            if now - self._jobs_checked_at >= JOBS_CHECK_GAP_S:
                self._runs_jobs, self._jobs_checked_at = self._jobs.holds(), now
            return self._runs_jobs

    # -- writes and reads ----------------------------------------------------------

    async def write(self, fn: Callable[[Connection], T], *, off_loop: bool = False) -> T:
        """fn(conn) in its own transaction, committed before this returns. fn may run more
        than once (a conflict or a connection found broken runs it again from its start),
        so it must have no effects outside the connection. off_loop is accepted for the
        interface: every write is."""
        return await asyncio.wrap_future(self._submit(self._transaction(fn)))

    async def write_grouped(self, grouped: Grouped) -> Any:
        return await self.write(grouped.alone)

    def write_sync(self, fn: Callable[[Connection], T], *, timeout_s: float = DEFAULT_SYNC_TIMEOUT_S) -> T:
        return self._submit(self._transaction(fn)).result(timeout=timeout_s)

    def _transaction(self, fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
        def until_commit(conn: Connection) -> T:
            result = fn(conn)
            self._local.committing = True       # a break from here on may follow the COMMIT
            return result

        def committed(conn: Connection) -> T:
            started_s = time.perf_counter()
            result = conn.transaction(until_commit)
            self._committed(time.perf_counter() - started_s)
            return result
        return committed

    def _committed(self, seconds: float) -> None:
        # One write per transaction: PostgreSQL, not the server, groups the commits' flushes.
        if self._on_commit is None:
            return
        try:
            self._on_commit(1, seconds)
        except Exception:  # noqa: BLE001 - a metrics hook must not fail a committed write
            log.debug("on_commit hook failed", exc_info=True)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await asyncio.wrap_future(self._submit(lambda conn: self._snapshot(conn, fn)))

    async def lookup(self, fn: Callable[[Connection], T]) -> T:
        """A short indexed read for a request (a member by card): read(). There is no
        read_now() here: a statement, or a connect, on the event loop's thread would stop
        every request for as long as a host that does not answer takes (libpq's connect
        timeout, TCP's for a statement)."""
        return await self.read(fn)

    def read_sync(self, fn: Callable[[Connection], T], *, timeout_s: float = DEFAULT_SYNC_TIMEOUT_S) -> T:
        return self._submit(lambda conn: self._snapshot(conn, fn)).result(timeout=timeout_s)

    def _snapshot(self, conn: Connection, fn: Callable[[Connection], T]) -> T:
        me = threading.get_ident()
        self._reads[me] = time.monotonic()
        try:
            return _snapshot(conn, fn)
        finally:
            self._reads.pop(me, None)

    # -- the pool's threads ------------------------------------------------------------

    def _submit(self, job: Callable[[Connection], T]) -> concurrent.futures.Future:
        if self._state != "open" or self._pool is None:
            raise StorageClosed(f"the PostgreSQL database is {self._state}")
        with self._lock:
            self._busy += 1
        future = self._pool.submit(self._run, job)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: concurrent.futures.Future) -> None:
        with self._lock:
            self._busy -= 1

    def _run(self, job: Callable[[Connection], T]) -> T:
        """job(conn) on this thread's connection; a StorageUnavailable it ends with is the
        fault in force (logged, counted) until a connect or a job succeeds."""
        try:
            result = self._run_connected(job)
        except StorageUnavailable as e:
            self._faults.record(e)
            raise
        if self._faults.current is not None:
            self._faults.clear(StorageUnavailable.cause)
        return result

    def _run_connected(self, job: Callable[[Connection], T]) -> T:
        for attempt in range(BROKEN_RUNS_MAX):
            conn = getattr(self._local, "conn", None)
            if conn is None or conn.raw.closed:
                conn = self._local.conn = self._connect()
            self._local.committing = False
            try:
                return job(conn)
            except psycopg.OperationalError as e:
                # The connection broke under the job: its transaction is gone (PostgreSQL
                # rolls back what was not committed), and so is the connection.
                if not _unusable(conn):
                    raise       # an error of the statement (a cancel, say): the connection is fine
                self._forget(conn)
                if self._local.committing or attempt + 1 == BROKEN_RUNS_MAX:
                    raise StorageUnavailable(f"the connection to PostgreSQL broke: {_first_line(e)}") from None
                log.info("a connection to PostgreSQL was found broken (%s); running on a new one", _first_line(e))
        raise AssertionError("unreachable")

    def _connect(self) -> Connection:
        with self._lock:
            wait_s = self._next_connect_s - time.monotonic()
            if wait_s > 0:
                raise StorageUnavailable(f"PostgreSQL did not answer; trying again in {wait_s:.1f} s")
            try:
                conn = connect(self._url, connect_timeout_s=CONNECT_TIMEOUT_S, retries=self._retries)
            except psycopg.OperationalError as e:
                self._next_connect_s = time.monotonic() + RECONNECT_GAP_S
                raise StorageUnavailable(f"cannot connect to PostgreSQL: {_first_line(e)}") from None
            self._open.append(conn)
        if self._faults.current is not None:
            self._faults.clear(StorageUnavailable.cause)
        return conn

    def _forget(self, conn: Connection) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._open:
                self._open.remove(conn)
        try:
            conn.close()
        except psycopg.Error:
            pass            # already broken


def _unusable(conn: Connection) -> bool:
    """Broken, or not back to idle after its transaction ended: an executemany (a pipeline)
    cut off with the connection leaves psycopg busy in the pipeline without marking the
    connection broken, and every later statement on it fails."""
    raw = conn.raw
    return raw.broken or raw.closed or raw.info.transaction_status != pq.TransactionStatus.IDLE


def read_only(conn: Connection, fn: Callable[[Connection], T]) -> T:
    """fn(conn) in a read-only transaction that sees one snapshot throughout."""
    return _snapshot(conn, fn)


def _snapshot(conn: Connection, fn: Callable[[Connection], T]) -> T:
    with conn.raw.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return fn(conn)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
